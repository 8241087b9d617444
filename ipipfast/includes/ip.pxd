cdef extern from "ip.h" nogil:
    enum:
        IPF_ETH_HLEN
        IPF_IP_HLEN
        IPF_ENCAP_HLEN
