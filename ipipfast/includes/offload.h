/* TUN offloads (virtio_net_hdr): segmentation of the GSO super-packets the
 * TUN hands us, and coalescing of received TCP segments into one (GRO).
 *
 * Segmentation never copies a payload: each segment is two iovecs, its
 * rewritten headers in a scratch slot and its payload slice in place in the
 * read buffer. Coalescing likewise gathers payloads straight from the ring.
 * The rules follow the kernel's tcp_gso_segment / udp4_ufo_fragment and
 * tcp_gro_receive, so what reaches a pod is what the kernel would deliver.
 */
#ifndef IPF_OFFLOAD_H
#define IPF_OFFLOAD_H

#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <linux/virtio_net.h>
#include "ip.h"
#include "csum.h"
#include "encap.h"

#ifndef VIRTIO_NET_HDR_GSO_UDP_L4
#define VIRTIO_NET_HDR_GSO_UDP_L4 5  /* uapi since 6.2; older headers lack it */
#endif

#define IPF_VNET_HLEN ((uint32_t)sizeof(struct virtio_net_hdr))
#define IPF_SEG_SLOT 256   /* scratch per segment: Ethernet + outer + inner IPv4 + L4 headers */
#define IPF_TCP_FIN 0x01
#define IPF_TCP_SYN 0x02
#define IPF_TCP_RST 0x04
#define IPF_TCP_PSH 0x08
#define IPF_TCP_URG 0x20
#define IPF_TCP_CWR 0x80
#define IPF_GRO_MAX_SEGS 64
#define IPF_GRO_MAX_LEN 65535

/* Sum of the IPv4 pseudo-header for an L4 length. */
static inline uint32_t ipf_pseudo_sum(const uint8_t *ip, uint8_t proto, uint32_t l4_len)
{
    uint32_t sum = ipf_csum_add(0, ip + 12, 8);
    uint16_t w[2] = {htons(proto), htons((uint16_t)l4_len)};
    return ipf_csum_add(sum, w, 4);
}

/* What the checksum field holds while the checksum is left partial
 * (CHECKSUM_PARTIAL): the folded pseudo-header sum, not complemented. */
static inline uint16_t ipf_partial_csum(uint32_t pseudo_sum)
{
    return (uint16_t)~ipf_csum_fold(pseudo_sum);
}

/* Whether a partial checksum at start + offset (its 2 bytes) lies within len. */
static inline int ipf_csum_fits(uint32_t len, uint32_t start, uint32_t offset)
{
    return start + offset + 2 <= len;
}

/* Completes a checksum the sender left partial (VIRTIO_NET_HDR_F_NEEDS_CSUM,
 * as skb_checksum_help): the field holds the pseudo-header sum already.
 * The caller has checked ipf_csum_fits. */
static inline void ipf_csum_complete(uint8_t *pkt, uint32_t len, uint16_t start, uint16_t offset)
{
    uint16_t c = ipf_csum(pkt + start, len - start);
    if (c == 0 && pkt[9] == IPF_PROTO_UDP)
        c = 0xffff;  /* UDP sends a computed zero as all ones */
    memcpy(pkt + start + offset, &c, 2);
}

/* ---- segmentation (encap side) ----------------------------------------- */

typedef struct {
    uint32_t hlen;      /* inner IPv4 + L4 header bytes */
    uint32_t mss;       /* payload bytes per segment */
    uint32_t nseg;
    uint8_t proto;
} ipf_gso_plan;

/* Checks a GSO super-packet and plans its segments; 0 or a TX drop reason. */
static inline int ipf_gso_plan_of(const struct virtio_net_hdr *vh, const uint8_t *pkt, uint32_t n,
                                  uint32_t mtu, ipf_gso_plan *plan)
{
    uint32_t ihl = (uint32_t)(pkt[0] & 0x0f) * 4, l4;
    uint8_t type = vh->gso_type & ~VIRTIO_NET_HDR_GSO_ECN;
    if (type == VIRTIO_NET_HDR_GSO_TCPV4) {
        if (pkt[9] != IPF_PROTO_TCP || n < ihl + 20)
            return IPF_TX_BAD_HEADER;
        l4 = (uint32_t)(pkt[ihl + 12] >> 4) * 4;
        if (l4 < 20)
            return IPF_TX_BAD_HEADER;
        plan->proto = IPF_PROTO_TCP;
    } else if (type == VIRTIO_NET_HDR_GSO_UDP_L4) {
        if (pkt[9] != IPF_PROTO_UDP)
            return IPF_TX_BAD_HEADER;
        l4 = 8;
        plan->proto = IPF_PROTO_UDP;
    } else {
        return IPF_TX_NOT_IPV4;  /* TCPV6 and the like: not IPv4 */
    }
    plan->hlen = ihl + l4;
    plan->mss = vh->gso_size;
    if (plan->hlen > n || plan->hlen + IPF_ENCAP_HLEN > IPF_SEG_SLOT || plan->mss == 0)
        return IPF_TX_BAD_HEADER;
    if (plan->hlen + plan->mss + IPF_IP_HLEN > mtu)
        return IPF_TX_TOO_BIG;  /* mtu: the peer's path MTU */
    uint32_t payload = n - plan->hlen;
    plan->nseg = payload ? (payload + plan->mss - 1) / plan->mss : 1;
    return IPF_TX_OK;
}

/* The checksum field's offset in an L4 header, 0 for other protocols. */
static inline uint16_t ipf_l4_csum_offset(uint8_t proto)
{
    return proto == IPF_PROTO_TCP ? 16 : proto == IPF_PROTO_UDP ? 6 : 0;
}

/* Leaves a frame's L4 checksum to the device (CHECKSUM_PARTIAL): the field
 * must hold the pseudo-header sum; start counts from the frame's first byte. */
static inline void ipf_vnet_partial(struct virtio_net_hdr *vh, uint16_t start, uint16_t offset)
{
    vh->flags = VIRTIO_NET_HDR_F_NEEDS_CSUM;
    vh->csum_start = start;
    vh->csum_offset = offset;
}

/* Writes segment i of pkt into slot (headers, encapsulated) and points iov
 * at it and its payload slice; returns the segment's inner length. With
 * partial, the L4 checksum holds the pseudo-header sum only, for the device
 * to complete (ipf_vnet_partial); otherwise it is computed here. */
static inline uint32_t ipf_gso_segment(const ipf_tunnel *tn, const uint8_t *src_mac, const ipf_peer *peer,
                                       const uint8_t *pkt, uint32_t n, const ipf_gso_plan *plan, uint32_t i,
                                       uint16_t outer_id, int partial, uint8_t *slot, struct iovec *iov)
{
    uint32_t ihl = (uint32_t)(pkt[0] & 0x0f) * 4, off = plan->hlen + i * plan->mss;
    uint32_t seg = n - off < plan->mss ? n - off : plan->mss, l4_len = plan->hlen - ihl + seg;
    uint8_t *in = slot + IPF_ENCAP_HLEN, *l4 = in + ihl;
    memcpy(in, pkt, plan->hlen);
    ipf_put16(in + 2, (uint16_t)(plan->hlen + seg));
    ipf_put16(in + 4, (uint16_t)(ipf_get16(pkt + 4) + i));  /* as the kernel: one ID per segment */
    in[10] = in[11] = 0;
    uint16_t c = ipf_csum(in, ihl);
    memcpy(in + 10, &c, 2);
    if (plan->proto == IPF_PROTO_TCP) {
        uint32_t seq;
        memcpy(&seq, l4 + 4, 4);
        seq = htonl(ntohl(seq) + i * plan->mss);
        memcpy(l4 + 4, &seq, 4);
        if (i + 1 < plan->nseg)
            l4[13] &= (uint8_t)~(IPF_TCP_FIN | IPF_TCP_PSH);
        if (i > 0)
            l4[13] &= (uint8_t)~IPF_TCP_CWR;
    } else {
        ipf_put16(l4 + 4, (uint16_t)l4_len);
    }
    uint16_t at = ipf_l4_csum_offset(plan->proto);
    l4[at] = l4[at + 1] = 0;
    uint32_t sum = ipf_pseudo_sum(in, plan->proto, l4_len);
    if (partial) {
        c = ipf_partial_csum(sum);
    } else {
        sum = ipf_csum_add(sum, l4, plan->hlen - ihl);
        c = ipf_csum_fold(ipf_csum_add(sum, pkt + off, seg));
        if (c == 0 && plan->proto == IPF_PROTO_UDP)
            c = 0xffff;  /* UDP sends a computed zero as all ones */
    }
    memcpy(l4 + at, &c, 2);
    ipf_encap_write(tn, src_mac, peer, in, plan->hlen + seg, outer_id);
    iov[0].iov_base = slot;
    iov[0].iov_len = IPF_ENCAP_HLEN + plan->hlen;
    iov[1].iov_base = (void *)(pkt + off);
    iov[1].iov_len = seg;
    return plan->hlen + seg;
}

/* ---- checksums of received frames ---------------------------------------- */

/* Where the checksum that a received frame left partial (its sender handed
 * it to a device that completes it, as a local sender or veth does) lies in
 * the inner packet that starts inner_off bytes into the frame: 0 and *start
 * (from the inner's first byte), or -1 when it lies outside the inner L4. */
static inline int ipf_rx_partial(const struct virtio_net_hdr *vh, uint32_t inner_off, const uint8_t *in,
                                 uint32_t len, uint16_t *start)
{
    uint32_t ihl = (uint32_t)(in[0] & 0x0f) * 4;
    if (vh->csum_start < inner_off + ihl)
        return -1;
    uint32_t s = vh->csum_start - inner_off;
    if (!ipf_csum_fits(len, s, vh->csum_offset))
        return -1;
    *start = (uint16_t)s;
    return 0;
}

/* ---- coalescing (decap side) -------------------------------------------- */

typedef struct {
    uint8_t *first;        /* the first segment: its headers become the super-packet's */
    uint32_t hlen;         /* its IPv4 + TCP/UDP header bytes */
    uint32_t mss;          /* payload of the first segment: the others must match it */
    uint32_t total;        /* IPv4 total length so far */
    uint32_t next_seq;     /* TCP */
    uint32_t nseg;
    uint32_t niov;
    uint8_t proto;         /* IPF_PROTO_TCP or IPF_PROTO_UDP */
    uint8_t id_step;       /* 1: IDs count up; 0: fixed (only with DF), as the kernel accepts */
    uint8_t closed;        /* a short or PSH segment ends the train */
    uint8_t partial;       /* the first segment's checksum is left to the receiver (CHECKSUM_PARTIAL) */
    uint32_t born;         /* when it started, in trains started by its set (the oldest goes first) */
    uint32_t round;        /* the set's round in which it last grew */
    struct virtio_net_hdr vh;
    struct iovec iov[IPF_GRO_MAX_SEGS + 2];
} ipf_gro;

/* The trains open at once, one per flow, as the kernel's GRO keeps one
 * per flow in each of its GRO_HASH_BUCKETS: segments of interleaved flows
 * (several TCP streams through one ring) still merge. */
#define IPF_GRO_FLOWS 8

typedef struct {
    ipf_gro train[IPF_GRO_FLOWS];
    uint32_t born;         /* trains started so far */
    uint32_t round;        /* the caller's count of ring drains */
} ipf_gro_set;

/* The protocol in which GRO can merge this inner packet, or 0. Over IPv4
 * without options, not a fragment, with payload: TCP with no flag but
 * ACK/PSH/ECE (CWR flushes in the kernel's GRO too), and, where the TUN
 * takes UDP GSO packets (udp), UDP with a checksum (a missing one would be
 * made on the way out). The checksum must be right; trusted: the kernel
 * vouches for it (the sender's device completes it, or the NIC verified
 * it), so it is not summed here. */
static inline uint8_t ipf_gro_eligible(const uint8_t *in, uint32_t len, int trusted, int udp)
{
    if (in[0] != 0x45 || len < 29 || (ipf_get16(in + 6) & (IPF_IP_MF | IPF_IP_OFFMASK)))
        return 0;
    const uint8_t *l4 = in + 20;
    if (in[9] == IPF_PROTO_TCP) {
        uint32_t thl = (uint32_t)(l4[12] >> 4) * 4;
        if (thl < 20 || 20 + thl >= len ||
            (l4[13] & (IPF_TCP_FIN | IPF_TCP_SYN | IPF_TCP_RST | IPF_TCP_URG | IPF_TCP_CWR)))
            return 0;
    } else if (in[9] == IPF_PROTO_UDP && udp) {
        if (ipf_get16(l4 + 4) != len - 20 || ipf_get16(l4 + 6) == 0)
            return 0;
    } else {
        return 0;
    }
    if (!trusted) {
        uint32_t sum = ipf_pseudo_sum(in, in[9], len - 20);
        if (ipf_csum_fold(ipf_csum_add(sum, l4, len - 20)) != 0)
            return 0;  /* verified, as GRO does: a bad one goes on alone, for the stack to drop */
    }
    return in[9];
}

/* IPv4 + L4 header bytes of an eligible packet of protocol proto. */
static inline uint32_t ipf_gro_hlen(const uint8_t *in, uint8_t proto)
{
    return proto == IPF_PROTO_TCP ? 20 + (uint32_t)(in[32] >> 4) * 4 : 28;
}

/* Starts a train with in, of protocol proto (from ipf_gro_eligible);
 * partial: its checksum holds only the pseudo-header sum. */
static inline void ipf_gro_start(ipf_gro *g, uint8_t *in, uint32_t len, uint8_t proto, int partial)
{
    g->first = in;
    g->proto = proto;
    g->hlen = ipf_gro_hlen(in, proto);
    g->mss = len - g->hlen;
    g->total = len;
    if (proto == IPF_PROTO_TCP) {
        uint32_t seq;
        memcpy(&seq, in + 24, 4);
        g->next_seq = ntohl(seq) + g->mss;
        g->closed = (in[33] & IPF_TCP_PSH) != 0;
    } else {
        g->closed = 0;
    }
    g->nseg = 1;
    g->partial = partial != 0;
    g->iov[1].iov_base = in;
    g->iov[1].iov_len = len;
    g->niov = 2;
}

/* Appends in, of the train's flow (ipf_gro_join matched its protocol,
 * addresses and ports), when it continues the train exactly: the same
 * header fields, the next IP ID (or a fixed one with DF), no larger than
 * the first; for TCP also the next sequence number, the same ACK, flags and
 * options (tcp_gro_receive's flush rules), for UDP the same size, which
 * the GSO packet's segments must all have but the last (as
 * udp_gro_receive_segment). 1, else 0. */
static inline int ipf_gro_append(ipf_gro *g, uint8_t *in, uint32_t len)
{
    const uint8_t *f = g->first;
    if (g->closed || g->nseg >= IPF_GRO_MAX_SEGS)
        return 0;
    /* in is eligible (ipf_gro_eligible): its headers are all there */
    uint32_t hlen = ipf_gro_hlen(in, g->proto);
    uint32_t seg = len - hlen, seq;
    if (hlen != g->hlen || seg > g->mss || g->total + seg > IPF_GRO_MAX_LEN)
        return 0;
    /* tos, DF, ttl: as in the first */
    if (in[1] != f[1] || ((in[6] ^ f[6]) & 0x40) || in[8] != f[8])
        return 0;
    if (g->proto == IPF_PROTO_TCP) {
        if (memcmp(in + 28, f + 28, 4) || ((in[33] ^ f[33]) & ~IPF_TCP_PSH) ||
            memcmp(in + 40, f + 40, hlen - 40))
            return 0;
        memcpy(&seq, in + 24, 4);
        if (ntohl(seq) != g->next_seq)
            return 0;
    }
    uint16_t id = ipf_get16(in + 4), first_id = ipf_get16(f + 4);
    if (g->nseg == 1)
        g->id_step = id != first_id;
    if (id != (uint16_t)(first_id + g->id_step * g->nseg) || (!g->id_step && !(f[6] & 0x40)))
        return 0;
    g->iov[g->niov].iov_base = in + hlen;
    g->iov[g->niov].iov_len = seg;
    g->niov++;
    g->nseg++;
    g->total += seg;
    g->next_seq += seg;
    if (seg < g->mss || (g->proto == IPF_PROTO_TCP && (in[33] & IPF_TCP_PSH))) {
        g->closed = 1;
        if (g->proto == IPF_PROTO_TCP)
            ((uint8_t *)f)[33] |= in[33] & IPF_TCP_PSH;
    }
    return 1;
}

/* 1 when nothing more can join the train: a PSH or short segment ended
 * it, or it holds as many segments or bytes as a GSO packet may. */
static inline int ipf_gro_full(const ipf_gro *g)
{
    return g->closed || g->nseg >= IPF_GRO_MAX_SEGS || g->total + g->mss > IPF_GRO_MAX_LEN;
}

/* The oldest open train of the set, or -1: trains are written in the
 * order they started. */
static inline int ipf_gro_oldest(const ipf_gro_set *s)
{
    int oldest = -1;
    for (int k = 0; k < IPF_GRO_FLOWS; k++)
        if (s->train[k].nseg && (oldest < 0 || (int32_t)(s->train[k].born - s->train[oldest].born) < 0))
            oldest = k;
    return oldest;
}

/* Offers an eligible packet (proto from ipf_gro_eligible) to the set.
 * Returns k >= 0 when it joined train k. Otherwise it starts a train at
 * -(k + 1) (ipf_gro_begin), after the caller has written what is there: the
 * train of its own flow, which it could not continue, or the oldest train
 * when all places are taken. */
static inline int ipf_gro_join(ipf_gro_set *s, uint8_t *in, uint32_t len)
{
    int place = -1;
    for (int k = 0; k < IPF_GRO_FLOWS; k++) {
        ipf_gro *g = &s->train[k];
        if (!g->nseg) {
            if (place < 0)
                place = k;
        } else if (g->proto == in[9] && !memcmp(g->first + 12, in + 12, 12)) {  /* addresses, ports */
            if (!ipf_gro_append(g, in, len))
                return -(k + 1);
            g->round = s->round;
            return k;
        }
    }
    return -((place >= 0 ? place : ipf_gro_oldest(s)) + 1);
}

/* Starts train k of the set with in (see ipf_gro_join). */
static inline void ipf_gro_begin(ipf_gro_set *s, int k, uint8_t *in, uint32_t len, uint8_t proto, int partial)
{
    ipf_gro_start(&s->train[k], in, len, proto, partial);
    s->train[k].born = s->born++;
    s->train[k].round = s->round;
}

/* The end of a batch. A train waits for more only while its flow keeps
 * coming: one that did not grow in this batch is written, or a flow gone
 * quiet would hold its slots while the others keep the loop busy; so is a
 * full one, and every one unless hold (trains may stay open across
 * batches). Puts the trains to write now in due, in place order, returns
 * how many, and starts the next round. */
static inline uint32_t ipf_gro_batch_end(ipf_gro_set *s, int hold, int *due)
{
    uint32_t n = 0;
    for (int k = 0; k < IPF_GRO_FLOWS; k++) {
        const ipf_gro *g = &s->train[k];
        if (g->nseg && (!hold || g->round != s->round || ipf_gro_full(g)))
            due[n++] = k;
    }
    s->round++;
    return n;
}

/* Every open train, in the order they started: how they are all written
 * when no more is looked for (the ring ran dry), or before a packet that
 * joins none, which comes after its flow's train. Returns how many. */
static inline uint32_t ipf_gro_all(const ipf_gro_set *s, int *order)
{
    uint32_t n = 0;
    for (int k = 0; k < IPF_GRO_FLOWS; k++) {
        if (!s->train[k].nseg)
            continue;
        uint32_t i = n++;
        for (; i > 0 && (int32_t)(s->train[k].born - s->train[order[i - 1]].born) < 0; i--)
            order[i] = order[i - 1];
        order[i] = k;
    }
    return n;
}

/* Finishes the super-packet's headers and virtio_net_hdr; returns the
 * number of iovecs to write (iov[0] is the virtio_net_hdr). */
static inline uint32_t ipf_gro_finish(ipf_gro *g)
{
    uint8_t *f = g->first;
    uint16_t at = ipf_l4_csum_offset(g->proto);
    memset(&g->vh, 0, sizeof(g->vh));
    if (g->nseg > 1) {
        ipf_put16(f + 2, (uint16_t)g->total);
        f[10] = f[11] = 0;
        uint16_t c = ipf_csum(f, 20);
        memcpy(f + 10, &c, 2);
        if (g->proto == IPF_PROTO_UDP)
            ipf_put16(f + 24, (uint16_t)(g->total - 20));  /* segmentation scales it back per datagram */
        /* Partial checksum: the pseudo-header sum, completed by whoever
         * segments or delivers it (every segment was verified above). */
        uint16_t pseudo = ipf_partial_csum(ipf_pseudo_sum(f, g->proto, g->total - 20));
        memcpy(f + 20 + at, &pseudo, 2);
        ipf_vnet_partial(&g->vh, 20, at);
        g->vh.gso_type = g->proto == IPF_PROTO_TCP ? VIRTIO_NET_HDR_GSO_TCPV4 : VIRTIO_NET_HDR_GSO_UDP_L4;
        g->vh.hdr_len = (uint16_t)g->hlen;
        g->vh.gso_size = (uint16_t)g->mss;
    } else if (g->partial) {
        ipf_vnet_partial(&g->vh, 20, at);
    }
    g->iov[0].iov_base = &g->vh;
    g->iov[0].iov_len = IPF_VNET_HLEN;
    return g->niov;
}

#endif
