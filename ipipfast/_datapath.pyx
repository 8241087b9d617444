# The hot path: TUN -> IPIP frames into a PACKET_TX_RING, and IPIP frames
# from a PACKET_RX_RING -> TUN. Each worker has two loops (encap, decap),
# each on its own thread with the GIL released, touching no Python object
# per packet. The per-packet work is C in includes/*.h; the parts included
# here are the glue, one file per concern: the tunnel's rules and table from
# Python values, sockets and rings, the TX ring, the two loops, and the
# control API that the daemon calls.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t
from libc.stdlib cimport malloc, calloc, free
from libc.string cimport memcpy, memset

from .includes cimport system as c
from .includes.system cimport htonl, ntohl, htons, virtio_net_hdr, VIRTIO_NET_HDR_F_NEEDS_CSUM, \
    VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_GSO_NONE
from .includes.ip cimport IPF_IP_HLEN, IPF_ENCAP_HLEN
from .includes.lpm cimport ipf_lpm_route
from .includes.counters cimport *
from .includes.table cimport *
from .includes.encap cimport *
from .includes.decap cimport ipf_decap
from .includes.icmp cimport ipf_icmp_error, ipf_icmp_allow
from .includes.offload cimport *
from .includes.worker cimport *

import errno
import ipaddress
import os
import re
import threading
from types import MappingProxyType

from . import counters

include "datapath/tunnel.pyx"
include "datapath/sockets.pyx"
include "datapath/txring.pyx"
include "datapath/encap.pyx"
include "datapath/decap.pyx"
include "datapath/control.pyx"
