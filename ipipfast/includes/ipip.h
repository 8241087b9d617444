/* IPIP (RFC 2003) encapsulation and decapsulation on packets in place.
 *
 * Encap: the inner packet sits at pkt with at least IPF_ENCAP_HLEN bytes of
 * headroom before it; the Ethernet and outer IPv4 headers are written there,
 * so the payload is never copied. Decap: validates a received frame and
 * points into it. Field rules follow net/ipv4/ip_tunnel.c (ip_tunnel_xmit)
 * and include/net/inet_ecn.h so that peers cannot tell us from tunl0.
 */
#ifndef IPF_IPIP_H
#define IPF_IPIP_H

#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#include <time.h>
#include <arpa/inet.h>
#include "csum.h"
#include "lpm.h"

#define IPF_ETH_HLEN 14
#define IPF_IP_HLEN 20
#define IPF_ENCAP_HLEN (IPF_ETH_HLEN + IPF_IP_HLEN)
#define IPF_PROTO_ICMP 1
#define IPF_PROTO_IPIP 4
#define IPF_IP_DF 0x4000
#define IPF_IP_MF 0x2000
#define IPF_IP_OFFMASK 0x1fff
#define IPF_ECN_NOT_ECT 0
#define IPF_ECN_ECT_1 1
#define IPF_ECN_ECT_0 2
#define IPF_ECN_CE 3
#define IPF_ICMP_MAX 576  /* RFC 1812 4.3.2.3: an ICMP error fits in 576 bytes */

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
    IPF_RX_BAD_HEADER,
    IPF_RX_BAD_CHECKSUM,
    IPF_RX_NOT_IPIP,
    IPF_RX_NOT_LOCAL,
    IPF_RX_FRAGMENT,
    IPF_RX_UNKNOWN_PEER,
    IPF_RX_INNER_BAD,
    IPF_RX_ECN,
    IPF_RX_WRITE_FAILED,
    IPF_RX_RING_FULL,
    IPF_RX_NREASONS
};
static const char *const ipf_rx_reason_names[IPF_RX_NREASONS] = {
    "ok", "truncated", "bad_header", "bad_checksum", "not_ipip", "not_local", "fragment",
    "unknown_peer", "inner_bad", "ecn", "write_failed", "ring_full",
};

/* Counters of one packet loop: written by that loop only, read by Python
 * while it runs (aligned 64-bit words do not tear on the targets we build
 * for). Each on its own cache lines so the two loops never share one. */
typedef struct {
    uint64_t packets, bytes, icmp_sent, icmp_ratelimited;
    uint64_t gso;          /* super-packets segmented */
    uint64_t drops[IPF_TX_NREASONS];
} __attribute__((aligned(64))) ipf_tx_stats;

typedef struct {
    uint64_t packets, bytes;
    uint64_t gro;          /* coalesced packets written (of more than one segment) */
    uint64_t drops[IPF_RX_NREASONS];
} __attribute__((aligned(64))) ipf_rx_stats;

typedef struct {
    uint32_t src;          /* this node's underlay IPv4, network order */
    uint8_t src_mac[6];
    uint8_t ttl;           /* 0: inherit the inner TTL */
    uint8_t tos;           /* outer DSCP when !tos_inherit (ECN bits come from the inner) */
    uint8_t tos_inherit;
    uint8_t df_fixed;      /* pmtudisc: DF always set */
    uint8_t df_inherit;    /* !ignore_df: DF copied from the inner */
    uint32_t mtu;          /* largest outer IPv4 packet the underlay carries */
} ipf_tunnel;

typedef struct {
    uint32_t ip;           /* network order */
    uint8_t mac[6];        /* next hop on the underlay: the peer or its gateway */
    uint8_t has_mac;
    uint8_t _pad;
    uint32_t pmtu;         /* path MTU learned from ICMP (outer bytes); 0: the link's */
} ipf_peer;

/* Everything the packet loops read, swapped whole (see qsbr below). */
typedef struct {
    ipf_lpm lpm;           /* inner destination -> peer index */
    ipf_peer *peers;
    uint32_t n_peers;
    uint32_t slot_bits;    /* peer_slots: open addressing, peer ip -> index + 1 */
    uint32_t *peer_slots;
    uint64_t generation;
} ipf_table;

static inline uint16_t ipf_get16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return ntohs(v); }
static inline void ipf_put16(uint8_t *p, uint16_t v) { v = htons(v); memcpy(p, &v, 2); }
static inline uint32_t ipf_get32n(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }

static inline uint32_t ipf_peer_slot(uint32_t ip, uint32_t bits)
{
    return (uint32_t)(ip * 0x9E3779B1u) >> (32 - bits);
}

/* Index of the peer with this address (network order), or -1. */
static inline int32_t ipf_peer_find(const ipf_table *t, uint32_t ip)
{
    uint32_t mask = (1u << t->slot_bits) - 1;
    for (uint32_t s = ipf_peer_slot(ip, t->slot_bits);; s = (s + 1) & mask) {
        uint32_t v = t->peer_slots[s];
        if (!v)
            return -1;
        if (t->peers[v - 1].ip == ip)
            return (int32_t)(v - 1);
    }
}

static inline void ipf_table_free(ipf_table *t)
{
    if (!t)
        return;
    ipf_lpm_free(&t->lpm);
    free(t->peers);
    free(t->peer_slots);
    free(t);
}

/* Builds a table; routes' values are peer indexes. NULL when out of memory
 * or a route names a peer that does not exist. */
static ipf_table *ipf_table_build(const ipf_lpm_route *routes, size_t n_routes,
                                  const ipf_peer *peers, uint32_t n_peers, uint64_t generation)
{
    ipf_table *t = (ipf_table *)calloc(1, sizeof(*t));
    if (!t)
        return NULL;
    t->generation = generation;
    t->n_peers = n_peers;
    t->slot_bits = 4;
    while ((1u << t->slot_bits) < 2 * n_peers)
        t->slot_bits++;
    t->peers = (ipf_peer *)malloc((n_peers ? n_peers : 1) * sizeof(ipf_peer));
    t->peer_slots = (uint32_t *)calloc((size_t)1 << t->slot_bits, sizeof(uint32_t));
    if (!t->peers || !t->peer_slots)
        goto fail;
    memcpy(t->peers, peers, n_peers * sizeof(ipf_peer));
    for (uint32_t i = 0; i < n_peers; i++) {
        uint32_t mask = (1u << t->slot_bits) - 1, s = ipf_peer_slot(peers[i].ip, t->slot_bits);
        while (t->peer_slots[s])
            s = (s + 1) & mask;
        t->peer_slots[s] = i + 1;
    }
    for (size_t i = 0; i < n_routes; i++)
        if (routes[i].value >= n_peers)
            goto fail;
    if (ipf_lpm_build(&t->lpm, routes, n_routes) < 0)
        goto fail;
    return t;
fail:
    ipf_table_free(t);
    return NULL;
}

/* ---- encapsulation ---------------------------------------------------- */

/* The largest outer packet toward peer: its path MTU when one was learned. */
static inline uint32_t ipf_peer_mtu(const ipf_tunnel *tn, const ipf_peer *p)
{
    uint32_t pmtu = __atomic_load_n(&p->pmtu, __ATOMIC_RELAXED);
    return pmtu && pmtu < tn->mtu ? pmtu : tn->mtu;
}

/* Checks an inner packet read from the TUN and finds its peer. On success
 * *len is the IPv4 total length. A GSO super-packet (gso) is checked
 * against the MTU segment by segment instead (offload.h). Too big: only
 * when the inner has DF (the sender gets "fragmentation needed", as from
 * tnl_update_pmtu) or it exceeds the link itself; otherwise it leaves
 * with DF clear and the path may fragment it. *peer is set for TOO_BIG. */
static inline int ipf_encap_classify(const ipf_table *t, const ipf_tunnel *tn, const uint8_t *pkt,
                                     uint32_t n, int gso, uint32_t *len, const ipf_peer **peer)
{
    if (n < 1 || (pkt[0] >> 4) != 4)
        return IPF_TX_NOT_IPV4;
    if (n < IPF_IP_HLEN)
        return IPF_TX_BAD_HEADER;
    uint32_t ihl = (uint32_t)(pkt[0] & 0x0f) * 4, tot = ipf_get16(pkt + 2);
    if (ihl < IPF_IP_HLEN || tot < ihl || tot > n)
        return IPF_TX_BAD_HEADER;
    uint32_t v = ipf_lpm_lookup(&t->lpm, ntohl(ipf_get32n(pkt + 16)));
    if (!v)
        return IPF_TX_NO_ROUTE;
    const ipf_peer *p = &t->peers[v - 1];
    *peer = p;
    *len = tot;
    if (!p->has_mac)
        return IPF_TX_NO_NEIGH;
    if (!gso && tot + IPF_IP_HLEN > ipf_peer_mtu(tn, p) &&
        (tot + IPF_IP_HLEN > tn->mtu || (ipf_get16(pkt + 6) & IPF_IP_DF)))
        return IPF_TX_TOO_BIG;
    return IPF_TX_OK;
}

/* Outer ECN from the inner (RFC 6040 4.1, INET_ECN_encapsulate): copied,
 * except that CE becomes ECT(0) so that the mark is not lost on decap. */
static inline uint8_t ipf_ecn_encap(uint8_t outer_tos, uint8_t inner_tos)
{
    uint8_t ecn = inner_tos & 3;
    return (uint8_t)((outer_tos & ~3) | (ecn == IPF_ECN_CE ? IPF_ECN_ECT_0 : ecn));
}

/* Writes the Ethernet and outer IPv4 headers in front of pkt (len bytes). */
static inline void ipf_encap_write(const ipf_tunnel *tn, const ipf_peer *peer, uint8_t *pkt,
                                   uint32_t len, uint16_t id)
{
    uint8_t *ip = pkt - IPF_IP_HLEN, *eth = ip - IPF_ETH_HLEN;
    uint16_t df = 0;
    if (tn->df_fixed || (tn->df_inherit && (ipf_get16(pkt + 6) & IPF_IP_DF)))
        df = IPF_IP_DF;
    ip[0] = 0x45;
    ip[1] = ipf_ecn_encap(tn->tos_inherit ? pkt[1] : tn->tos, pkt[1]);
    ipf_put16(ip + 2, (uint16_t)(len + IPF_IP_HLEN));
    ipf_put16(ip + 4, id);
    ipf_put16(ip + 6, df);
    ip[8] = tn->ttl ? tn->ttl : pkt[8];
    ip[9] = IPF_PROTO_IPIP;
    ip[10] = ip[11] = 0;
    memcpy(ip + 12, &tn->src, 4);
    memcpy(ip + 16, &peer->ip, 4);
    uint16_t c = ipf_csum(ip, IPF_IP_HLEN);
    memcpy(ip + 10, &c, 2);
    memcpy(eth, peer->mac, 6);
    memcpy(eth + 6, tn->src_mac, 6);
    eth[12] = 0x08;
    eth[13] = 0x00;
}

/* ---- decapsulation ---------------------------------------------------- */

/* Sets the inner ECN field, keeping its header checksum right (RFC 1624). */
static inline void ipf_set_ecn(uint8_t *ip, uint8_t ecn)
{
    uint16_t old = ipf_get16(ip), check;
    ip[1] = (uint8_t)((ip[1] & ~3) | ecn);
    memcpy(&check, ip + 10, 2);
    check = ipf_csum_replace16(check, htons(old), htons(ipf_get16(ip)));
    memcpy(ip + 10, &check, 2);
}

/* RFC 6040 4.2 as the kernel applies it (INET_ECN_decapsulate). */
static inline int ipf_ecn_decap(uint8_t outer_tos, uint8_t *inner)
{
    uint8_t outer = outer_tos & 3, in = inner[1] & 3;
    if (outer == IPF_ECN_CE) {
        if (in == IPF_ECN_NOT_ECT)
            return IPF_RX_ECN;  /* congestion marked on a flow that cannot carry it */
        if (in != IPF_ECN_CE)
            ipf_set_ecn(inner, IPF_ECN_CE);
    } else if (outer == IPF_ECN_ECT_1 && in == IPF_ECN_ECT_0) {
        ipf_set_ecn(inner, IPF_ECN_ECT_1);
    }
    return IPF_RX_OK;
}

/* Validates an Ethernet frame carrying IPIP to local (network order) and
 * finds the inner packet in it. Checks what ip_rcv and ipip_rcv check, plus
 * that the sender is a known peer (tunl0 takes IPIP from anyone). */
static inline int ipf_decap(const ipf_table *t, uint32_t local, uint8_t *frame, uint32_t caplen,
                            uint8_t **inner_out, uint32_t *inner_len)
{
    if (caplen < IPF_ETH_HLEN + IPF_IP_HLEN)
        return IPF_RX_TRUNCATED;
    if (frame[12] != 0x08 || frame[13] != 0x00)
        return IPF_RX_NOT_IPIP;
    uint8_t *ip = frame + IPF_ETH_HLEN;
    uint32_t avail = caplen - IPF_ETH_HLEN;
    uint32_t ihl = (uint32_t)(ip[0] & 0x0f) * 4, tot = ipf_get16(ip + 2);
    if ((ip[0] >> 4) != 4 || ihl < IPF_IP_HLEN || tot < ihl)
        return IPF_RX_BAD_HEADER;
    if (ihl > avail || tot > avail)
        return IPF_RX_TRUNCATED;
    if (ipf_csum(ip, ihl) != 0)
        return IPF_RX_BAD_CHECKSUM;
    if (ip[9] != IPF_PROTO_IPIP)
        return IPF_RX_NOT_IPIP;
    if (ipf_get32n(ip + 16) != local)
        return IPF_RX_NOT_LOCAL;
    if (ipf_get16(ip + 6) & (IPF_IP_MF | IPF_IP_OFFMASK))
        return IPF_RX_FRAGMENT;
    if (ipf_peer_find(t, ipf_get32n(ip + 12)) < 0)
        return IPF_RX_UNKNOWN_PEER;

    uint8_t *in = ip + ihl;
    uint32_t in_avail = tot - ihl;
    if (in_avail < IPF_IP_HLEN)
        return IPF_RX_TRUNCATED;
    uint32_t in_ihl = (uint32_t)(in[0] & 0x0f) * 4, in_tot = ipf_get16(in + 2);
    if ((in[0] >> 4) != 4 || in_ihl < IPF_IP_HLEN || in_tot < in_ihl || in_ihl > in_avail)
        return IPF_RX_INNER_BAD;
    if (in_tot > in_avail)
        return IPF_RX_TRUNCATED;
    if (ipf_csum(in, in_ihl) != 0)
        return IPF_RX_INNER_BAD;
    int r = ipf_ecn_decap(ip[1], in);
    if (r != IPF_RX_OK)
        return r;
    *inner_out = in;
    *inner_len = in_tot;  /* trailing bytes past the inner total length are padding */
    return IPF_RX_OK;
}

/* ---- ICMP errors ------------------------------------------------------ */

static inline int ipf_ip_unicast(uint32_t a /* host order */)
{
    return a != 0 && a != 0xffffffffu && (a >> 24) != 127 && (a >> 28) != 0xe;
}

/* Writes to out (IPF_ICMP_MAX bytes) an ICMP error from src (network order)
 * about the IPv4 packet pkt; returns its length, or 0 where RFC 1122 3.2.2
 * and RFC 1812 4.3.2.7 forbid one (about an ICMP error, a non-first
 * fragment, or a source or destination that is not unicast). */
static uint32_t ipf_icmp_error(uint8_t *out, uint32_t src, const uint8_t *pkt, uint32_t len,
                               uint8_t type, uint8_t code, uint32_t info)
{
    if (len < IPF_IP_HLEN)
        return 0;
    uint32_t ihl = (uint32_t)(pkt[0] & 0x0f) * 4;
    if (ihl < IPF_IP_HLEN || ihl > len || (ipf_get16(pkt + 6) & IPF_IP_OFFMASK))
        return 0;
    if (!ipf_ip_unicast(ntohl(ipf_get32n(pkt + 12))) || !ipf_ip_unicast(ntohl(ipf_get32n(pkt + 16))))
        return 0;
    if (pkt[9] == IPF_PROTO_ICMP) {
        if (len < ihl + 1)
            return 0;
        uint8_t t = pkt[ihl];  /* only queries may be answered with an error */
        if (t != 0 && t != 8 && t != 13 && t != 14 && t != 17 && t != 18)
            return 0;
    }
    uint32_t quote = len < IPF_ICMP_MAX - 28 ? len : IPF_ICMP_MAX - 28, total = 28 + quote;
    uint8_t *ip = out, *icmp = out + IPF_IP_HLEN;
    ip[0] = 0x45;
    ip[1] = (uint8_t)((pkt[1] & 0x1c) | 0xc0);  /* precedence internetwork control, as icmp_send */
    ipf_put16(ip + 2, (uint16_t)total);
    ipf_put16(ip + 4, 0);
    ipf_put16(ip + 6, 0);
    ip[8] = 64;
    ip[9] = IPF_PROTO_ICMP;
    ip[10] = ip[11] = 0;
    memcpy(ip + 12, &src, 4);
    memcpy(ip + 16, pkt + 12, 4);
    uint16_t c = ipf_csum(ip, IPF_IP_HLEN);
    memcpy(ip + 10, &c, 2);
    icmp[0] = type;
    icmp[1] = code;
    icmp[2] = icmp[3] = 0;
    uint32_t n_info = htonl(info);
    memcpy(icmp + 4, &n_info, 4);
    memcpy(icmp + 8, pkt, quote);
    c = ipf_csum(icmp, 8 + quote);
    memcpy(icmp + 2, &c, 2);
    return total;
}

/* ICMP error rate limits as the kernel applies them (net/ipv4/icmp.c):
 * a node-wide bucket (icmp_global_allow: icmp_msgs_per_sec 1000, burst
 * icmp_msgs_burst 50) and, per destination, inet_peer_xrlim_allow with
 * icmp_ratelimit 1000 ms: a burst of 6 (XRLIM_BURST_FACTOR), then one a
 * second. Destinations share IPF_RL_SLOTS slots by hash; a collision only
 * resets the newcomer's allowance. Touched by one thread only. */
#define IPF_RL_SLOTS 256
#define IPF_RL_INTERVAL_MS 1000u
#define IPF_RL_BURST 6u

typedef struct {
    uint32_t ip;
    uint32_t tokens_ms;
    uint64_t last_ms;
} ipf_rl_slot;

typedef struct {
    uint64_t last_ns;
    uint32_t tokens;
    uint32_t per_sec;
    uint32_t burst;
    ipf_rl_slot peers[IPF_RL_SLOTS];
} ipf_ratelimit;

static inline int ipf_ratelimit_allow(ipf_ratelimit *r, uint32_t dst)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    uint64_t now = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec, now_ms = now / 1000000u;
    ipf_rl_slot *p = &r->peers[ipf_peer_slot(dst, 8)];
    if (p->ip != dst) {
        p->ip = dst;
        p->tokens_ms = IPF_RL_BURST * IPF_RL_INTERVAL_MS;
        p->last_ms = now_ms;
    }
    uint64_t t = p->tokens_ms + (now_ms - p->last_ms);
    if (t > IPF_RL_BURST * IPF_RL_INTERVAL_MS)
        t = IPF_RL_BURST * IPF_RL_INTERVAL_MS;
    p->last_ms = now_ms;
    p->tokens_ms = (uint32_t)t;
    if (t < IPF_RL_INTERVAL_MS)
        return 0;
    uint64_t add = (now - r->last_ns) * r->per_sec / 1000000000u;
    if (add) {
        r->tokens = (uint32_t)(r->tokens + add > r->burst ? r->burst : r->tokens + add);
        r->last_ns = now;
    }
    if (!r->tokens)
        return 0;
    r->tokens--;
    p->tokens_ms -= IPF_RL_INTERVAL_MS;
    return 1;
}

/* ---- table swap: quiescent-state-based reclamation --------------------- */
/* A packet loop is online while it may hold a table pointer; it bumps qs
 * after each batch and goes offline before it blocks. The control thread
 * publishes a new table and frees the old one once every loop has been
 * offline or passed a batch boundary. seq_cst on both sides orders the
 * loop's "online" store before its table load against the control
 * thread's table store before its "online" load. */
typedef struct {
    uint64_t qs;
    uint32_t online;
    uint32_t _pad[13];  /* own cache line */
} ipf_qsbr;

static inline const ipf_table *ipf_qsbr_enter(ipf_qsbr *q, ipf_table *const *slot)
{
    __atomic_store_n(&q->online, 1, __ATOMIC_SEQ_CST);
    return __atomic_load_n(slot, __ATOMIC_SEQ_CST);
}

static inline void ipf_qsbr_quiescent(ipf_qsbr *q)
{
    __atomic_fetch_add(&q->qs, 1, __ATOMIC_RELEASE);
}

static inline void ipf_qsbr_leave(ipf_qsbr *q)
{
    __atomic_fetch_add(&q->qs, 1, __ATOMIC_RELEASE);
    __atomic_store_n(&q->online, 0, __ATOMIC_RELEASE);
}

static inline ipf_table *ipf_table_publish(ipf_table **slot, ipf_table *t)
{
    return __atomic_exchange_n(slot, t, __ATOMIC_SEQ_CST);
}

/* True once the loop q cannot hold a pointer loaded before qs_seen was read. */
static inline int ipf_qsbr_passed(ipf_qsbr *q, uint64_t qs_seen)
{
    return !__atomic_load_n(&q->online, __ATOMIC_SEQ_CST) ||
           __atomic_load_n(&q->qs, __ATOMIC_ACQUIRE) != qs_seen;
}

static inline uint64_t ipf_qsbr_snapshot(ipf_qsbr *q)
{
    return __atomic_load_n(&q->qs, __ATOMIC_SEQ_CST);
}

static inline uint32_t ipf_fetch_add_u32(uint32_t *p, uint32_t v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
static inline uint32_t ipf_load_u32(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void ipf_store_u32(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline uint32_t ipf_load_status(volatile uint32_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void ipf_store_status(volatile uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }

#endif
