from libc.stdint cimport uint8_t, uint16_t, uint32_t
from .table cimport ipf_peer, ipf_table

cdef extern from "encap.h" nogil:
    ctypedef struct ipf_tunnel:
        uint32_t src
        uint8_t ttl
        uint8_t tos
        uint8_t tos_inherit
        uint8_t df_fixed
        uint8_t df_inherit
        uint32_t mtu
    uint32_t ipf_link_mtu(const ipf_tunnel *tn)
    uint32_t ipf_peer_mtu(const ipf_tunnel *tn, const ipf_peer *p)
    int ipf_encap_classify(const ipf_table *t, const ipf_tunnel *tn, const uint8_t *pkt,
                           uint32_t n, int gso, uint32_t *len, const ipf_peer **peer)
    void ipf_encap_write(const ipf_tunnel *tn, const uint8_t *src_mac, const ipf_peer *peer, uint8_t *pkt,
                         uint32_t len, uint16_t id)
