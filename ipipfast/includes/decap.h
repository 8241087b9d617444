/* IPIP decapsulation: validates a received frame and points into it; the
 * inner ECN field as RFC 6040 and include/net/inet_ecn.h set it. */
#ifndef IPF_DECAP_H
#define IPF_DECAP_H

#include <stdint.h>
#include <string.h>
#include "ip.h"
#include "csum.h"
#include "counters.h"
#include "table.h"

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
 * finds the inner packet in it and the sender's peer index. Checks what ip_rcv and ipip_rcv check, plus
 * what tunl0 does not (it takes IPIP from anyone and delivers any inner
 * packet):
 * - the sender is a known peer;
 * - with check_mac, the frame comes from that peer's next hop on the
 *   underlay, the MAC the table holds for sending to it (the peer's own when
 *   on-link, its gateway's when routed): an L2 reverse-path check, which
 *   stops a peer's address spoofed from outside its link;
 * - the inner packet is no tunnel again and not addressed to a node's
 *   underlay address (ours or a peer's): no peer's pods send such packets
 *   (Calico drops pods' IPIP), and the node would deliver them to its own
 *   stack or forward them to the other node as if they were its own.
 * Always inlined: GCC would otherwise call its later part out of line from
 * a loop with other work (ipa-split), 2 ns a frame. */
static inline __attribute__((always_inline)) int ipf_decap(const ipf_table *t, uint32_t local, int check_mac,
                                                           uint8_t *frame, uint32_t caplen, uint8_t **inner_out,
                                                           uint32_t *inner_len, uint32_t *peer_out)
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
    int32_t p = ipf_peer_find(t, ipf_get32n(ip + 12));
    if (p < 0)
        return IPF_RX_UNKNOWN_PEER;
    if (check_mac) {
        const ipf_peer *peer = &t->peers[p];  /* the line the lookup just read */
        if (!peer->has_mac)
            return IPF_RX_NO_NEIGH;
        if (memcmp(frame + 6, peer->mac, 6) != 0)
            return IPF_RX_SOURCE_MAC;
    }

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
    if (in[9] == IPF_PROTO_IPIP)
        return IPF_RX_INNER_IPIP;
    uint32_t in_dst = ipf_get32n(in + 16);
    if (in_dst == local)
        return IPF_RX_INNER_TO_LOCAL;
    if (ipf_peer_find(t, in_dst) >= 0)
        return IPF_RX_INNER_TO_PEER;
    int r = ipf_ecn_decap(ip[1], in);
    if (r != IPF_RX_OK)
        return r;
    *inner_out = in;
    *inner_len = in_tot;  /* trailing bytes past the inner total length are padding */
    *peer_out = (uint32_t)p;
    return IPF_RX_OK;
}

#endif
