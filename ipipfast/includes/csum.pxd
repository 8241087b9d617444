from libc.stdint cimport uint16_t

cdef extern from "csum.h" nogil:
    uint16_t ipf_csum(const void *buf, size_t len)
