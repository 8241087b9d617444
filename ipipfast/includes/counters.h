/* Drop reasons and the counters of the packet loops. */
#ifndef IPF_COUNTERS_H
#define IPF_COUNTERS_H

#include <stdint.h>

/* Outcome of one packet. 0 is success; the rest name the counter that a drop
 * increments. The names arrays below are the only list of them: Python reads
 * them, so a new reason is added here once. */
enum {
    IPF_TX_OK = 0,
    IPF_TX_NOT_IPV4,
    IPF_TX_BAD_HEADER,
    IPF_TX_NO_ROUTE,
    IPF_TX_NO_NEIGH,
    IPF_TX_TOO_BIG,
    IPF_TX_SEND_FAILED,
    IPF_TX_NREASONS
};
static const char *const ipf_tx_reason_names[IPF_TX_NREASONS] = {
    "ok", "not_ipv4", "bad_header", "no_route", "no_neigh", "too_big", "send_failed",
};

enum {
    IPF_RX_OK = 0,
    IPF_RX_TRUNCATED,
    IPF_RX_OTHER_HOST,      /* not the kernel's for this host: another MAC, a broadcast, a VLAN */
    IPF_RX_BAD_HEADER,
    IPF_RX_BAD_CHECKSUM,
    IPF_RX_NOT_IPIP,
    IPF_RX_NOT_LOCAL,
    IPF_RX_FRAGMENT,
    IPF_RX_UNKNOWN_PEER,
    IPF_RX_SOURCE_MAC,      /* a peer's address from a MAC not its next hop's */
    IPF_RX_NO_NEIGH,        /* a peer whose next-hop MAC is not resolved: nothing to check against */
    IPF_RX_INNER_BAD,
    IPF_RX_INNER_IPIP,      /* IPIP in IPIP */
    IPF_RX_INNER_TO_LOCAL,  /* inner packet to this node's underlay address */
    IPF_RX_INNER_TO_PEER,   /* inner packet to a peer's underlay address */
    IPF_RX_ECN,
    IPF_RX_WRITE_FAILED,
    IPF_RX_RING_FULL,
    IPF_RX_NREASONS
};
static const char *const ipf_rx_reason_names[IPF_RX_NREASONS] = {
    "ok", "truncated", "other_host", "bad_header", "bad_checksum", "not_ipip", "not_local", "fragment",
    "unknown_peer", "source_mac", "no_neigh", "inner_bad", "inner_ipip", "inner_to_local", "inner_to_peer",
    "ecn", "write_failed", "ring_full",
};

/* Counters of one packet loop: written by that loop only, read by Python
 * while it runs (aligned 64-bit words do not tear on the targets we build
 * for). Each on its own cache lines so the two loops never share one. */
typedef struct {
    uint64_t sent;         /* ICMP errors sent */
    uint64_t ratelimited;  /* held back by a rate limit (icmp.h) */
} ipf_icmp_stats;

typedef struct {
    uint64_t packets, bytes;
    uint64_t gso;          /* super-packets segmented */
    uint64_t drops[IPF_TX_NREASONS];
    ipf_icmp_stats icmp;   /* about the packets dropped */
} __attribute__((aligned(64))) ipf_tx_stats;

typedef struct {
    uint64_t packets, bytes;
    uint64_t gro;          /* coalesced packets written (of more than one segment) */
    uint64_t taken;        /* frames taken from the ring: at rest, packets + drops but ring_full */
    uint64_t seen;         /* the ring's PACKET_STATISTICS tp_packets, added by Python: at rest,
                            * taken + ring_full */
    uint64_t drops[IPF_RX_NREASONS];  /* ring_full: the ring's PACKET_STATISTICS drops, added by Python */
} __attribute__((aligned(64))) ipf_rx_stats;

#endif
