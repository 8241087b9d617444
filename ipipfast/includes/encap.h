/* IPIP (RFC 2003) encapsulation of an inner packet in place: it sits at pkt
 * with at least IPF_ENCAP_HLEN bytes of headroom before it, where the
 * Ethernet and outer IPv4 headers are written, so the payload is never
 * copied. Field rules follow net/ipv4/ip_tunnel.c (ip_tunnel_xmit) and
 * include/net/inet_ecn.h so that peers cannot tell us from tunl0. */
#ifndef IPF_ENCAP_H
#define IPF_ENCAP_H

#include <stdint.h>
#include <string.h>
#include "ip.h"
#include "csum.h"
#include "counters.h"
#include "table.h"

/* The outer-header rules. */
typedef struct {
    uint32_t src;          /* this node's underlay IPv4, network order */
    uint8_t ttl;           /* 0: inherit the inner TTL */
    uint8_t tos;           /* outer DSCP when !tos_inherit (ECN bits come from the inner) */
    uint8_t tos_inherit;
    uint8_t df_fixed;      /* pmtudisc: DF always set */
    uint8_t df_inherit;    /* !ignore_df: DF copied from the inner */
    uint32_t mtu;          /* largest outer IPv4 packet the underlay carries: the
                              control thread changes it while the loops run */
} ipf_tunnel;

/* The largest outer packet the underlay carries now. */
static inline uint32_t ipf_link_mtu(const ipf_tunnel *tn)
{
    return __atomic_load_n(&tn->mtu, __ATOMIC_RELAXED);
}

/* The largest outer packet toward peer: its path MTU when one was learned. */
static inline uint32_t ipf_peer_mtu(const ipf_tunnel *tn, const ipf_peer *p)
{
    uint32_t pmtu = __atomic_load_n(&p->pmtu, __ATOMIC_RELAXED), link = ipf_link_mtu(tn);
    return pmtu && pmtu < link ? pmtu : link;
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
        (tot + IPF_IP_HLEN > ipf_link_mtu(tn) || (ipf_get16(pkt + 6) & IPF_IP_DF)))
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

/* Writes the Ethernet (from src_mac) and outer IPv4 headers in front of pkt
 * (len bytes). */
static inline void ipf_encap_write(const ipf_tunnel *tn, const uint8_t *src_mac, const ipf_peer *peer,
                                   uint8_t *pkt, uint32_t len, uint16_t id)
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
    memcpy(eth + 6, src_mac, 6);
    eth[12] = 0x08;
    eth[13] = 0x00;
}

#endif
