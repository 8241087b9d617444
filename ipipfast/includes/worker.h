/* A worker's two packet loops, each with its own state under mirrored
 * names: the encap loop's (ipf_tx: TUN reads -> a PACKET_TX_RING) and the
 * decap loop's (ipf_rx: a PACKET_RX_RING -> TUN writes); what every
 * worker's loops share (ipf_shared); and the TX ring's bookkeeping, free
 * of system calls so that a test drives it on a ring in plain memory, with
 * slot statuses set as the kernel sets them. */
#ifndef IPF_WORKER_H
#define IPF_WORKER_H

#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <linux/if_packet.h>
#include <linux/virtio_net.h>
#include "counters.h"
#include "table.h"
#include "encap.h"
#include "icmp.h"
#include "offload.h"

/* A PACKET_MMAP ring of TPACKET_V2 slots. */
typedef struct {
    uint8_t *base;         /* slot i at base + i * frame_size */
    size_t bytes;          /* mapped */
    uint32_t frame_size;
    uint32_t frames;       /* a power of two */
    uint32_t head;         /* tx: the next slot to fill; rx: the next to read */
} ipf_ring;

static inline struct tpacket2_hdr *ipf_ring_slot(const ipf_ring *r, uint32_t i)
{
    return (struct tpacket2_hdr *)(r->base + (size_t)i * r->frame_size);
}

/* Busy polling (busy_poll): how long an idle loop may spin for work before
 * it sleeps, from what it has learned. A spin pays only when work comes
 * before it ends, so a loop spins only while its idle gaps (from the end of
 * its work to the next) average at most twice the longest spin: a gap it
 * slept through includes its wake-up, and the round trip it slowed, so a
 * tighter bound would stop a ping-pong's spinning for good once a stall had
 * pushed the average up. And it spins no longer than its budget allows, a
 * share of one CPU that it earns by the clock. Free of system calls: the
 * loop passes the time in. */
typedef struct {
    uint64_t max_ns;       /* the longest spin; 0: never spin */
    uint32_t budget_pct;   /* the share of one CPU it may spend spinning */
    uint64_t tokens_ns;    /* spinning time earned and not spent */
    uint64_t earned_ns;    /* when tokens were last earned */
    uint64_t gap_ns;       /* the idle gaps' average (an EWMA of 1/8) */
} ipf_spin;

/* How long to spin now that the loop is idle (0: sleep at once). */
static inline uint64_t ipf_spin_window(ipf_spin *s, uint64_t now)
{
    if (!s->max_ns)
        return 0;
    s->tokens_ns += (now - s->earned_ns) * s->budget_pct / 100;
    if (s->tokens_ns > 2 * s->max_ns)
        s->tokens_ns = 2 * s->max_ns;  /* a burst of two spins at most */
    s->earned_ns = now;
    if (s->gap_ns > 2 * s->max_ns)
        return 0;  /* work comes later than a spin would last */
    return s->tokens_ns < s->max_ns ? s->tokens_ns : s->max_ns;
}

/* Work came (or the loop gave up and slept until it did) at now, after an
 * idle gap that began at idle_since, of which it spent spun_ns spinning. */
static inline void ipf_spin_done(ipf_spin *s, uint64_t idle_since, uint64_t spun_ns, uint64_t now)
{
    s->tokens_ns -= spun_ns < s->tokens_ns ? spun_ns : s->tokens_ns;
    s->gap_ns += ((int64_t)(now - idle_since) - (int64_t)s->gap_ns) / 8;
}

typedef struct {
    ipf_table *table;      /* swapped by the control thread (table.h) */
    uint32_t stopping;
    uint32_t ip_id;        /* the next block of outer IP IDs */
    int stop_fd;           /* an eventfd, readable once stopping */
    ipf_icmp_budget icmp;  /* the node's, with the control thread's relayed errors */
} ipf_shared;

typedef struct {
    ipf_qsbr qsbr;
    ipf_tx_stats stats;
    uint32_t count_row;    /* its row of the table's per-peer counts */
    ipf_shared *shared;
    int fd;                /* the ring's AF_PACKET socket */
    int tun_fd;            /* read */
    ipf_ring ring;
    uint32_t data_off;     /* where a slot's virtio_net_hdr and frame start */
    uint32_t queued;       /* frames queued since the kernel last took them all */
    uint64_t queued_bytes; /* their inner bytes, counted once the kernel takes them */
    ipf_tunnel tn;
    uint32_t batch;        /* TUN reads between two send()s */
    uint8_t vnet;          /* TUN reads start with a virtio_net_hdr */
    uint8_t partial;       /* inner checksums are left to the underlay device */
    int ifindex;
    ipf_spin spin;
    uint8_t *buf;          /* the TUN read buffer */
    uint32_t buf_size;
    uint32_t ip_id, ip_id_end;
    int err;               /* the errno that ended the loop, or 0 */
    ipf_icmp_sender icmp;
    uint8_t seg_hdrs[IPF_SEG_SLOT];  /* the headers of the segment being queued */
} ipf_tx;

typedef struct {
    ipf_qsbr qsbr;
    ipf_rx_stats stats;
    uint32_t count_row;    /* its row of the table's per-peer counts */
    ipf_shared *shared;
    int fd;                /* the ring's AF_PACKET socket */
    int tun_fd;            /* written */
    ipf_ring ring;
    uint32_t local;        /* this node's underlay IPv4, network order */
    uint8_t check_mac;     /* a peer's frames must come from its next hop's MAC (decap.h) */
    uint32_t batch;        /* frames between two looks at the table */
    uint8_t vnet;          /* TUN writes start with a virtio_net_hdr */
    uint8_t ring_vnet;     /* a virtio_net_hdr precedes each frame in the ring */
    uint8_t udp_gro;       /* the TUN takes UDP GSO packets */
    uint8_t gro_hold;      /* a GRO train may stay open across batches and naps */
    uint8_t loaded;        /* napping between batches (see rx_idle) */
    uint32_t nap_min;      /* frames in a batch that start the naps */
    uint32_t coalesce_us;
    int ifindex;
    ipf_spin spin;
    int err;               /* the errno that ended the loop, or 0 */
    ipf_gro_set gro;
    uint32_t gro_slots[IPF_GRO_FLOWS][IPF_GRO_MAX_SEGS];  /* each train's ring slots */
} ipf_rx;

/* Whether the kernel would take the frame in receive slot h as this host's:
 * to our MAC (the ring's taps see another host's frame too, and a
 * broadcast or multicast, which ip_rcv would take but no peer sends IPIP
 * to), and on no VLAN that the host does not have (the kernel strips the tag
 * before its taps see the frame, and only later, finding no VLAN device for
 * it, marks it another host's; VLAN 0, a priority tag, is the host's). */
static inline int ipf_rx_for_host(const struct tpacket2_hdr *h)
{
    const struct sockaddr_ll *sll = (const struct sockaddr_ll *)((const uint8_t *)h + TPACKET_ALIGN(sizeof(*h)));
    return sll->sll_pkttype == PACKET_HOST && !((h->tp_status & TP_STATUS_VLAN_VALID) && (h->tp_vlan_tci & 0x0fff));
}

/* Hands receive slot i back to the kernel. */
static inline void ipf_rx_release(ipf_rx *rx, uint32_t i)
{
    ipf_store_status(&ipf_ring_slot(&rx->ring, i)->tp_status, TP_STATUS_KERNEL);
}

/* The slot at head may take a frame: not one queued and not yet taken,
 * nor one taken and not yet released by the device. */
static inline int ipf_tx_free(const ipf_tx *tx)
{
    return ipf_load_status(&ipf_ring_slot(&tx->ring, tx->ring.head)->tp_status) == TP_STATUS_AVAILABLE;
}

/* Copies a frame, given as niov pieces, into the slot at head (free:
 * ipf_tx_free) behind a virtio_net_hdr and queues it. Its hdr_len is the
 * whole frame, so the kernel copies the frame into the skb's linear part.
 * With tx->partial it also says that the device completes the inner
 * checksum at cstart + coff (partial), or that nothing is left to do.
 * Returns the frame's inner bytes. */
static inline uint32_t ipf_tx_put(ipf_tx *tx, const struct iovec *iov, uint32_t niov, int partial,
                              uint16_t cstart, uint16_t coff)
{
    struct tpacket2_hdr *h = ipf_ring_slot(&tx->ring, tx->ring.head);
    struct virtio_net_hdr *vh = (struct virtio_net_hdr *)((uint8_t *)h + tx->data_off);
    uint8_t *d = (uint8_t *)vh + IPF_VNET_HLEN;
    uint32_t total = 0;
    memset(vh, 0, sizeof(*vh));
    if (partial && tx->partial)
        ipf_vnet_partial(vh, cstart, coff);
    for (uint32_t j = 0; j < niov; j++) {
        memcpy(d + total, iov[j].iov_base, iov[j].iov_len);
        total += (uint32_t)iov[j].iov_len;
    }
    vh->hdr_len = (uint16_t)total;
    h->tp_len = IPF_VNET_HLEN + total;
    ipf_store_status(&h->tp_status, TP_STATUS_SEND_REQUEST);
    tx->ring.head = (tx->ring.head + 1) & (tx->ring.frames - 1);
    tx->queued++;
    tx->queued_bytes += total - IPF_ENCAP_HLEN;
    return total - IPF_ENCAP_HLEN;
}

/* After a send(): the kernel took the queued frames in ring order, as many
 * as its send buffer allowed, so those it left (still SEND_REQUEST) are the
 * last ones queued. Counts what it took. refused: the device refused them
 * (down, gone), so those it left are dropped, as a qdisc drops its queue
 * when its device goes down, and handed back, and the ring starts again at
 * the first of them, where the kernel stopped. */
static inline void ipf_tx_sent(ipf_tx *tx, int refused)
{
    uint32_t i = tx->ring.head, left = 0, mask = tx->ring.frames - 1;
    uint64_t left_bytes = 0;
    while (left < tx->queued) {
        struct tpacket2_hdr *h = ipf_ring_slot(&tx->ring, (i - 1) & mask);
        if (ipf_load_status(&h->tp_status) != TP_STATUS_SEND_REQUEST)
            break;
        i = (i - 1) & mask;
        left++;
        left_bytes += h->tp_len - IPF_VNET_HLEN - IPF_ENCAP_HLEN;
        if (refused)
            ipf_store_status(&h->tp_status, TP_STATUS_AVAILABLE);
    }
    tx->stats.packets += tx->queued - left;
    tx->stats.bytes += tx->queued_bytes - left_bytes;
    if (refused) {
        tx->stats.drops[IPF_TX_SEND_FAILED] += left;
        tx->ring.head = i;
        left = 0;
        left_bytes = 0;
    }
    tx->queued = left;
    tx->queued_bytes = left_bytes;
}

#endif
