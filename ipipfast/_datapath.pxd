# The node's datapath extension, as uvloop lays out its loop: this file
# declares its cdef classes and the cdef functions that other extensions
# cimport (ipipfast_lab.packets, the tests' entry points into the same C);
# _datapath.pyx includes the parts from datapath/.
from libc.stdint cimport uint32_t, uint64_t

from .includes.counters cimport ipf_icmp_stats, ipf_tx_stats, ipf_rx_stats
from .includes.encap cimport ipf_tunnel
from .includes.icmp cimport ipf_icmp_sender
from .includes.lpm cimport ipf_lpm_route
from .includes.table cimport ipf_table
from .includes.worker cimport ipf_shared, ipf_tx, ipf_rx

cdef enum:
    # Room in front of each TUN read for the Ethernet + outer IPv4 headers
    # (34 bytes); 64 keeps the frame start cache-line aligned.
    HEADROOM = 64

cdef uint32_t ip4(str addr) except? 0
cdef ipf_lpm_route *lpm_routes(object entries, uint64_t values) except NULL
cdef int set_tunnel(ipf_tunnel *tn, str local_ip, int mtu, object ttl, object tos, bint pmtudisc,
                    bint ignore_df) except -1
cdef ipf_table *build_table(object routes, object peers, bytes local_mac, uint64_t generation,
                            uint32_t count_rows) except NULL


cdef class Datapath:
    cdef:
        ipf_tunnel tn
        ipf_shared *shared          # what the loops of every worker read
        uint64_t generation         # of the table the loops read
        int sink_fd
        int ifindex, mtu, batch, ring_frames, fanout_id
        uint64_t busy_poll_ns
        unsigned int busy_poll_budget
        unsigned int coalesce_us
        uint32_t mark               # SO_MARK of the send sockets
        bint vnet, tx_partial, udp_gro, check_source_mac
        ipf_icmp_sender relay       # the control thread's ICMP errors (relayed); owns the raw socket
        ipf_icmp_stats relayed
        uint64_t pmtu_updates
        dict folded                 # peer IPv4 (host order) -> counts of the tables freed (add_peer_counts)
        list workers
        object lock


cdef class Worker:
    cdef:
        Datapath dp
        ipf_tx *tx                  # the encap loop's state
        ipf_rx *rx                  # the decap loop's
        uint32_t mtu_room           # the largest outer MTU its slots and buffer hold
    cdef void wait_quiescent(self) noexcept nogil
    cdef void read(self, ipf_tx_stats *tx, ipf_rx_stats *rx)
