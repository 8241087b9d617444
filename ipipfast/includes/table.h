/* The forwarding table that the packet loops read (routes by LPM, peers by
 * address), its swap under quiescent-state-based reclamation, and the
 * atomics that the loops and the control thread share. */
#ifndef IPF_TABLE_H
#define IPF_TABLE_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "ip.h"
#include "lpm.h"

typedef struct {
    uint32_t ip;           /* network order */
    uint8_t mac[6];        /* next hop on the underlay: the peer or its gateway */
    uint8_t has_mac;
    uint8_t _pad;
    uint32_t pmtu;         /* path MTU learned from ICMP (outer bytes); 0: the link's */
} ipf_peer;

/* One loop's packets and inner bytes toward a peer (tx: queued to the
 * device) or from it (rx: decapsulated). */
typedef struct {
    uint64_t packets, bytes;
} ipf_peer_count;

/* Everything the packet loops read, swapped whole (see qsbr below). */
typedef struct {
    ipf_lpm lpm;           /* inner destination -> peer index */
    ipf_peer *peers;
    uint32_t n_peers;
    uint32_t slot_bits;    /* peer_slots: open addressing, peer ip -> index + 1 */
    uint32_t *peer_slots;
    uint8_t src_mac[6];    /* this node's on the underlay, the source of every frame: it may change too */
    uint64_t generation;
    /* Per-peer counts, a row per loop (ipf_table_counts): each row is
     * written by its loop only, and starts on its own cache line, so no
     * two loops share one. They live and go with the table, as the peer
     * indexes do: the control thread folds them into its totals once no
     * loop can write them any more, before it frees the table. */
    ipf_peer_count *counts;
    uint32_t count_rows;
    uint32_t count_stride; /* entries per row: n_peers rounded up to whole cache lines */
} ipf_table;

/* The row of counts of loop `row`, indexed by peer. */
static inline ipf_peer_count *ipf_table_counts(const ipf_table *t, uint32_t row)
{
    return t->counts + (size_t)row * t->count_stride;
}

static inline void ipf_peer_count_add(ipf_peer_count *c, uint32_t bytes)
{
    c->packets++;
    c->bytes += bytes;
}

/* Index of the peer with this address (network order), or -1. */
static inline int32_t ipf_peer_find(const ipf_table *t, uint32_t ip)
{
    uint32_t mask = (1u << t->slot_bits) - 1;
    for (uint32_t s = ipf_addr_slot(ip, t->slot_bits);; s = (s + 1) & mask) {
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
    free(t->counts);
    free(t->peers);
    free(t->peer_slots);
    free(t);
}

/* (Re)allocates t's counts, zeroed, for `rows` loops; only while no loop
 * reads t. -1 when out of memory. */
static int ipf_table_alloc_counts(ipf_table *t, uint32_t rows)
{
    const uint32_t line = 64 / sizeof(ipf_peer_count);
    size_t size;
    free(t->counts);
    t->count_rows = rows;
    t->count_stride = (t->n_peers + line - 1) / line * line;
    size = (size_t)rows * t->count_stride * sizeof(ipf_peer_count);
    t->counts = (ipf_peer_count *)aligned_alloc(64, size ? size : 64);
    if (!t->counts)
        return -1;
    memset(t->counts, 0, size);
    return 0;
}

/* Builds a table, with counts for count_rows loops; routes' values are peer
 * indexes. NULL when out of memory or a route names a peer that does not
 * exist. */
static ipf_table *ipf_table_build(const ipf_lpm_route *routes, size_t n_routes, const ipf_peer *peers,
                                  uint32_t n_peers, const uint8_t *src_mac, uint64_t generation,
                                  uint32_t count_rows)
{
    ipf_table *t = (ipf_table *)calloc(1, sizeof(*t));
    if (!t)
        return NULL;
    memcpy(t->src_mac, src_mac, 6);
    t->generation = generation;
    t->n_peers = n_peers;
    t->slot_bits = 4;
    while ((1u << t->slot_bits) < 2 * n_peers)
        t->slot_bits++;
    t->peers = (ipf_peer *)malloc((n_peers ? n_peers : 1) * sizeof(ipf_peer));
    t->peer_slots = (uint32_t *)calloc((size_t)1 << t->slot_bits, sizeof(uint32_t));
    if (!t->peers || !t->peer_slots || ipf_table_alloc_counts(t, count_rows) < 0)
        goto fail;
    memcpy(t->peers, peers, n_peers * sizeof(ipf_peer));
    for (uint32_t i = 0; i < n_peers; i++) {
        uint32_t mask = (1u << t->slot_bits) - 1, s = ipf_addr_slot(peers[i].ip, t->slot_bits);
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
} __attribute__((aligned(64))) ipf_qsbr;  /* own cache line */

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
