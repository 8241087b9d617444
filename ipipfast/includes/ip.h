/* IPv4 and Ethernet header layout, byte access in network order, and the
 * address hash that the peer table and the ICMP limits use. */
#ifndef IPF_IP_H
#define IPF_IP_H

#include <stdint.h>
#include <string.h>
#include <arpa/inet.h>

#define IPF_ETH_HLEN 14
#define IPF_IP_HLEN 20
#define IPF_ENCAP_HLEN (IPF_ETH_HLEN + IPF_IP_HLEN)
#define IPF_PROTO_ICMP 1
#define IPF_PROTO_IPIP 4
#define IPF_PROTO_TCP 6
#define IPF_PROTO_UDP 17
#define IPF_IP_DF 0x4000
#define IPF_IP_MF 0x2000
#define IPF_IP_OFFMASK 0x1fff
#define IPF_ECN_NOT_ECT 0
#define IPF_ECN_ECT_1 1
#define IPF_ECN_ECT_0 2
#define IPF_ECN_CE 3

static inline uint16_t ipf_get16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return ntohs(v); }
static inline void ipf_put16(uint8_t *p, uint16_t v) { v = htons(v); memcpy(p, &v, 2); }
static inline uint32_t ipf_get32n(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }

/* One of 2^bits slots for an IPv4 address (Fibonacci hashing). */
static inline uint32_t ipf_addr_slot(uint32_t ip, uint32_t bits)
{
    return (uint32_t)(ip * 0x9E3779B1u) >> (32 - bits);
}

#endif
