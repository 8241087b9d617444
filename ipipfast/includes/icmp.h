/* ICMP errors that the datapath sends to inner senders, and their rate
 * limits. */
#ifndef IPF_ICMP_H
#define IPF_ICMP_H

#include <stdint.h>
#include <string.h>
#include "ip.h"
#include "csum.h"

#define IPF_ICMP_MAX 576  /* RFC 1812 4.3.2.3: an ICMP error fits in 576 bytes */

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

/* Rate limits as the kernel applies them (net/ipv4/icmp.c). The node's
 * budget, one token bucket that every sending thread shares as
 * icmp_global_allow keeps one per network namespace (icmp_msgs_per_sec
 * 1000, icmp_msgs_burst 50), is kept as the time at which the bucket is
 * full again (GCRA): one compare-and-swap takes a token. Per destination,
 * inet_peer_xrlim_allow with icmp_ratelimit 1000 ms: a burst of 6
 * (XRLIM_BURST_FACTOR), then one a second; destinations share
 * IPF_RL_SLOTS slots by hash, where a collision only resets the
 * newcomer's allowance; each sending thread keeps its own. */
#define IPF_ICMP_PER_SEC 1000u
#define IPF_ICMP_BURST 50u
#define IPF_ICMP_COST_NS (1000000000u / IPF_ICMP_PER_SEC)
#define IPF_RL_BITS 8
#define IPF_RL_SLOTS (1 << IPF_RL_BITS)
#define IPF_RL_INTERVAL_MS 1000u
#define IPF_RL_BURST 6u

typedef struct {
    uint64_t full_at;      /* CLOCK_MONOTONIC ns; read and written atomically */
} __attribute__((aligned(64))) ipf_icmp_budget;

typedef struct {
    uint32_t ip;
    uint32_t tokens_ms;
    uint64_t last_ms;
} ipf_rl_slot;

typedef struct {
    ipf_rl_slot slot[IPF_RL_SLOTS];
} ipf_icmp_dests;

/* What one thread needs to send errors: the node's raw socket and address,
 * the node's budget, and its own limits per destination and buffer. */
typedef struct {
    int fd;
    uint32_t src;          /* network order */
    ipf_icmp_budget *budget;
    ipf_icmp_dests dests;
    uint8_t buf[IPF_ICMP_MAX];
} ipf_icmp_sender;

static inline int ipf_icmp_budget_take(ipf_icmp_budget *b, uint64_t now)
{
    uint64_t full_at = __atomic_load_n(&b->full_at, __ATOMIC_RELAXED), next;
    do {
        next = (full_at > now ? full_at : now) + IPF_ICMP_COST_NS;
        if (next - now > (uint64_t)IPF_ICMP_BURST * IPF_ICMP_COST_NS)
            return 0;
    } while (!__atomic_compare_exchange_n(&b->full_at, &full_at, next, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
    return 1;
}

/* Whether an error to dst (network order) may leave at now (ns): both
 * dst's allowance and the node's budget hold one, and it is taken from
 * both. */
static inline int ipf_icmp_allow(ipf_icmp_dests *d, ipf_icmp_budget *node, uint32_t dst, uint64_t now)
{
    uint64_t now_ms = now / 1000000u;
    ipf_rl_slot *p = &d->slot[ipf_addr_slot(dst, IPF_RL_BITS)];
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
    if (t < IPF_RL_INTERVAL_MS || !ipf_icmp_budget_take(node, now))
        return 0;
    p->tokens_ms -= IPF_RL_INTERVAL_MS;
    return 1;
}

#endif
