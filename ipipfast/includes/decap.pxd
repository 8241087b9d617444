from libc.stdint cimport uint8_t, uint32_t
from .table cimport ipf_table

cdef extern from "decap.h" nogil:
    int ipf_decap(const ipf_table *t, uint32_t local, int check_mac, uint8_t *frame, uint32_t caplen,
                  uint8_t **inner_out, uint32_t *inner_len, uint32_t *peer_out)
