from libc.stdint cimport uint64_t

cdef extern from "counters.h" nogil:
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
        IPF_RX_OTHER_HOST
        IPF_RX_INNER_BAD
        IPF_RX_WRITE_FAILED
        IPF_RX_RING_FULL
        IPF_RX_NREASONS
    const char *ipf_tx_reason_names[]
    const char *ipf_rx_reason_names[]

    ctypedef struct ipf_icmp_stats:
        uint64_t sent
        uint64_t ratelimited
    # The real array sizes are IPF_TX_NREASONS and IPF_RX_NREASONS.
    ctypedef struct ipf_tx_stats:
        uint64_t packets, bytes, gso
        uint64_t drops[1]
        ipf_icmp_stats icmp
    ctypedef struct ipf_rx_stats:
        uint64_t packets, bytes, gro, taken, seen
        uint64_t drops[1]
