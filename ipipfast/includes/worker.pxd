from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from .system cimport iovec, tpacket2_hdr
from .counters cimport ipf_tx_stats, ipf_rx_stats
from .table cimport ipf_table, ipf_qsbr
from .encap cimport ipf_tunnel
from .icmp cimport ipf_icmp_budget, ipf_icmp_sender
from .offload cimport ipf_gro_set, IPF_GRO_FLOWS, IPF_GRO_MAX_SEGS, IPF_SEG_SLOT

cdef extern from "worker.h" nogil:
    ctypedef struct ipf_spin:
        uint64_t max_ns
        uint32_t budget_pct
        uint64_t tokens_ns
        uint64_t earned_ns
        uint64_t gap_ns
    uint64_t ipf_spin_window(ipf_spin *s, uint64_t now)
    void ipf_spin_done(ipf_spin *s, uint64_t idle_since, uint64_t spun_ns, uint64_t now)

    ctypedef struct ipf_ring:
        uint8_t *base
        size_t bytes
        uint32_t frame_size
        uint32_t frames
        uint32_t head
    tpacket2_hdr *ipf_ring_slot(const ipf_ring *r, uint32_t i)

    ctypedef struct ipf_shared:
        ipf_table *table
        uint32_t stopping
        uint32_t ip_id
        int stop_fd
        ipf_icmp_budget icmp

    ctypedef struct ipf_tx:
        ipf_qsbr qsbr
        ipf_tx_stats stats
        uint32_t count_row
        ipf_shared *shared
        int fd
        int tun_fd
        ipf_ring ring
        uint32_t data_off
        uint32_t queued
        uint64_t queued_bytes
        ipf_tunnel tn
        uint32_t batch
        uint8_t vnet
        uint8_t partial
        int ifindex
        ipf_spin spin
        uint8_t *buf
        uint32_t buf_size
        uint32_t ip_id, ip_id_end
        int err
        ipf_icmp_sender icmp
        uint8_t seg_hdrs[IPF_SEG_SLOT]

    ctypedef struct ipf_rx:
        ipf_qsbr qsbr
        ipf_rx_stats stats
        uint32_t count_row
        ipf_shared *shared
        int fd
        int tun_fd
        ipf_ring ring
        uint32_t local
        uint8_t check_mac
        uint32_t batch
        uint8_t vnet
        uint8_t ring_vnet
        uint8_t udp_gro
        uint8_t gro_hold
        uint8_t loaded
        uint32_t nap_min
        uint32_t coalesce_us
        int ifindex
        ipf_spin spin
        int err
        ipf_gro_set gro
        uint32_t gro_slots[IPF_GRO_FLOWS][IPF_GRO_MAX_SEGS]

    int ipf_rx_for_host(const tpacket2_hdr *h)
    void ipf_rx_release(ipf_rx *rx, uint32_t i)
    int ipf_tx_free(const ipf_tx *tx)
    uint32_t ipf_tx_put(ipf_tx *tx, const iovec *iov, uint32_t niov, int partial, uint16_t cstart, uint16_t coff)
    void ipf_tx_sent(ipf_tx *tx, int refused)
