# The hot path: TUN -> IPIP frames on an AF_PACKET socket, and IPIP frames
# from a PACKET_MMAP ring -> TUN. Each worker has two loops (encap, decap),
# each on its own thread with the GIL released, touching no Python object
# per packet. The per-packet work lives in includes/*.h; this file is the
# glue: sockets, rings, batches, the table swap and the counters.
cimport cython
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t, int64_t
from libc.stdlib cimport malloc, calloc, free
from libc.string cimport memcpy, memset

from .includes cimport system as c
from .includes.ipip cimport *

import errno
import ipaddress
import os
import re
import threading

cdef extern from "<stdlib.h>" nogil:
    void *aligned_alloc(size_t alignment, size_t size)

cdef extern from "<arpa/inet.h>" nogil:
    uint32_t htonl(uint32_t)
    uint32_t ntohl(uint32_t)
    uint16_t htons(uint16_t)
    uint16_t ntohs(uint16_t)

cdef enum:
    # Room in front of each TUN read for the Ethernet + outer IPv4 headers
    # (34 bytes); 64 keeps the frame start cache-line aligned.
    HEADROOM = 64
    # Frame space before the MAC header in a TPACKET_V2 ring slot.
    RING_MAC_ROOM = 128
    RING_BLOCK = 1 << 16
    # Frames in a worker's TX ring: a kick sends all that are queued, and
    # on veth they are free again before it returns. 1 MB of slots stays in
    # a core's L2 cache; on a NIC it is 512 frames in flight before the loop
    # waits for the device to release some.
    TX_FRAMES = 512
    # How long the encap loop waits for the device to take or release
    # frames (a full ring, or a send socket out of buffer) before it drops.
    TX_WAIT_US = 10000
    TX_WAIT_STEP_US = 50
    GSO_MAX = 65536
    # Outer IP IDs a worker takes from the datapath's counter at a time.
    ID_BLOCK = 64
    LOOP_TIMER_SLACK_NS = 1000
    STATS_ALIGN = 64
    # Where a classic BPF program's "ld [k]" reads the outer IPv4 fields.
    OFF_ETHERTYPE = 12
    OFF_PROTO = 23
    OFF_DADDR = 30
    GRO_HOLD_MIN_FRAMES = 4 * IPF_GRO_FLOWS * IPF_GRO_MAX_SEGS
    # PACKET_FANOUT's flag, in the uapi since 2024: older headers lack it.
    FANOUT_FLAG_IGNORE_OUTGOING = 0x4000

TX_REASONS = tuple(ipf_tx_reason_names[i].decode() for i in range(1, IPF_TX_NREASONS))
RX_REASONS = tuple(ipf_rx_reason_names[i].decode() for i in range(1, IPF_RX_NREASONS))


cdef uint32_t ip4(str addr) except? 0:
    """Dotted quad -> network-order u32."""
    return htonl(int(ipaddress.IPv4Address(addr)))


cdef extern from "<time.h>" nogil:
    struct timespec:
        long tv_sec
        long tv_nsec
    int clock_gettime(int clk, timespec *ts)
    enum:
        CLOCK_MONOTONIC


cdef extern from "<sys/prctl.h>" nogil:
    int prctl(int option, unsigned long arg2, unsigned long arg3, unsigned long arg4, unsigned long arg5)
    enum:
        PR_SET_NAME
        PR_SET_TIMERSLACK


cdef void set_loop_thread(str name):
    """Names the thread (as `top -H` and perf show it) and makes its timers
    precise: a loop's naps (coalesce_us) must not stretch by the default
    50 µs of slack."""
    cdef bytes b = name.encode()[:15]
    prctl(PR_SET_NAME, <unsigned long><char *>b, 0, 0, 0)
    prctl(PR_SET_TIMERSLACK, LOOP_TIMER_SLACK_NS, 0, 0, 0)


cdef extern from "<sched.h>" nogil:
    int sched_yield()


cdef inline uint64_t now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <uint64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef uint32_t pow2_at_least(uint32_t n):
    cdef uint32_t p = 1
    while p < n:
        p <<= 1
    return p


cdef tuple kernel_release():
    """The running kernel's (major, minor), from a release such as 6.18.44-fc or 5.4-rc1."""
    m = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return (int(m[1]), int(m[2])) if m else (0, 0)


cdef int check(int r, str what) except -1:
    if r < 0:
        raise OSError(c.errno, f"{what}: {os.strerror(c.errno)}")
    return r


cdef uint8_t *map_ring(int fd, int option, str what, uint32_t frame_size, uint32_t *n_frames,
                       size_t *nbytes) except NULL:
    """Sets up a PACKET_RX_RING or PACKET_TX_RING (option) of contiguous
    power-of-two slots on fd, at least n_frames of them (a block holds one
    or more), and maps it: slot i is at ring + i * frame_size. Sets
    n_frames and nbytes to what it made."""
    cdef c.tpacket_req req
    cdef uint8_t *ring
    req.tp_frame_size = frame_size
    req.tp_block_size = max(frame_size, <uint32_t>RING_BLOCK)
    n_frames[0] = max(pow2_at_least(n_frames[0]), req.tp_block_size // frame_size)
    req.tp_frame_nr = n_frames[0]
    req.tp_block_nr = <unsigned int>(<size_t>n_frames[0] * frame_size // req.tp_block_size)
    check(c.setsockopt(fd, c.SOL_PACKET, option, &req, sizeof(req)), what)
    nbytes[0] = <size_t>req.tp_block_size * req.tp_block_nr
    ring = <uint8_t *>c.mmap(NULL, nbytes[0], c.PROT_READ | c.PROT_WRITE, c.MAP_SHARED | c.MAP_POPULATE, fd, 0)
    if <void *>ring == c.MAP_FAILED:
        check(-1, f"mmap {what}")
    return ring


cdef int set_tunnel(ipf_tunnel *tn, str local_ip, bytes local_mac, int mtu, object ttl,
                    object tos, bint pmtudisc, bint ignore_df) except -1:
    """Fills the outer-header rules; ttl/tos None means inherit (as tunl0)."""
    if len(local_mac) != 6:
        raise ValueError("local_mac must be 6 bytes")
    if not 68 <= mtu <= 65535:
        raise ValueError(f"mtu {mtu} out of range 68..65535")
    if ttl is not None and not 1 <= ttl <= 255:
        raise ValueError(f"ttl {ttl} out of range 1..255")
    if tos is not None and not 0 <= tos <= 255:
        raise ValueError(f"tos {tos} out of range 0..255")
    memset(tn, 0, sizeof(ipf_tunnel))
    tn.src = ip4(local_ip)
    memcpy(tn.src_mac, <const char *>local_mac, 6)
    tn.mtu = mtu
    tn.ttl = 0 if ttl is None else ttl
    tn.tos_inherit = tos is None
    tn.tos = 0 if tos is None else tos
    tn.df_fixed = pmtudisc
    tn.df_inherit = not ignore_df
    return 0


cdef ipf_table *build_table(object routes, object peers, uint64_t generation) except NULL:
    """routes: (prefix host-order int, length, peer index); peers: (ip
    host-order int, next-hop MAC bytes or None[, path MTU])."""
    cdef Py_ssize_t n_routes = len(routes), n_peers = len(peers), i
    cdef ipf_lpm_route *r = <ipf_lpm_route *>malloc((n_routes or 1) * sizeof(ipf_lpm_route))
    cdef ipf_peer *p = <ipf_peer *>calloc(n_peers or 1, sizeof(ipf_peer))
    cdef ipf_table *t = NULL
    try:
        if r == NULL or p == NULL:
            raise MemoryError()
        for i, (prefix, length, peer) in enumerate(routes):
            if not 0 <= length <= 32 or not 0 <= peer < n_peers:
                raise ValueError(f"bad route entry {(prefix, length, peer)!r}")
            r[i].prefix = prefix
            r[i].len = length
            r[i].value = peer
        for i, peer in enumerate(peers):
            ip, mac = peer[0], peer[1]
            p[i].ip = htonl(ip)
            p[i].pmtu = peer[2] if len(peer) > 2 else 0
            if mac is not None:
                if len(mac) != 6:
                    raise ValueError(f"bad MAC {mac!r}")
                memcpy(p[i].mac, <const char *>mac, 6)
                p[i].has_mac = 1
        with nogil:
            t = ipf_table_build(r, n_routes, p, n_peers, generation)
        if t == NULL:
            raise MemoryError("cannot build the forwarding table")
        return t
    finally:
        free(r)
        free(p)


cdef class Datapath:
    """One tunnel endpoint: the outer-header rules, the forwarding table that
    every worker reads, and the sockets they share. Workers are added with
    add_worker(); each runs run_encap() and run_decap() on its own threads
    until stop()."""

    cdef:
        ipf_tunnel tn
        ipf_table *table
        uint64_t generation
        uint32_t stopping
        uint32_t ip_id              # the next block of outer IP IDs (see Worker._next_id)
        int stop_fd, sink_fd, icmp_fd
        int ifindex, mtu, batch, ring_frames, fanout_id
        uint64_t busy_poll_ns
        unsigned int coalesce_us
        bint vnet, tx_partial, udp_gro
        ipf_ratelimit icmp_rl       # control-thread ICMP (relayed errors)
        list workers
        object lock

    def __cinit__(self):
        self.stop_fd = self.sink_fd = self.icmp_fd = -1
        self.table = NULL

    def __init__(self, int ifindex, str local_ip, bytes local_mac, *, int mtu=1500, ttl=None, tos=0,
                 bint pmtudisc=False, bint ignore_df=False, int batch=64, int ring_frames=4096,
                 bint vnet_hdr=False, bint csum_offload=False, bint udp_gso=False, int coalesce_us=0,
                 int busy_poll_us=0):
        """ifindex, local_ip, local_mac: the underlay interface; mtu: its
        MTU (the largest outer packet); vnet_hdr: the TUN queues carry a
        virtio_net_hdr with offloads (tun.py); csum_offload: the underlay
        device completes any L4 checksum at the offset it is given
        (NETIF_F_HW_CSUM), so frames leave with their inner TCP/UDP
        checksum partial (with vnet_hdr only); udp_gso: the TUN takes UDP
        GSO packets too (USO), so UDP datagrams of a flow are coalesced as
        TCP segments are; coalesce_us: how long the decap loop naps under
        load before it looks at its ring again, instead of sleeping until
        the next frame wakes it; busy_poll_us: how long an
        idle loop keeps looking for work before it sleeps in poll()."""
        if not 1 <= batch <= 1024:
            raise ValueError(f"batch {batch} out of range 1..1024")
        if not 0 <= coalesce_us <= 10000:
            raise ValueError(f"coalesce_us {coalesce_us} out of range 0..10000")
        set_tunnel(&self.tn, local_ip, local_mac, mtu, ttl, tos, pmtudisc, ignore_df)
        self.ifindex, self.mtu, self.batch, self.ring_frames, self.vnet = ifindex, mtu, batch, ring_frames, vnet_hdr
        self.tx_partial = vnet_hdr and csum_offload
        self.udp_gro = vnet_hdr and udp_gso
        self.busy_poll_ns = <uint64_t>busy_poll_us * 1000
        self.coalesce_us = coalesce_us
        # The group that spreads received frames over the workers' rings by
        # flow; one per datapath in the namespace.
        self.fanout_id = hash((os.getpid(), id(self))) & 0xffff
        self.lock = threading.Lock()
        self.workers = []
        self.table = build_table((), (), 0)
        self.stop_fd = check(c.eventfd(0, c.EFD_NONBLOCK | c.EFD_CLOEXEC), "eventfd")
        memset(&self.icmp_rl, 0, sizeof(self.icmp_rl))
        self.icmp_rl.per_sec = 1000
        self.icmp_rl.burst = 50
        self.icmp_rl.tokens = 50
        self._open_sink()
        # ICMP errors leave from this node's own stack, as tunl0's icmp_send
        # does: written into the TUN, a packet from a local source would be
        # dropped as a martian.
        self.icmp_fd = check(c.socket(c.AF_INET, c.SOCK_RAW | c.SOCK_CLOEXEC, c.IPPROTO_RAW), "raw socket")

    cdef int _open_sink(self) except -1:
        # The kernel must not also handle the IPIP frames we consume: with
        # nothing registered for protocol 4 it answers each one with ICMP
        # protocol-unreachable. A raw IPPROTO_IPIP socket counts as a
        # receiver in ip_local_deliver (raw_local_deliver), which suppresses
        # that answer; its filter drops every copy before it is queued, so it
        # costs a clone per frame and holds no memory. Chosen over a tc or
        # netfilter drop because it needs no kernel module (this kernel has
        # no tc actions) and goes away with the process. A kernel that has
        # the ipip module loaded handles protocol 4 itself: daemon.py warns.
        #
        # The same socket hears the ICMP errors about our outer packets
        # (raw_icmp_error): IP_RECVERR queues them, unfiltered, with the
        # quoted outer header (IP_HDRINCL), for icmp.py to act on.
        cdef c.sock_filter drop[1]
        cdef c.sock_fprog fprog
        cdef int one = 1
        drop[0] = c.sock_filter(0x06, 0, 0, 0)  # ret #0
        fprog.len = 1
        fprog.filter = drop
        self.sink_fd = check(c.socket(c.AF_INET, c.SOCK_RAW | c.SOCK_CLOEXEC | c.SOCK_NONBLOCK, c.IPPROTO_IPIP),
                             "raw IPIP socket")
        check(c.setsockopt(self.sink_fd, c.SOL_SOCKET, c.SO_ATTACH_FILTER, &fprog, sizeof(fprog)),
              "SO_ATTACH_FILTER")
        check(c.setsockopt(self.sink_fd, c.IPPROTO_IP, c.IP_RECVERR, &one, sizeof(one)), "IP_RECVERR")
        check(c.setsockopt(self.sink_fd, c.IPPROTO_IP, c.IP_HDRINCL, &one, sizeof(one)), "IP_HDRINCL")
        return 0

    def add_workers(self, tun_fds):
        """One worker per TUN queue (fds from tun.open_tun), each with its
        own send socket and receive ring in the fanout group. Called once:
        how the group spreads frames depends on how many join it."""
        if self.workers:
            raise RuntimeError("the workers are already added")
        if not tun_fds:
            raise ValueError("no TUN queue for a worker")
        # One ring needs no flow hash (a flow dissection per frame): any
        # spread keeps a single member's frames in order.
        cdef int mode = c.PACKET_FANOUT_HASH if len(tun_fds) > 1 else c.PACKET_FANOUT_CPU
        self.workers = [Worker(self, fd, mode) for fd in tun_fds]
        return list(self.workers)

    def __dealloc__(self):
        if self.sink_fd >= 0:
            c.close(self.sink_fd)
        if self.icmp_fd >= 0:
            c.close(self.icmp_fd)
        if self.stop_fd >= 0:
            c.close(self.stop_fd)
        ipf_table_free(self.table)
        self.table = NULL

    # ---- control (Python threads) ---------------------------------------------

    def set_table(self, routes, peers):
        """Replaces the forwarding table while the loops run. routes:
        (prefix as host-order int, prefix length, peer index); peers: (IPv4
        as host-order int, next-hop MAC or None until resolved[, path MTU]).
        Returns once no loop can still see the old table, which is then
        freed."""
        cdef ipf_table *t
        cdef ipf_table *old
        cdef Worker w
        with self.lock:
            self.generation += 1
            t = build_table(routes, peers, self.generation)
            old = ipf_table_publish(&self.table, t)
            for w in self.workers:
                w.wait_quiescent()
            ipf_table_free(old)

    def set_peer_pmtu(self, str peer, uint32_t mtu):
        """Sets a peer's path MTU (0: forget it) in the running table;
        False when the peer is unknown."""
        cdef int32_t i
        with self.lock:
            i = ipf_peer_find(self.table, ip4(peer))
            if i < 0:
                return False
            ipf_store_u32(&self.table.peers[i].pmtu, mtu)
            return True

    def lookup(self, str addr):
        """Peer index that the current table sends addr to, or -1."""
        cdef uint32_t v = ipf_lpm_lookup(&self.table.lpm, ntohl(ip4(addr)))
        return <int>v - 1

    def sink_fileno(self):
        """The raw IPIP socket whose error queue holds ICMP errors about
        our outer packets (read with MSG_ERRQUEUE)."""
        return self.sink_fd

    def send_icmp_error(self, bytes packet not None, int type, int code, uint32_t info=0):
        """Sends an ICMP error about packet (an inner packet, or as much of
        it as was quoted) to its source; False when RFC 1812 forbids one or
        the rate limit holds it back."""
        cdef uint8_t buf[IPF_ICMP_MAX]
        cdef c.sockaddr_in dst
        cdef uint32_t n = ipf_icmp_error(buf, self.tn.src, <const uint8_t *><const char *>packet,
                                         len(packet), type, code, info)
        if n == 0:
            return False
        memset(&dst, 0, sizeof(dst))
        dst.sin_family = c.AF_INET
        memcpy(&dst.sin_addr.s_addr, buf + 16, 4)
        if not ipf_ratelimit_allow(&self.icmp_rl, dst.sin_addr.s_addr):
            return False
        return c.sendto(self.icmp_fd, buf, n, 0, <c.sockaddr *>&dst, sizeof(dst)) == n

    def stop(self):
        cdef uint64_t one = 1
        ipf_store_u32(&self.stopping, 1)
        c.write(self.stop_fd, &one, sizeof(one))

    def worker_counters(self):
        """Each worker's counters: how the load spreads over them."""
        cdef Worker w
        return [w.counters() for w in self.workers]

    def snapshot(self):
        """Bridge (dropped at merge): the typed snapshot from today's string-keyed counters."""
        from .counters import Direction, Icmp, Snapshot, Worker as Counts
        cdef Worker w
        workers, sent, limited = [], 0, 0
        for w in self.workers:
            wc = w.counters()
            workers.append(Counts(
                Direction(wc["tx_packets"], wc["tx_bytes"], wc["tx_gso"], {r: wc["tx_drop_" + r] for r in TX_REASONS}),
                Direction(wc["rx_packets"], wc["rx_bytes"], wc["rx_gro"], {r: wc["rx_drop_" + r] for r in RX_REASONS})))
            sent += wc["icmp_sent"]
            limited += wc["icmp_ratelimited"]
        return Snapshot(tuple(workers), Icmp(sent, limited), self.generation)

    def counters(self):
        """Every counter summed over the workers, as `stats.render` expects."""
        cdef Worker w
        out = None
        for w in self.workers:
            wc = w.counters()
            out = wc if out is None else {k: out[k] + v for k, v in wc.items()}
        return out if out is not None else Worker.zero_counters()


cdef class Worker:
    """One TUN queue, one send socket and one receive ring, and the two
    loops that move packets between them."""

    cdef:
        Datapath dp
        ipf_tunnel tn               # a copy: the loops read it on every packet
        int tun_fd, tx_fd, rx_fd
        ipf_qsbr *qsbr              # [0] encap loop, [1] decap loop
        ipf_tx_stats *txs
        ipf_rx_stats *rxs
        uint64_t ring_full
        ipf_ratelimit icmp_rl
        uint8_t icmp_buf[IPF_ICMP_MAX]
        uint32_t ip_id, ip_id_end
        bint vnet, tx_partial, rx_vnet, udp_gro
        uint32_t batch, buf_size, nap_min
        uint8_t *buf                # the TUN read buffer (see _encap_loop)
        uint8_t seg_hdrs[IPF_SEG_SLOT]  # the headers of the segment being queued (offload.h)
        uint8_t *tx_ring
        size_t tx_ring_bytes
        uint32_t tx_frame_size, tx_data_off, tx_frames, tx_head
        uint32_t tx_queued          # frames queued in the TX ring since the kernel last took them all
        uint64_t tx_queued_bytes    # their inner bytes, counted once the kernel takes them
        ipf_gro_set *gro
        uint32_t gro_slots[IPF_GRO_FLOWS][IPF_GRO_MAX_SEGS]  # each train's ring slots
        uint8_t *ring
        size_t ring_bytes
        uint32_t frame_size, n_frames, rx_idx
        bint rx_loaded              # the decap loop is napping between batches (_rx_idle)
        bint gro_hold               # a GRO train may stay open across batches and naps
        int loop_errno[2]

    def __cinit__(self):
        self.tun_fd = self.tx_fd = self.rx_fd = -1

    def __init__(self, Datapath dp not None, int tun_fd, int fanout_mode):
        cdef uint32_t i
        self.dp = dp
        self.tn = dp.tn
        self.vnet = dp.vnet
        self.tx_partial = dp.tx_partial
        self.udp_gro = dp.udp_gro
        self.batch = dp.batch
        self.nap_min = max(1, dp.batch // 4)
        self.tun_fd = tun_fd
        check(c.fcntl(tun_fd, c.F_SETFL, c.fcntl(tun_fd, c.F_GETFL) | c.O_NONBLOCK), "tun O_NONBLOCK")
        self.qsbr = <ipf_qsbr *>aligned_alloc(STATS_ALIGN, 2 * sizeof(ipf_qsbr))
        self.txs = <ipf_tx_stats *>aligned_alloc(STATS_ALIGN, sizeof(ipf_tx_stats))
        self.rxs = <ipf_rx_stats *>aligned_alloc(STATS_ALIGN, sizeof(ipf_rx_stats))
        self.buf_size = (HEADROOM + (GSO_MAX if self.vnet else dp.mtu) + 63) & ~63u
        self.buf = <uint8_t *>aligned_alloc(STATS_ALIGN, self.buf_size)
        self.gro = <ipf_gro_set *>calloc(1, sizeof(ipf_gro_set))
        if not (self.qsbr and self.txs and self.rxs and self.buf and self.gro):
            raise MemoryError()
        memset(self.qsbr, 0, 2 * sizeof(ipf_qsbr))
        memset(self.txs, 0, sizeof(ipf_tx_stats))
        memset(self.rxs, 0, sizeof(ipf_rx_stats))
        # Committed now, so the worker is at its working size from the
        # start, as its rings are.
        memset(self.buf, 0, self.buf_size)
        # icmp_msgs_per_sec is the node's budget: each worker gets a share.
        memset(&self.icmp_rl, 0, sizeof(self.icmp_rl))
        self.icmp_rl.per_sec = max(1, 1000 // (len(dp.workers) + 1))
        self.icmp_rl.burst = 50
        self.icmp_rl.tokens = 50
        self._open_tx(dp.ifindex, dp.mtu)
        self._open_rx(dp.ifindex, dp.mtu, dp.ring_frames, dp.fanout_id | (fanout_mode << 16))

    cdef int _open_tx(self, int ifindex, int mtu) except -1:
        # Frames leave through a PACKET_TX_RING: we copy each finished frame
        # into a slot and one send() hands the kernel every queued slot,
        # instead of a sendmmsg whose every message costs a msghdr and its
        # iovecs copied in, checked and walked. Each slot starts with a
        # virtio_net_hdr (which is why this needs Linux 4.11): its hdr_len
        # is the whole frame, so the kernel copies the frame into the skb
        # rather than attaching the ring's pages, which veth would copy into
        # new pages anyway (skb_copy_ubufs) on the way to its peer. It also
        # says where the device completes the inner checksum (tx_partial).
        # Protocol 0: this socket only sends; the kernel takes the frame's
        # protocol from its Ethernet header (packet_parse_headers).
        cdef c.sockaddr_ll sll
        cdef int size = 4 << 20
        cdef int one = 1, v = c.TPACKET_V2
        if kernel_release() < (4, 11):
            raise OSError(errno.ENOSYS, f"Linux {os.uname().release} is too old: ipipfast needs 4.11 or "
                                        "later, whose PACKET_TX_RING takes a virtio_net_hdr per frame")
        self.tx_fd = check(c.socket(c.AF_PACKET, c.SOCK_RAW | c.SOCK_CLOEXEC, 0), "AF_PACKET socket")
        # Frames in flight are charged to the send buffer: room for the whole
        # ring, even past net.core.wmem_max (SO_SNDBUFFORCE, as root).
        if c.setsockopt(self.tx_fd, c.SOL_SOCKET, c.SO_SNDBUFFORCE, &size, sizeof(size)) < 0:
            c.setsockopt(self.tx_fd, c.SOL_SOCKET, c.SO_SNDBUF, &size, sizeof(size))
        check(c.setsockopt(self.tx_fd, c.SOL_PACKET, c.PACKET_VNET_HDR, &one, sizeof(one)), "PACKET_VNET_HDR")
        check(c.setsockopt(self.tx_fd, c.SOL_PACKET, c.PACKET_VERSION, &v, sizeof(v)), "PACKET_VERSION")
        # A frame the kernel refuses is skipped rather than stopping the ring.
        check(c.setsockopt(self.tx_fd, c.SOL_PACKET, c.PACKET_LOSS, &one, sizeof(one)), "PACKET_LOSS")
        self.tx_data_off = c.TPACKET2_HDRLEN - sizeof(c.sockaddr_ll)
        self.tx_frame_size = pow2_at_least(self.tx_data_off + IPF_VNET_HLEN + 18 + mtu)
        self.tx_frames = TX_FRAMES
        self.tx_ring = map_ring(self.tx_fd, c.PACKET_TX_RING, "PACKET_TX_RING", self.tx_frame_size,
                                &self.tx_frames, &self.tx_ring_bytes)
        memset(&sll, 0, sizeof(sll))
        sll.sll_family = c.AF_PACKET
        sll.sll_ifindex = ifindex
        check(c.bind(self.tx_fd, <c.sockaddr *>&sll, sizeof(sll)), "bind tx socket")
        return 0

    cdef int _open_rx(self, int ifindex, int mtu, int ring_frames, int fanout) except -1:
        # The socket filter keeps everything but IPv4 protocol 4 to this node
        # in the kernel, so the ring only ever holds tunnel traffic.
        cdef c.sock_filter prog[8]
        cdef c.sock_fprog fprog
        cdef c.sockaddr_ll sll
        cdef int v, r
        # jf counts instructions to skip: every failed test lands on prog[7].
        prog[0] = c.sock_filter(0x28, 0, 0, OFF_ETHERTYPE)       # ldh [12]
        prog[1] = c.sock_filter(0x15, 0, 5, 0x0800)              # jeq #IPv4
        prog[2] = c.sock_filter(0x30, 0, 0, OFF_PROTO)           # ldb [23]
        prog[3] = c.sock_filter(0x15, 0, 3, 4)                   # jeq #IPIP
        prog[4] = c.sock_filter(0x20, 0, 0, OFF_DADDR)           # ld [30]
        prog[5] = c.sock_filter(0x15, 0, 1, ntohl(self.tn.src))  # jeq #this node
        prog[6] = c.sock_filter(0x06, 0, 0, 0xffffffff)          # ret: whole frame
        prog[7] = c.sock_filter(0x06, 0, 0, 0)                   # ret: drop
        fprog.len = 8
        fprog.filter = prog
        self.rx_fd = check(c.socket(c.AF_PACKET, c.SOCK_RAW | c.SOCK_CLOEXEC, 0), "AF_PACKET socket")
        check(c.setsockopt(self.rx_fd, c.SOL_SOCKET, c.SO_ATTACH_FILTER, &fprog, sizeof(fprog)),
              "SO_ATTACH_FILTER")
        v = c.TPACKET_V2
        check(c.setsockopt(self.rx_fd, c.SOL_PACKET, c.PACKET_VERSION, &v, sizeof(v)), "PACKET_VERSION")
        # A virtio_net_hdr before each frame in the ring tells how its inner
        # checksum stands: left partial by a local sender (CHECKSUM_PARTIAL,
        # as ours with csum_offload, over veth), or verified by the NIC.
        v = 1
        self.rx_vnet = c.setsockopt(self.rx_fd, c.SOL_PACKET, c.PACKET_VNET_HDR, &v, sizeof(v)) == 0
        self.frame_size = pow2_at_least(RING_MAC_ROOM + mtu + 18)
        self.n_frames = ring_frames
        self.ring = map_ring(self.rx_fd, c.PACKET_RX_RING, "PACKET_RX_RING", self.frame_size, &self.n_frames,
                             &self.ring_bytes)
        # An open train keeps its slots from the kernel, which drops a frame
        # when the slot at its head is still ours: only a ring many trains
        # long can spare them between batches.
        self.gro_hold = self.n_frames >= GRO_HOLD_MIN_FRAMES
        # ETH_P_ALL puts the ring among the taps that see a frame before tc
        # ingress, where ingress.py drops it for the kernel's own IP stack.
        memset(&sll, 0, sizeof(sll))
        sll.sll_family = c.AF_PACKET
        sll.sll_protocol = htons(c.ETH_P_ALL)
        sll.sll_ifindex = ifindex
        check(c.bind(self.rx_fd, <c.sockaddr *>&sll, sizeof(sll)), "bind rx socket")
        # The fanout group spreads flows over the workers' rings (hash keeps
        # a flow on one worker, so in order). DEFRAG makes the kernel
        # reassemble outer fragments first, as ipip_rcv's caller does, with
        # its own bounds on memory and time (ipfrag_high_thresh, ipfrag_time).
        # Our own sends are not wanted back: in a fanout group the socket's
        # PACKET_IGNORE_OUTGOING no longer applies (the group's hook replaces
        # the socket's), and without the group's flag every frame we send is
        # cloned and hashed into the tap, only for the filter to drop it.
        # An older kernel refuses the flag (EINVAL); the filter still drops them.
        v = fanout | ((c.PACKET_FANOUT_FLAG_DEFRAG | FANOUT_FLAG_IGNORE_OUTGOING) << 16)
        r = c.setsockopt(self.rx_fd, c.SOL_PACKET, c.PACKET_FANOUT, &v, sizeof(v))
        if r < 0 and c.errno == c.EINVAL:
            v = fanout | (c.PACKET_FANOUT_FLAG_DEFRAG << 16)
            r = c.setsockopt(self.rx_fd, c.SOL_PACKET, c.PACKET_FANOUT, &v, sizeof(v))
        check(r, "PACKET_FANOUT")
        return 0

    def __dealloc__(self):
        if self.ring != NULL:
            c.munmap(self.ring, self.ring_bytes)
        if self.tx_ring != NULL:
            c.munmap(self.tx_ring, self.tx_ring_bytes)
        if self.tx_fd >= 0:
            c.close(self.tx_fd)
        if self.rx_fd >= 0:
            c.close(self.rx_fd)
        free(self.qsbr)
        free(self.txs)
        free(self.rxs)
        free(self.buf)
        free(self.gro)

    cdef void wait_quiescent(self) noexcept nogil:
        """Returns once neither loop can hold a table pointer loaded before
        this call (see qsbr in ipip.h)."""
        cdef uint64_t seen0 = ipf_qsbr_snapshot(&self.qsbr[0])
        cdef uint64_t seen1 = ipf_qsbr_snapshot(&self.qsbr[1])
        while not (ipf_qsbr_passed(&self.qsbr[0], seen0) and ipf_qsbr_passed(&self.qsbr[1], seen1)):
            c.usleep(50)

    @property
    def ring_frames(self):
        """Frames in the receive ring, as requested rounded up to a power of two."""
        return self.n_frames

    @staticmethod
    def zero_counters():
        out = {"tx_packets": 0, "tx_bytes": 0, "icmp_sent": 0, "icmp_ratelimited": 0, "tx_gso": 0,
               "rx_packets": 0, "rx_bytes": 0, "rx_gro": 0}
        out.update({"tx_drop_" + r: 0 for r in TX_REASONS})
        out.update({"rx_drop_" + r: 0 for r in RX_REASONS})
        return out

    def counters(self):
        cdef c.tpacket_stats st
        cdef c.socklen_t n = sizeof(st)
        cdef int i
        # PACKET_STATISTICS resets on read: accumulate the ring's drops.
        if self.rx_fd >= 0 and c.getsockopt(self.rx_fd, c.SOL_PACKET, c.PACKET_STATISTICS, &st, &n) == 0:
            self.ring_full += st.tp_drops
        out = {
            "tx_packets": self.txs.packets,
            "tx_bytes": self.txs.bytes,
            "icmp_sent": self.txs.icmp_sent,
            "icmp_ratelimited": self.txs.icmp_ratelimited,
            "tx_gso": self.txs.gso,
            "rx_packets": self.rxs.packets,
            "rx_bytes": self.rxs.bytes,
            "rx_gro": self.rxs.gro,
        }
        for i in range(1, IPF_TX_NREASONS):
            out["tx_drop_" + TX_REASONS[i - 1]] = self.txs.drops[i]
        for i in range(1, IPF_RX_NREASONS):
            out["rx_drop_" + RX_REASONS[i - 1]] = self.rxs.drops[i]
        out["rx_drop_ring_full"] += self.ring_full
        return out

    # ---- the loops ------------------------------------------------------------

    def run_encap(self, str name="ipf-encap"):
        """TUN -> IPIP on the underlay, until the datapath stops. Call on its
        own thread; name is what `top -H` and perf show for it."""
        set_loop_thread(name)
        with nogil:
            self._encap_loop()
        self._raise_loop_error(0, "encap")

    def run_decap(self, str name="ipf-decap"):
        """IPIP from the underlay -> TUN, until the datapath stops. Call on its own thread."""
        set_loop_thread(name)
        with nogil:
            self._decap_loop()
        self._raise_loop_error(1, "decap")

    def _raise_loop_error(self, int which, str name):
        if self.loop_errno[which]:
            err = self.loop_errno[which]
            raise OSError(err, f"{name} loop: {os.strerror(err)}")

    cdef inline bint _stopping(self) noexcept nogil:
        return ipf_load_u32(&self.dp.stopping) != 0

    cdef bint _wait(self, int fd, int which) noexcept nogil:
        """Blocks until fd is readable; False when stopping or on an error.
        With busy polling, first asks without sleeping until it expires: a
        wake-up from poll() costs tens of microseconds of latency."""
        cdef c.pollfd fds[2]
        cdef int timeout = -1, r
        cdef uint64_t deadline = 0
        fds[0].fd = fd
        fds[0].events = c.POLLIN
        fds[1].fd = self.dp.stop_fd
        fds[1].events = c.POLLIN
        if self.dp.busy_poll_ns:
            deadline = now_ns() + self.dp.busy_poll_ns
            timeout = 0
        while not self._stopping():
            if timeout == 0 and now_ns() >= deadline:
                timeout = -1
            r = c.poll(fds, 2, timeout)
            if r == 0:
                sched_yield()  # spinning must not starve what would bring the work
                continue
            if r > 0:
                if fds[0].revents & c.POLLERR:
                    if self._link_down(fd):
                        continue
                    self.loop_errno[which] = 5  # EIO: the device went away
                    return False
                return True
            if c.errno != c.EINTR:
                self.loop_errno[which] = c.errno
                return False
        return False

    cdef bint _link_down(self, int fd) noexcept nogil:
        """A packet socket reports ENETDOWN when its device goes down, and
        the kernel takes its tap off the device until it comes up again. A
        link that flaps (a cable, a NIC reset, a bond failing over) is no
        reason to stop, as it is none for tunl0: the error is read, which
        clears it, and the loop waits on. True unless the error is another
        or the device is gone."""
        cdef int err = 0
        cdef c.socklen_t n = sizeof(err)
        cdef char name[c.IF_NAMESIZE]
        if c.getsockopt(fd, c.SOL_SOCKET, c.SO_ERROR, &err, &n) < 0 or err != c.ENETDOWN:
            return False
        return c.if_indextoname(self.dp.ifindex, name) != NULL

    cdef bint _rx_idle(self, uint32_t got) noexcept nogil:
        """The decap loop found got frames before its ring ran dry. Under
        load it naps for coalesce_us and looks again unasked, as a NIC's
        interrupt moderation (rx-usecs) does: waking it costs the thread
        that brings the next frame a cross-CPU interrupt, while a nap lets
        frames gather into the next batch. Load begins with a quarter of a
        batch and lasts while naps keep finding more than one frame, so a
        rate near the threshold does not flip between napping and being
        woken; a lone packet (a ping-pong) never waits. Open GRO trains
        stay open across a nap, as the kernel's gro_flush_timeout keeps
        them across NAPI polls: they grow to their 64 KB, and the pod's TCP
        sends one ACK for each, which the return path carries. Otherwise,
        or with coalesce_us 0, it writes the trains and sleeps until
        woken. (The encap loop gained nothing measurable from a
        nap.) False when stopping."""
        if self.dp.coalesce_us and (got >= self.nap_min or (self.rx_loaded and got > 1)):
            self.rx_loaded = True
            c.usleep(self.dp.coalesce_us)
            return not self._stopping()
        self.rx_loaded = False
        self._gro_flush_all()
        return self._wait(self.rx_fd, 1)

    cdef inline uint16_t _next_id(self) noexcept nogil:
        """The next outer IP ID. Workers take blocks from one counter, so
        that no two frames toward a peer share an ID (RFC 6864: a repeated
        ID lets fragments of two packets be joined) without an atomic per
        frame."""
        if self.ip_id == self.ip_id_end:
            self.ip_id = ipf_fetch_add_u32(&self.dp.ip_id, ID_BLOCK)
            self.ip_id_end = self.ip_id + ID_BLOCK
        self.ip_id += 1
        return <uint16_t>(self.ip_id - 1)

    cdef void _icmp(self, const uint8_t *pkt, uint32_t n, uint8_t type, uint8_t code,
                    uint32_t info) noexcept nogil:
        """Sends an ICMP error about pkt to its source (encap loop only)."""
        cdef uint32_t length = ipf_icmp_error(self.icmp_buf, self.tn.src, pkt, n, type, code, info)
        cdef c.sockaddr_in dst
        if length == 0:
            return
        memset(&dst, 0, sizeof(dst))
        dst.sin_family = c.AF_INET
        memcpy(&dst.sin_addr.s_addr, self.icmp_buf + 16, 4)
        if not ipf_ratelimit_allow(&self.icmp_rl, dst.sin_addr.s_addr):
            self.txs.icmp_ratelimited += 1
            return
        if c.sendto(self.dp.icmp_fd, self.icmp_buf, length, 0, <c.sockaddr *>&dst, sizeof(dst)) == length:
            self.txs.icmp_sent += 1

    cdef void _encap_loop(self) noexcept nogil:
        cdef ipf_qsbr *q = &self.qsbr[0]
        cdef const ipf_table *t
        # Every packet is in the TX ring (or dropped) before the next read,
        # so one buffer takes them all, and it stays in this core's cache
        # for the kernel's copy into it and ours out of it. A batch is the
        # number of reads between two send()s.
        cdef uint8_t *pkt = self.buf + HEADROOM
        cdef ssize_t r
        cdef uint32_t i, n
        cdef uint32_t hdr = IPF_VNET_HLEN if self.vnet else 0
        cdef virtio_net_hdr vh
        cdef bint drained
        memset(&vh, 0, sizeof(vh))
        while not self._stopping():
            t = ipf_qsbr_enter(q, &self.dp.table)
            drained = False
            for i in range(self.batch):
                # The virtio_net_hdr lands in the headroom, read before the
                # outer headers overwrite it.
                r = c.read(self.tun_fd, pkt - hdr, self.buf_size - HEADROOM + hdr)
                if r < 0:
                    drained = True
                    break
                if r < hdr:
                    self.txs.drops[IPF_TX_BAD_HEADER] += 1
                    continue
                if hdr:
                    memcpy(&vh, pkt - hdr, hdr)
                n = <uint32_t>r - hdr
                self._encap_one(t, pkt, n, &vh)
            if drained and c.errno != c.EAGAIN and c.errno != c.EINTR:
                self.loop_errno[0] = c.errno
                ipf_qsbr_leave(q)
                return
            ipf_qsbr_quiescent(q)
            self._tx_kick()
            if drained:
                ipf_qsbr_leave(q)
                if not self._wait(self.tun_fd, 0):
                    return
        ipf_qsbr_leave(q)

    cdef void _encap_one(self, const ipf_table *t, uint8_t *pkt, uint32_t n,
                         const virtio_net_hdr *vh) noexcept nogil:
        """Queues pkt's frames (one, or one per segment) in the TX ring."""
        cdef const ipf_peer *peer
        cdef ipf_gso_plan plan
        cdef uint32_t length, s
        cdef bint gso = vh.gso_type != VIRTIO_NET_HDR_GSO_NONE
        cdef bint partial = not gso and vh.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM
        cdef int reason
        cdef c.iovec iov[2]
        if partial:
            if not ipf_csum_fits(n, vh.csum_start, vh.csum_offset):
                self.txs.drops[IPF_TX_BAD_HEADER] += 1
                return
            if not self.tx_partial:
                ipf_csum_complete(pkt, n, vh.csum_start, vh.csum_offset)
        reason = ipf_encap_classify(t, &self.tn, pkt, n, gso, &length, &peer)
        if reason == IPF_TX_OK and gso:
            reason = ipf_gso_plan_of(vh, pkt, length, ipf_peer_mtu(&self.tn, peer), &plan)
        if reason != IPF_TX_OK:
            self.txs.drops[reason] += 1
            if reason == IPF_TX_NO_ROUTE:
                self._icmp(pkt, n, 3, 0, 0)  # destination net unreachable
            elif reason == IPF_TX_TOO_BIG and pkt[6] & 0x40:
                # fragmentation needed, with the MTU that fits inside the tunnel
                self._icmp(pkt, n, 3, 4, ipf_peer_mtu(&self.tn, peer) - IPF_IP_HLEN)
            return
        if not gso:
            ipf_encap_write(&self.tn, peer, pkt, length, self._next_id())
            iov[0].iov_base = pkt - IPF_ENCAP_HLEN
            iov[0].iov_len = length + IPF_ENCAP_HLEN
            self._tx_put(iov, 1, partial, vh.csum_start + IPF_ENCAP_HLEN, vh.csum_offset)
            return
        self.txs.gso += 1
        for s in range(plan.nseg):
            ipf_gso_segment(&self.tn, peer, pkt, length, &plan, s, self._next_id(), self.tx_partial,
                            self.seg_hdrs, iov)
            self._tx_put(iov, 2, True, IPF_ENCAP_HLEN + (pkt[0] & 0x0f) * 4, ipf_l4_csum_offset(plan.proto))

    cdef inline c.tpacket2_hdr *_tx_frame(self, uint32_t i) noexcept nogil:
        return <c.tpacket2_hdr *>(self.tx_ring + <size_t>i * self.tx_frame_size)

    cdef void _tx_put(self, const c.iovec *iov, uint32_t niov, bint partial, uint16_t cstart,
                      uint16_t coff) noexcept nogil:
        """Copies a frame, given as niov pieces, into the next TX ring slot
        behind a virtio_net_hdr. Its hdr_len is the whole frame, so the
        kernel copies the frame into the skb's linear part. With tx_partial
        it also says that the device completes the inner checksum at cstart
        + coff (partial), or that nothing is left to do."""
        cdef c.tpacket2_hdr *h = self._tx_frame(self.tx_head)
        cdef virtio_net_hdr *vh
        cdef uint8_t *d
        cdef uint32_t j, total = 0
        if ipf_load_status(&h.tp_status) != c.TP_STATUS_AVAILABLE and not self._tx_room(h):
            self.txs.drops[IPF_TX_SEND_FAILED] += 1
            return
        vh = <virtio_net_hdr *>(<uint8_t *>h + self.tx_data_off)
        memset(vh, 0, sizeof(virtio_net_hdr))
        if partial and self.tx_partial:
            ipf_vnet_partial(vh, cstart, coff)
        d = <uint8_t *>vh + IPF_VNET_HLEN
        for j in range(niov):
            memcpy(d + total, iov[j].iov_base, iov[j].iov_len)
            total += <uint32_t>iov[j].iov_len
        vh.hdr_len = <uint16_t>total
        h.tp_len = IPF_VNET_HLEN + total
        ipf_store_status(&h.tp_status, c.TP_STATUS_SEND_REQUEST)
        self.tx_head = (self.tx_head + 1) & (self.tx_frames - 1)
        self.tx_queued += 1
        self.tx_queued_bytes += total - IPF_ENCAP_HLEN

    cdef bint _tx_room(self, c.tpacket2_hdr *h) noexcept nogil:
        """The next slot still holds a frame: one queued and not yet taken,
        or taken and not yet released by the device. Sends what is queued
        and waits up to TX_WAIT_US for the slot; False if the device is
        down or stays that far behind."""
        cdef uint32_t waited = 0
        while self._tx_send():
            if ipf_load_status(&h.tp_status) == c.TP_STATUS_AVAILABLE:
                return True
            if not self._tx_nap(&waited):
                return False
        return False

    cdef bint _tx_kick(self) noexcept nogil:
        """Has the kernel send every frame queued in the TX ring. If its send
        buffer is full of frames a device still holds, it tries again for up
        to TX_WAIT_US, and what it could not take stays queued. False if the
        device refused them (see _tx_send)."""
        cdef uint32_t waited = 0
        while self._tx_send():
            if self.tx_queued == 0 or not self._tx_nap(&waited):
                return True
        return False

    cdef bint _tx_nap(self, uint32_t *waited) noexcept nogil:
        """One step of waiting for the device; False once TX_WAIT_US is spent
        or the datapath stops."""
        if waited[0] >= TX_WAIT_US or self._stopping():
            return False
        c.usleep(TX_WAIT_STEP_US)
        waited[0] += TX_WAIT_STEP_US
        return True

    cdef bint _tx_send(self) noexcept nogil:
        """One send(): the kernel takes the queued frames in ring order, as
        many as its send buffer allows, and what it took is counted. If the
        device refuses them (down, gone), they are dropped, as a qdisc drops
        its queue when its device goes down, the ring starts again where the
        kernel stopped, and False is returned."""
        cdef c.tpacket2_hdr *h
        cdef uint32_t i = self.tx_head, left = 0
        cdef uint64_t left_bytes = 0
        cdef bint refused
        if self.tx_queued == 0:
            return True
        refused = c.send(self.tx_fd, NULL, 0, c.MSG_DONTWAIT) < 0 and c.errno != c.EAGAIN \
            and c.errno != c.ENOBUFS and c.errno != c.EINTR
        # Those it left are the last ones queued.
        while left < self.tx_queued:
            h = self._tx_frame((i - 1) & (self.tx_frames - 1))
            if ipf_load_status(&h.tp_status) != c.TP_STATUS_SEND_REQUEST:
                break
            i = (i - 1) & (self.tx_frames - 1)
            left += 1
            left_bytes += h.tp_len - IPF_VNET_HLEN - IPF_ENCAP_HLEN
            if refused:  # handed back; the kernel starts again at this slot
                ipf_store_status(&h.tp_status, c.TP_STATUS_AVAILABLE)
        self.txs.packets += self.tx_queued - left
        self.txs.bytes += self.tx_queued_bytes - left_bytes
        if refused:
            self.txs.drops[IPF_TX_SEND_FAILED] += left
            self.tx_head = i
            left = 0
            left_bytes = 0
        self.tx_queued = left
        self.tx_queued_bytes = left_bytes
        return not refused

    cdef inline c.tpacket2_hdr *_rx_frame(self, uint32_t slot) noexcept nogil:
        return <c.tpacket2_hdr *>(self.ring + <size_t>slot * self.frame_size)

    cdef inline void _release_slot(self, uint32_t slot) noexcept nogil:
        ipf_store_status(&self._rx_frame(slot).tp_status, c.TP_STATUS_KERNEL)

    cdef void _gro_flush(self, int k) noexcept nogil:
        """Writes train k as one packet (a GSO packet when it holds more
        than one) and hands its slots back."""
        cdef ipf_gro *g = &self.gro.train[k]
        cdef uint32_t niov, i, nseg = g.nseg
        cdef ssize_t want, r
        if nseg == 0:
            return
        niov = ipf_gro_finish(g)
        want = g.total + IPF_VNET_HLEN
        r = c.writev(self.tun_fd, g.iov, niov)
        if r == want:
            self.rxs.packets += nseg
            self.rxs.gro += nseg > 1
            self.rxs.bytes += g.total + (nseg - 1) * g.hlen
        else:
            self.rxs.drops[IPF_RX_WRITE_FAILED] += nseg
        for i in range(nseg):
            self._release_slot(self.gro_slots[k][i])
        g.nseg = 0

    cdef void _gro_flush_all(self) noexcept nogil:
        """Writes every open train, in the order they started."""
        cdef int k = ipf_gro_oldest(self.gro)
        while k >= 0:
            self._gro_flush(k)
            k = ipf_gro_oldest(self.gro)

    cdef void _decap_loop(self) noexcept nogil:
        cdef ipf_qsbr *q = &self.qsbr[1]
        cdef const ipf_table *t
        cdef c.tpacket2_hdr *h
        cdef const virtio_net_hdr *rvh
        cdef uint8_t *frame
        cdef uint8_t *inner
        cdef uint32_t inner_len, got, slot
        cdef uint16_t cstart, coff
        cdef uint8_t proto
        cdef bint partial, trusted
        cdef int reason, k
        cdef ipf_gro *g
        while not self._stopping():
            t = ipf_qsbr_enter(q, &self.dp.table)
            got = 0
            while got < self.batch:
                slot = self.rx_idx
                h = self._rx_frame(slot)
                if not (ipf_load_status(&h.tp_status) & c.TP_STATUS_USER):
                    break
                self.rx_idx = (slot + 1) & (self.n_frames - 1)
                got += 1
                frame = <uint8_t *>h + h.tp_mac
                partial = trusted = False
                cstart = coff = 0
                if h.tp_snaplen < h.tp_len:
                    reason = IPF_RX_TRUNCATED  # larger than a ring slot (e.g. GRO on the underlay)
                else:
                    reason = ipf_decap(t, self.tn.src, frame, h.tp_snaplen, &inner, &inner_len)
                if reason == IPF_RX_OK and self.rx_vnet:
                    rvh = <const virtio_net_hdr *>(frame - IPF_VNET_HLEN)
                    if rvh.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
                        if ipf_rx_partial(rvh, <uint32_t>(inner - frame), inner, inner_len, &cstart) < 0:
                            reason = IPF_RX_INNER_BAD
                        partial = True
                        coff = rvh.csum_offset
                        trusted = cstart == 20 and coff == ipf_l4_csum_offset(inner[9])  # the one GRO checks
                    else:
                        trusted = rvh.flags & VIRTIO_NET_HDR_F_DATA_VALID
                proto = 0
                if reason == IPF_RX_OK and self.vnet:
                    proto = ipf_gro_eligible(inner, inner_len, trusted, self.udp_gro)
                if proto:
                    # Keep the slot: the train is written from the ring.
                    k = ipf_gro_join(self.gro, inner, inner_len)
                    if k < 0:
                        k = -k - 1
                        self._gro_flush(k)
                        ipf_gro_begin(self.gro, k, inner, inner_len, proto, partial)
                    self.gro_slots[k][self.gro.train[k].nseg - 1] = slot
                    continue
                self._gro_flush_all()  # whatever it is, it comes after its flow's train
                if reason == IPF_RX_OK:
                    reason = self._write_inner(inner, inner_len, partial, cstart, coff)
                if reason != IPF_RX_OK:
                    self.rxs.drops[reason] += 1
                self._release_slot(slot)
            # A train waits for more only while its flow keeps coming: one that
            # did not grow in this batch is written, or a flow gone quiet would
            # hold its slots while the others keep the loop busy.
            for k in range(IPF_GRO_FLOWS):
                g = &self.gro.train[k]
                if g.nseg and (not self.gro_hold or g.round != self.gro.round or ipf_gro_full(g)):
                    self._gro_flush(k)
            self.gro.round += 1
            if got == self.batch:
                ipf_qsbr_quiescent(q)
                continue
            ipf_qsbr_leave(q)
            if not self._rx_idle(got):
                return
        ipf_qsbr_leave(q)

    cdef int _write_inner(self, uint8_t *inner, uint32_t inner_len, bint partial, uint16_t cstart,
                          uint16_t coff) noexcept nogil:
        """Writes one inner packet to the TUN. partial: its L4 checksum at
        cstart + coff holds only the pseudo-header sum; the TUN's stack takes
        it as it is (CHECKSUM_PARTIAL), or it is completed here."""
        cdef uint32_t hdr = IPF_VNET_HLEN if self.vnet else 0
        if hdr:
            # The outer headers before inner are spent: the virtio_net_hdr
            # goes there, and one write() takes both.
            memset(inner - hdr, 0, hdr)
            if partial:
                ipf_vnet_partial(<virtio_net_hdr *>(inner - hdr), cstart, coff)
        elif partial:
            ipf_csum_complete(inner, inner_len, cstart, coff)
        if c.write(self.tun_fd, inner - hdr, inner_len + hdr) != inner_len + hdr:
            return IPF_RX_WRITE_FAILED
        self.rxs.packets += 1
        self.rxs.bytes += inner_len
        return IPF_RX_OK


include "_testing.pxi"
