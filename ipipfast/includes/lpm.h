/* Longest-prefix match for IPv4: DIR-24-8 (Gupta, Lin, McKeown 1998).
 *
 * tbl24 has one entry per /24; an entry is either a value or, with the
 * GROUP bit, the index of a 256-entry tbl8 group for the prefixes longer
 * than /24 inside it. A lookup is one or two memory reads.
 *
 * tbl24 is 64 MiB of address space mapped MAP_NORESERVE: untouched pages
 * read as the shared zero page (0 = no route), so a table of 100k pod
 * CIDRs commits only the pages its prefixes cover (a /8 of routes is
 * 256 KiB), not 64 MiB.
 */
#ifndef IPF_LPM_H
#define IPF_LPM_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define IPF_LPM_GROUP 0x80000000u
#define IPF_LPM_MAX_VALUE (IPF_LPM_GROUP - 2u)
#define IPF_LPM_TBL24_BYTES ((size_t)(1u << 24) * sizeof(uint32_t))

typedef struct {
    uint32_t prefix;  /* host byte order */
    uint32_t len;     /* 0..32 */
    uint32_t value;   /* 0..IPF_LPM_MAX_VALUE */
} ipf_lpm_route;

typedef struct {
    uint32_t *tbl24;  /* entries store value + 1; 0 means no route */
    uint32_t *tbl8;
    uint32_t n_groups;
    uint32_t cap_groups;
} ipf_lpm;

static inline void ipf_lpm_free(ipf_lpm *t)
{
    if (t->tbl24 && t->tbl24 != MAP_FAILED)
        munmap(t->tbl24, IPF_LPM_TBL24_BYTES);
    free(t->tbl8);
    memset(t, 0, sizeof(*t));
}

static int ipf_lpm_cmp_len(const void *a, const void *b)
{
    const ipf_lpm_route *x = (const ipf_lpm_route *)a, *y = (const ipf_lpm_route *)b;
    if (x->len != y->len)
        return x->len < y->len ? -1 : 1;
    return x->prefix < y->prefix ? -1 : x->prefix > y->prefix;
}

static inline uint32_t ipf_lpm_mask(uint32_t len)
{
    return len == 0 ? 0 : 0xffffffffu << (32 - len);
}

static int ipf_lpm_new_group(ipf_lpm *t, uint32_t fill, uint32_t *group)
{
    if (t->n_groups == t->cap_groups) {
        uint32_t cap = t->cap_groups ? t->cap_groups * 2 : 64;
        if (cap > (IPF_LPM_GROUP >> 8))
            return -1;
        uint32_t *tbl8 = (uint32_t *)realloc(t->tbl8, (size_t)cap * 256 * sizeof(uint32_t));
        if (!tbl8)
            return -1;
        t->tbl8 = tbl8;
        t->cap_groups = cap;
    }
    uint32_t *g = t->tbl8 + (size_t)t->n_groups * 256;
    for (int i = 0; i < 256; i++)
        g[i] = fill;
    *group = t->n_groups++;
    return 0;
}

/* Builds a table from routes in any order (they are sorted by length here,
 * so that longer prefixes overwrite shorter ones). Host bits are ignored.
 * Returns 0, or -1 when out of memory (t is then freed). */
static int ipf_lpm_build(ipf_lpm *t, const ipf_lpm_route *routes, size_t n)
{
    memset(t, 0, sizeof(*t));
    t->tbl24 = (uint32_t *)mmap(NULL, IPF_LPM_TBL24_BYTES, PROT_READ | PROT_WRITE,
                                MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (t->tbl24 == MAP_FAILED) {
        t->tbl24 = NULL;
        return -1;
    }
    ipf_lpm_route *sorted = (ipf_lpm_route *)malloc((n ? n : 1) * sizeof(*sorted));
    if (!sorted) {
        ipf_lpm_free(t);
        return -1;
    }
    memcpy(sorted, routes, n * sizeof(*sorted));
    qsort(sorted, n, sizeof(*sorted), ipf_lpm_cmp_len);
    for (size_t i = 0; i < n; i++) {
        uint32_t len = sorted[i].len > 32 ? 32 : sorted[i].len;
        uint32_t prefix = sorted[i].prefix & ipf_lpm_mask(len);
        uint32_t v = sorted[i].value + 1;
        if (len <= 24) {
            /* No group exists yet: every longer prefix sorts after this one. */
            uint32_t first = prefix >> 8, count = 1u << (24 - len);
            for (uint32_t j = 0; j < count; j++)
                t->tbl24[first + j] = v;
        } else {
            uint32_t *e = &t->tbl24[prefix >> 8], group;
            if (*e & IPF_LPM_GROUP) {
                group = *e & ~IPF_LPM_GROUP;
            } else {
                if (ipf_lpm_new_group(t, *e, &group) < 0) {
                    free(sorted);
                    ipf_lpm_free(t);
                    return -1;
                }
                *e = IPF_LPM_GROUP | group;
            }
            uint32_t *g = t->tbl8 + (size_t)group * 256;
            uint32_t first = prefix & 0xff, count = 1u << (32 - len);
            for (uint32_t j = 0; j < count; j++)
                g[first + j] = v;
        }
    }
    free(sorted);
    return 0;
}

/* Value + 1 of the longest prefix holding addr (host order), or 0. */
static inline uint32_t ipf_lpm_lookup(const ipf_lpm *t, uint32_t addr)
{
    uint32_t e = t->tbl24[addr >> 8];
    if (__builtin_expect(e & IPF_LPM_GROUP, 0))
        e = t->tbl8[((size_t)(e & ~IPF_LPM_GROUP) << 8) | (addr & 0xff)];
    return e;
}

#endif
