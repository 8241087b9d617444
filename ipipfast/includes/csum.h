/* Internet checksum (RFC 1071) helpers for the hot path. */
#ifndef IPF_CSUM_H
#define IPF_CSUM_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* One's-complement sum of len bytes, in network byte order, added to sum. */
static inline uint32_t ipf_csum_add(uint32_t sum, const void *buf, size_t len)
{
    const uint8_t *p = (const uint8_t *)buf;
    uint64_t acc = sum;
    while (len >= 8) {
        uint32_t a, b;
        memcpy(&a, p, 4);
        memcpy(&b, p + 4, 4);
        acc += (uint64_t)a + b;
        p += 8;
        len -= 8;
    }
    if (len >= 4) {
        uint32_t a;
        memcpy(&a, p, 4);
        acc += a;
        p += 4;
        len -= 4;
    }
    if (len >= 2) {
        uint16_t a;
        memcpy(&a, p, 2);
        acc += a;
        p += 2;
        len -= 2;
    }
    if (len)
        acc += *p;  /* little-endian host: the odd byte is the low byte of a word */
    while (acc >> 32)
        acc = (acc & 0xffffffffu) + (acc >> 32);
    return (uint32_t)acc;
}

static inline uint16_t ipf_csum_fold(uint32_t sum)
{
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)~sum;
}

/* Checksum of a buffer; 0 when the buffer already holds a correct checksum. */
static inline uint16_t ipf_csum(const void *buf, size_t len)
{
    return ipf_csum_fold(ipf_csum_add(0, buf, len));
}

/* RFC 1624 incremental update of a checksum field when a 16-bit word changes. */
static inline uint16_t ipf_csum_replace16(uint16_t check, uint16_t old, uint16_t new_)
{
    uint32_t sum = (uint16_t)~check;
    sum += (uint16_t)~old;
    sum += new_;
    return ipf_csum_fold(sum);
}

#endif
