from libc.stdint cimport uint8_t, uint32_t, uint64_t

cdef extern from "icmp.h" nogil:
    enum:
        IPF_ICMP_MAX
    uint32_t ipf_icmp_error(uint8_t *out, uint32_t src, const uint8_t *pkt, uint32_t len,
                            uint8_t type, uint8_t code, uint32_t info)
    ctypedef struct ipf_icmp_budget:
        pass
    ctypedef struct ipf_icmp_dests:
        pass
    ctypedef struct ipf_icmp_sender:
        int fd
        uint32_t src
        ipf_icmp_budget *budget
        ipf_icmp_dests dests
        uint8_t buf[IPF_ICMP_MAX]
    int ipf_icmp_allow(ipf_icmp_dests *d, ipf_icmp_budget *node, uint32_t dst, uint64_t now)
