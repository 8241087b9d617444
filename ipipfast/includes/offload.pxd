from libc.stdint cimport uint8_t, uint16_t, uint32_t
from .system cimport iovec, virtio_net_hdr
from .table cimport ipf_peer
from .encap cimport ipf_tunnel

cdef extern from "offload.h" nogil:
    enum:
        IPF_VNET_HLEN
        IPF_SEG_SLOT
        IPF_GRO_MAX_SEGS
        IPF_GRO_FLOWS
    ctypedef struct ipf_gso_plan:
        uint32_t hlen
        uint32_t mss
        uint32_t nseg
        uint8_t proto
    ctypedef struct ipf_gro:
        uint32_t nseg
        uint32_t total
        uint32_t hlen
        virtio_net_hdr vh
        iovec iov[1]
    ctypedef struct ipf_gro_set:
        ipf_gro train[1]
    int ipf_csum_fits(uint32_t len, uint32_t start, uint32_t offset)
    void ipf_csum_complete(uint8_t *pkt, uint32_t len, uint16_t start, uint16_t offset)
    int ipf_gso_plan_of(const virtio_net_hdr *vh, const uint8_t *pkt, uint32_t n, uint32_t mtu,
                        ipf_gso_plan *plan)
    uint16_t ipf_l4_csum_offset(uint8_t proto)
    void ipf_vnet_partial(virtio_net_hdr *vh, uint16_t start, uint16_t offset)
    uint32_t ipf_gso_segment(const ipf_tunnel *tn, const uint8_t *src_mac, const ipf_peer *peer,
                             const uint8_t *pkt, uint32_t n, const ipf_gso_plan *plan, uint32_t i,
                             uint16_t outer_id, int partial, uint8_t *slot, iovec *iov)
    int ipf_rx_partial(const virtio_net_hdr *vh, uint32_t inner_off, const uint8_t *inner, uint32_t len,
                       uint16_t *start)
    uint8_t ipf_gro_eligible(const uint8_t *inner, uint32_t len, int trusted, int udp)
    uint32_t ipf_gro_finish(ipf_gro *g)
    int ipf_gro_join(ipf_gro_set *s, uint8_t *inner, uint32_t len)
    void ipf_gro_begin(ipf_gro_set *s, int k, uint8_t *inner, uint32_t len, uint8_t proto, int partial)
    uint32_t ipf_gro_batch_end(ipf_gro_set *s, int hold, int *due)
    uint32_t ipf_gro_all(const ipf_gro_set *s, int *order)
