from libc.stdint cimport uint8_t, uint32_t, uint64_t, int32_t
from .lpm cimport ipf_lpm, ipf_lpm_route

cdef extern from "table.h" nogil:
    ctypedef struct ipf_peer:
        uint32_t ip
        uint8_t mac[6]
        uint8_t has_mac
        uint32_t pmtu
    ctypedef struct ipf_peer_count:
        uint64_t packets, bytes
    ctypedef struct ipf_table:
        ipf_lpm lpm
        ipf_peer *peers
        uint32_t n_peers
        uint8_t src_mac[6]
        uint64_t generation
        uint32_t count_rows
    ipf_peer_count *ipf_table_counts(const ipf_table *t, uint32_t row)
    void ipf_peer_count_add(ipf_peer_count *c, uint32_t bytes)
    int ipf_table_alloc_counts(ipf_table *t, uint32_t rows)
    ipf_table *ipf_table_build(const ipf_lpm_route *routes, size_t n_routes, const ipf_peer *peers,
                               uint32_t n_peers, const uint8_t *src_mac, uint64_t generation,
                               uint32_t count_rows)
    void ipf_table_free(ipf_table *t)
    int32_t ipf_peer_find(const ipf_table *t, uint32_t ip)

    ctypedef struct ipf_qsbr:
        uint64_t qs
        uint32_t online
    const ipf_table *ipf_qsbr_enter(ipf_qsbr *q, ipf_table **slot)
    void ipf_qsbr_quiescent(ipf_qsbr *q)
    void ipf_qsbr_leave(ipf_qsbr *q)
    ipf_table *ipf_table_publish(ipf_table **slot, ipf_table *t)
    int ipf_qsbr_passed(ipf_qsbr *q, uint64_t qs_seen)
    uint64_t ipf_qsbr_snapshot(ipf_qsbr *q)

    uint32_t ipf_fetch_add_u32(uint32_t *p, uint32_t v)
    uint32_t ipf_load_u32(const uint32_t *p)
    void ipf_store_u32(uint32_t *p, uint32_t v)
    uint32_t ipf_load_status(volatile uint32_t *p)
    void ipf_store_status(volatile uint32_t *p, uint32_t v)
