# Declarations of the datapath's C headers (csum.h, lpm.h, ipip.h).
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t
from .system cimport iovec as c_iovec

cdef extern from "csum.h" nogil:
    uint16_t ipf_csum(const void *buf, size_t len)

cdef extern from "lpm.h" nogil:
    ctypedef struct ipf_lpm_route:
        uint32_t prefix
        uint32_t len
        uint32_t value
    ctypedef struct ipf_lpm:
        uint32_t n_groups
    int ipf_lpm_build(ipf_lpm *t, const ipf_lpm_route *routes, size_t n)
    void ipf_lpm_free(ipf_lpm *t)
    uint32_t ipf_lpm_lookup(const ipf_lpm *t, uint32_t addr)
    uint32_t IPF_LPM_MAX_VALUE

cdef extern from "ipip.h" nogil:
    enum:
        IPF_ETH_HLEN
        IPF_IP_HLEN
        IPF_ENCAP_HLEN
        IPF_ICMP_MAX
    enum:
        IPF_TX_OK
        IPF_TX_BAD_HEADER
        IPF_TX_NO_ROUTE
        IPF_TX_TOO_BIG
        IPF_TX_SEND_FAILED
        IPF_TX_NREASONS
    enum:
        IPF_RX_OK
        IPF_RX_TRUNCATED
        IPF_RX_INNER_BAD
        IPF_RX_WRITE_FAILED
        IPF_RX_RING_FULL
        IPF_RX_NREASONS
    const char *ipf_tx_reason_names[]
    const char *ipf_rx_reason_names[]

    # The real array sizes are IPF_TX_NREASONS and IPF_RX_NREASONS (ipip.h).
    ctypedef struct ipf_tx_stats:
        uint64_t packets, bytes, icmp_sent, icmp_ratelimited, gso
        uint64_t drops[1]
    ctypedef struct ipf_rx_stats:
        uint64_t packets, bytes, gro
        uint64_t drops[1]

    ctypedef struct ipf_tunnel:
        uint32_t src
        uint8_t src_mac[6]
        uint8_t ttl
        uint8_t tos
        uint8_t tos_inherit
        uint8_t df_fixed
        uint8_t df_inherit
        uint32_t mtu
    ctypedef struct ipf_peer:
        uint32_t ip
        uint8_t mac[6]
        uint8_t has_mac
        uint32_t pmtu
    ctypedef struct ipf_table:
        ipf_lpm lpm
        ipf_peer *peers
        uint32_t n_peers
        uint64_t generation

    ipf_table *ipf_table_build(const ipf_lpm_route *routes, size_t n_routes,
                               const ipf_peer *peers, uint32_t n_peers, uint64_t generation)
    void ipf_table_free(ipf_table *t)
    int32_t ipf_peer_find(const ipf_table *t, uint32_t ip)
    uint32_t ipf_peer_mtu(const ipf_tunnel *tn, const ipf_peer *p)
    int ipf_encap_classify(const ipf_table *t, const ipf_tunnel *tn, const uint8_t *pkt,
                           uint32_t n, int gso, uint32_t *len, const ipf_peer **peer)
    void ipf_encap_write(const ipf_tunnel *tn, const ipf_peer *peer, uint8_t *pkt,
                         uint32_t len, uint16_t id)
    int ipf_decap(const ipf_table *t, uint32_t local, uint8_t *frame, uint32_t caplen,
                  uint8_t **inner_out, uint32_t *inner_len)
    uint32_t ipf_icmp_error(uint8_t *out, uint32_t src, const uint8_t *pkt, uint32_t len,
                            uint8_t type, uint8_t code, uint32_t info)

    ctypedef struct ipf_ratelimit:
        uint64_t last_ns
        uint32_t tokens
        uint32_t per_sec
        uint32_t burst
    int ipf_ratelimit_allow(ipf_ratelimit *r, uint32_t dst)

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

cdef extern from "<linux/virtio_net.h>" nogil:
    struct virtio_net_hdr:
        uint8_t flags
        uint8_t gso_type
        uint16_t hdr_len
        uint16_t gso_size
        uint16_t csum_start
        uint16_t csum_offset
    enum:
        VIRTIO_NET_HDR_F_NEEDS_CSUM
        VIRTIO_NET_HDR_F_DATA_VALID
        VIRTIO_NET_HDR_GSO_NONE

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
        uint32_t round
        virtio_net_hdr vh
        c_iovec iov[1]
    ctypedef struct ipf_gro_set:
        ipf_gro train[1]
        uint32_t round
    int ipf_csum_fits(uint32_t len, uint32_t start, uint32_t offset)
    void ipf_csum_complete(uint8_t *pkt, uint32_t len, uint16_t start, uint16_t offset)
    int ipf_gso_plan_of(const virtio_net_hdr *vh, const uint8_t *pkt, uint32_t n, uint32_t mtu,
                        ipf_gso_plan *plan)
    uint16_t ipf_l4_csum_offset(uint8_t proto)
    void ipf_vnet_partial(virtio_net_hdr *vh, uint16_t start, uint16_t offset)
    uint32_t ipf_gso_segment(const ipf_tunnel *tn, const ipf_peer *peer, const uint8_t *pkt, uint32_t n,
                             const ipf_gso_plan *plan, uint32_t i, uint16_t outer_id, int partial,
                             uint8_t *slot, c_iovec *iov)
    int ipf_rx_partial(const virtio_net_hdr *vh, uint32_t inner_off, const uint8_t *inner, uint32_t len,
                       uint16_t *start)
    uint8_t ipf_gro_eligible(const uint8_t *inner, uint32_t len, int trusted, int udp)
    uint32_t ipf_gro_finish(ipf_gro *g)
    int ipf_gro_full(const ipf_gro *g)
    int ipf_gro_join(ipf_gro_set *s, uint8_t *inner, uint32_t len)
    void ipf_gro_begin(ipf_gro_set *s, int k, uint8_t *inner, uint32_t len, uint8_t proto, int partial)
    int ipf_gro_oldest(const ipf_gro_set *s)
