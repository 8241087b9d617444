# Sockets and rings: the send socket and its PACKET_TX_RING, the receive
# socket with its classic-BPF filter and PACKET_RX_RING in the fanout group,
# the raw sink for IPIP; and how a loop thread waits for its socket.

cdef enum:
    # Frame space before the MAC header in a TPACKET_V2 ring slot.
    RING_MAC_ROOM = 128
    # An Ethernet header and a VLAN tag: what a slot holds beyond the
    # outer packet (as tpacket_snd allows beyond the device's MTU).
    ETH_VLAN_HLEN = 18
    RING_BLOCK = 1 << 16
    # Frames in a worker's TX ring: a kick sends all that are queued, and
    # on veth they are free again before it returns. 1 MB of slots stays in
    # a core's L2 cache; on a NIC it is 512 frames in flight before the loop
    # waits for the device to release some.
    TX_FRAMES = 512
    LOOP_TIMER_SLACK_NS = 1000
    # Where a classic BPF program's "ld [k]" reads the outer IPv4 fields.
    OFF_ETHERTYPE = 12
    OFF_PROTO = 23
    OFF_DADDR = 30
    GRO_HOLD_MIN_FRAMES = 4 * IPF_GRO_FLOWS * IPF_GRO_MAX_SEGS
    # PACKET_FANOUT's flag, in the uapi since 2024: older headers lack it.
    FANOUT_FLAG_IGNORE_OUTGOING = 0x4000


cdef int check(int r, str what) except -1:
    if r < 0:
        raise OSError(c.errno, f"{what}: {os.strerror(c.errno)}")
    return r


cdef uint32_t pow2_at_least(uint32_t n):
    cdef uint32_t p = 1
    while p < n:
        p <<= 1
    return p


cdef tuple kernel_release():
    """The running kernel's (major, minor), from a release such as 6.18.44-fc or 5.4-rc1."""
    m = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return (int(m[1]), int(m[2])) if m else (0, 0)


cdef int map_ring(ipf_ring *ring, int fd, int option, str what, uint32_t frame_size, uint32_t frames) except -1:
    """Sets up a PACKET_RX_RING or PACKET_TX_RING (option) on fd of
    contiguous power-of-two slots of frame_size, at least `frames` of them
    (a block holds one or more), and maps it into ring."""
    cdef c.tpacket_req req
    cdef void *base
    req.tp_frame_size = frame_size
    req.tp_block_size = max(frame_size, <uint32_t>RING_BLOCK)
    req.tp_frame_nr = max(pow2_at_least(frames), req.tp_block_size // frame_size)
    req.tp_block_nr = <unsigned int>(<size_t>req.tp_frame_nr * frame_size // req.tp_block_size)
    check(c.setsockopt(fd, c.SOL_PACKET, option, &req, sizeof(req)), what)
    base = c.mmap(NULL, <size_t>req.tp_block_size * req.tp_block_nr, c.PROT_READ | c.PROT_WRITE,
                  c.MAP_SHARED | c.MAP_POPULATE, fd, 0)
    if base == c.MAP_FAILED:
        check(-1, f"mmap {what}")
    ring.base = <uint8_t *>base
    ring.bytes = <size_t>req.tp_block_size * req.tp_block_nr
    ring.frame_size = frame_size
    ring.frames = req.tp_frame_nr
    return 0


cdef void close_ring(ipf_ring *ring, int fd) noexcept nogil:
    """Unmaps ring and closes its socket fd, as far as they were made."""
    if ring.base != NULL:
        c.munmap(ring.base, ring.bytes)
    if fd >= 0:
        c.close(fd)


cdef int open_tx(ipf_tx *tx, int ifindex, int mtu, uint32_t mark) except -1:
    # Frames leave through a PACKET_TX_RING: we copy each finished frame
    # into a slot and one send() hands the kernel every queued slot,
    # instead of a sendmmsg whose every message costs a msghdr and its
    # iovecs copied in, checked and walked. Each slot starts with a
    # virtio_net_hdr (which is why this needs Linux 4.11): its hdr_len
    # is the whole frame, so the kernel copies the frame into the skb
    # rather than attaching the ring's pages, which veth would copy into
    # new pages anyway (skb_copy_ubufs) on the way to its peer. It also
    # says where the device completes the inner checksum (tx.partial).
    # Protocol 0: this socket only sends; the kernel takes the frame's
    # protocol from its Ethernet header (packet_parse_headers).
    cdef c.sockaddr_ll sll
    cdef int size = 4 << 20
    cdef int one = 1, v = c.TPACKET_V2
    if kernel_release() < (4, 11):
        raise OSError(errno.ENOSYS, f"Linux {os.uname().release} is too old: ipipfast needs 4.11 or "
                                    "later, whose PACKET_TX_RING takes a virtio_net_hdr per frame")
    tx.fd = check(c.socket(c.AF_PACKET, c.SOCK_RAW | c.SOCK_CLOEXEC, 0), "AF_PACKET socket")
    # Frames in flight are charged to the send buffer: room for the whole
    # ring, even past net.core.wmem_max (SO_SNDBUFFORCE, as root).
    if c.setsockopt(tx.fd, c.SOL_SOCKET, c.SO_SNDBUFFORCE, &size, sizeof(size)) < 0:
        c.setsockopt(tx.fd, c.SOL_SOCKET, c.SO_SNDBUF, &size, sizeof(size))
    # tpacket_snd gives each skb the socket's mark: the tc egress drop
    # passes marked IPIP (ours) and drops the rest (a pod's, masqueraded).
    if mark:
        check(c.setsockopt(tx.fd, c.SOL_SOCKET, c.SO_MARK, &mark, sizeof(mark)), "SO_MARK")
    check(c.setsockopt(tx.fd, c.SOL_PACKET, c.PACKET_VNET_HDR, &one, sizeof(one)), "PACKET_VNET_HDR")
    check(c.setsockopt(tx.fd, c.SOL_PACKET, c.PACKET_VERSION, &v, sizeof(v)), "PACKET_VERSION")
    # A frame the kernel refuses is skipped rather than stopping the ring.
    check(c.setsockopt(tx.fd, c.SOL_PACKET, c.PACKET_LOSS, &one, sizeof(one)), "PACKET_LOSS")
    tx.data_off = c.TPACKET2_HDRLEN - sizeof(c.sockaddr_ll)
    map_ring(&tx.ring, tx.fd, c.PACKET_TX_RING, "PACKET_TX_RING",
             pow2_at_least(tx.data_off + IPF_VNET_HLEN + ETH_VLAN_HLEN + mtu), TX_FRAMES)
    memset(&sll, 0, sizeof(sll))
    sll.sll_family = c.AF_PACKET
    sll.sll_ifindex = ifindex
    check(c.bind(tx.fd, <c.sockaddr *>&sll, sizeof(sll)), "bind tx socket")
    return 0


cdef uint32_t tx_slot_mtu(const ipf_tx *tx) noexcept nogil:
    """The largest outer packet a slot of tx's ring holds."""
    return tx.ring.frame_size - tx.data_off - IPF_VNET_HLEN - ETH_VLAN_HLEN


cdef int open_rx(ipf_rx *rx, int ifindex, int mtu, int ring_frames, int fanout) except -1:
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
    prog[5] = c.sock_filter(0x15, 0, 1, ntohl(rx.local))     # jeq #this node
    prog[6] = c.sock_filter(0x06, 0, 0, 0xffffffff)          # ret: whole frame
    prog[7] = c.sock_filter(0x06, 0, 0, 0)                   # ret: drop
    fprog.len = 8
    fprog.filter = prog
    rx.fd = check(c.socket(c.AF_PACKET, c.SOCK_RAW | c.SOCK_CLOEXEC, 0), "AF_PACKET socket")
    check(c.setsockopt(rx.fd, c.SOL_SOCKET, c.SO_ATTACH_FILTER, &fprog, sizeof(fprog)), "SO_ATTACH_FILTER")
    v = c.TPACKET_V2
    check(c.setsockopt(rx.fd, c.SOL_PACKET, c.PACKET_VERSION, &v, sizeof(v)), "PACKET_VERSION")
    # A virtio_net_hdr before each frame in the ring tells how its inner
    # checksum stands: left partial by a local sender (CHECKSUM_PARTIAL,
    # as ours with csum_offload, over veth), or verified by the NIC.
    v = 1
    rx.ring_vnet = c.setsockopt(rx.fd, c.SOL_PACKET, c.PACKET_VNET_HDR, &v, sizeof(v)) == 0
    map_ring(&rx.ring, rx.fd, c.PACKET_RX_RING, "PACKET_RX_RING", pow2_at_least(RING_MAC_ROOM + mtu + ETH_VLAN_HLEN),
             ring_frames)
    # An open train keeps its slots from the kernel, which drops a frame
    # when the slot at its head is still ours: only a ring many trains
    # long can spare them between batches.
    rx.gro_hold = rx.ring.frames >= GRO_HOLD_MIN_FRAMES
    # ETH_P_ALL puts the ring among the taps that see a frame before tc
    # ingress, where ingress.py drops it for the kernel's own IP stack.
    memset(&sll, 0, sizeof(sll))
    sll.sll_family = c.AF_PACKET
    sll.sll_protocol = htons(c.ETH_P_ALL)
    sll.sll_ifindex = ifindex
    check(c.bind(rx.fd, <c.sockaddr *>&sll, sizeof(sll)), "bind rx socket")
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
    r = c.setsockopt(rx.fd, c.SOL_PACKET, c.PACKET_FANOUT, &v, sizeof(v))
    if r < 0 and c.errno == c.EINVAL:
        v = fanout | (c.PACKET_FANOUT_FLAG_DEFRAG << 16)
        r = c.setsockopt(rx.fd, c.SOL_PACKET, c.PACKET_FANOUT, &v, sizeof(v))
    check(r, "PACKET_FANOUT")
    return 0


cdef uint32_t rx_slot_mtu(const ipf_rx *rx) noexcept nogil:
    """The largest outer packet a slot of rx's ring holds whole."""
    return rx.ring.frame_size - RING_MAC_ROOM - ETH_VLAN_HLEN


cdef int open_sink() except -1:
    """The raw IPIP socket that keeps the kernel from answering our frames.

    The kernel must not also handle the IPIP frames we consume: with
    nothing registered for protocol 4 it answers each one with ICMP
    protocol-unreachable. A raw IPPROTO_IPIP socket counts as a receiver
    in ip_local_deliver (raw_local_deliver), which suppresses that answer;
    its filter drops every copy before it is queued, so it costs a clone
    per frame and holds no memory. Chosen over a tc or netfilter drop
    because it needs no kernel module (this kernel has no tc actions) and
    goes away with the process. A kernel that has the ipip module loaded
    handles protocol 4 itself: daemon.py warns.

    The same socket hears the ICMP errors about our outer packets
    (raw_icmp_error): IP_RECVERR queues them, unfiltered, with the quoted
    outer header (IP_HDRINCL), for icmp.py to act on."""
    cdef c.sock_filter drop[1]
    cdef c.sock_fprog fprog
    cdef int one = 1
    cdef int fd
    drop[0] = c.sock_filter(0x06, 0, 0, 0)  # ret #0
    fprog.len = 1
    fprog.filter = drop
    fd = check(c.socket(c.AF_INET, c.SOCK_RAW | c.SOCK_CLOEXEC | c.SOCK_NONBLOCK, c.IPPROTO_IPIP),
               "raw IPIP socket")
    try:
        check(c.setsockopt(fd, c.SOL_SOCKET, c.SO_ATTACH_FILTER, &fprog, sizeof(fprog)), "SO_ATTACH_FILTER")
        check(c.setsockopt(fd, c.IPPROTO_IP, c.IP_RECVERR, &one, sizeof(one)), "IP_RECVERR")
        check(c.setsockopt(fd, c.IPPROTO_IP, c.IP_HDRINCL, &one, sizeof(one)), "IP_HDRINCL")
    except OSError:
        c.close(fd)
        raise
    return fd


cdef void set_loop_thread(str name):
    """Names the thread (as `top -H` and perf show it) and makes its timers
    precise: a loop's naps (coalesce_us) must not stretch by the default
    50 µs of slack."""
    cdef bytes b = name.encode()[:15]
    c.prctl(c.PR_SET_NAME, <unsigned long><char *>b, 0, 0, 0)
    c.prctl(c.PR_SET_TIMERSLACK, LOOP_TIMER_SLACK_NS, 0, 0, 0)


cdef inline uint64_t now_ns() noexcept nogil:
    cdef c.timespec ts
    c.clock_gettime(c.CLOCK_MONOTONIC, &ts)
    return <uint64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef inline bint stopping(ipf_shared *shared) noexcept nogil:
    return ipf_load_u32(&shared.stopping) != 0


cdef bint wait_readable(int fd, ipf_shared *shared, ipf_spin *spin, int ifindex, int *err) noexcept nogil:
    """Blocks until fd is readable; False when stopping or on an error
    (in err). With busy polling, first asks without sleeping for as long
    as the spin policy allows (ipf_spin_window): a wake-up from poll()
    costs tens of microseconds of latency, more on a halted vCPU."""
    cdef c.pollfd fds[2]
    cdef int timeout = -1, r
    cdef uint64_t idle_since = 0, deadline = 0, spun = 0, t
    cdef bint learning = spin.max_ns != 0
    fds[0].fd = fd
    fds[0].events = c.POLLIN
    fds[1].fd = shared.stop_fd
    fds[1].events = c.POLLIN
    if learning:
        idle_since = now_ns()
        deadline = idle_since + ipf_spin_window(spin, idle_since)
        timeout = 0 if deadline > idle_since else -1
    while not stopping(shared):
        if timeout == 0:
            t = now_ns()
            if t >= deadline:
                timeout = -1
                spun = t - idle_since
        r = c.poll(fds, 2, timeout)
        if r == 0:
            c.sched_yield()  # spinning must not starve what would bring the work
            continue
        if r > 0 and learning:
            t = now_ns()
            ipf_spin_done(spin, idle_since, t - idle_since if timeout == 0 else spun, t)
            learning = False
        if r > 0:
            if fds[0].revents & c.POLLERR:
                if link_down(fd, ifindex):
                    continue
                err[0] = 5  # EIO: the device went away
                return False
            return True
        if c.errno != c.EINTR:
            err[0] = c.errno
            return False
    return False


cdef bint link_down(int fd, int ifindex) noexcept nogil:
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
    return c.if_indextoname(ifindex, name) != NULL
