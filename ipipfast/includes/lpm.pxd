from libc.stdint cimport uint32_t

cdef extern from "lpm.h" nogil:
    ctypedef struct ipf_lpm_route:
        uint32_t prefix
        uint32_t len
        uint32_t value
    ctypedef struct ipf_lpm:
        uint32_t n_groups
    int ipf_lpm_build(ipf_lpm *t, const ipf_lpm_route *routes, size_t n)
    void ipf_lpm_free(ipf_lpm *t)
    uint32_t ipf_lpm_lookup(const ipf_lpm *t, uint32_t addr)
    uint32_t IPF_LPM_MAX_VALUE
