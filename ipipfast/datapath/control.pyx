# The control API that the daemon calls from Python threads: the datapath
# and its workers, the table swap, path MTUs, relayed ICMP errors, and the
# counters as one snapshot.

cdef enum:
    CACHE_LINE = 64


cdef void *aligned_zeroed(size_t size) except NULL:
    """size bytes (a multiple of CACHE_LINE) on their own cache lines, zeroed."""
    cdef void *p = c.aligned_alloc(CACHE_LINE, size)
    if p == NULL:
        raise MemoryError()
    memset(p, 0, size)
    return p


cdef class Datapath:
    """One tunnel endpoint: the outer-header rules, the forwarding table that
    every worker reads, and the sockets they share. Workers are added with
    add_workers(); each runs run_encap() and run_decap() on its own threads
    until stop()."""

    def __cinit__(self):
        self.sink_fd = self.relay.fd = -1

    def __init__(self, int ifindex, str local_ip, bytes local_mac, *, int mtu=1500, ttl=None, tos=0,
                 bint pmtudisc=False, bint ignore_df=False, int batch=64, int ring_frames=4096,
                 bint vnet_hdr=False, bint csum_offload=False, bint udp_gso=False, int coalesce_us=0,
                 int busy_poll_us=0, int busy_poll_budget=100, uint32_t mark=0, bint check_source_mac=True):
        """ifindex, local_ip, local_mac: the underlay interface; mtu: its
        MTU (the largest outer packet); vnet_hdr: the TUN queues carry a
        virtio_net_hdr with offloads (tun.py); csum_offload: the underlay
        device completes any L4 checksum at the offset it is given
        (NETIF_F_HW_CSUM), so frames leave with their inner TCP/UDP
        checksum partial (with vnet_hdr only); udp_gso: the TUN takes UDP
        GSO packets too (USO), so UDP datagrams of a flow are coalesced as
        TCP segments are; coalesce_us: how long the decap loop naps under
        load before it looks at its ring again, instead of sleeping until
        the next frame wakes it; busy_poll_us: how long at most an
        idle loop keeps looking for work before it sleeps in poll(), while
        its idle gaps average at most twice that (ipf_spin, worker.h);
        busy_poll_budget: the percentage of one CPU that each loop may
        spend doing so; mark:
        the skb mark of every frame the workers send (SO_MARK), by which the
        tc egress drop knows the tunnel's own IPIP from a pod's;
        check_source_mac: a peer's frames must come from its next hop's MAC,
        as the table holds it (decap.h)."""
        if not 1 <= batch <= 1024:
            raise ValueError(f"batch {batch} out of range 1..1024")
        if not 0 <= coalesce_us <= 10000:
            raise ValueError(f"coalesce_us {coalesce_us} out of range 0..10000")
        set_tunnel(&self.tn, local_ip, mtu, ttl, tos, pmtudisc, ignore_df)
        self.ifindex, self.mtu, self.batch, self.ring_frames, self.vnet = ifindex, mtu, batch, ring_frames, vnet_hdr
        self.tx_partial = vnet_hdr and csum_offload
        self.udp_gro = vnet_hdr and udp_gso
        if not 1 <= busy_poll_budget <= 100:
            raise ValueError(f"busy_poll_budget {busy_poll_budget} out of range 1..100")
        self.busy_poll_ns = <uint64_t>busy_poll_us * 1000
        self.busy_poll_budget = busy_poll_budget
        self.coalesce_us = coalesce_us
        self.mark = mark
        self.check_source_mac = check_source_mac
        # The group that spreads received frames over the workers' rings by
        # flow; one per datapath in the namespace.
        self.fanout_id = hash((os.getpid(), id(self))) & 0xffff
        self.lock = threading.Lock()
        self.workers = []
        self.folded = {}
        self.shared = <ipf_shared *>aligned_zeroed(sizeof(ipf_shared))
        self.shared.stop_fd = -1
        self.shared.table = build_table((), (), local_mac, 0, 0)
        self.shared.stop_fd = check(c.eventfd(0, c.EFD_NONBLOCK | c.EFD_CLOEXEC), "eventfd")
        self.sink_fd = open_sink()
        self.relay.fd = check(c.socket(c.AF_INET, c.SOCK_RAW | c.SOCK_CLOEXEC, c.IPPROTO_RAW), "raw socket")
        self.relay.src = self.tn.src
        self.relay.budget = &self.shared.icmp

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
        with self.lock:
            self.workers = [Worker(self, fd, mode, i) for i, fd in enumerate(tun_fds)]
            # No loop runs yet: the table takes their rows of counts in place.
            if ipf_table_alloc_counts(self.shared.table, 2 * len(self.workers)) < 0:
                raise MemoryError()
        return list(self.workers)

    def __dealloc__(self):
        if self.sink_fd >= 0:
            c.close(self.sink_fd)
        if self.relay.fd >= 0:
            c.close(self.relay.fd)
        if self.shared != NULL:
            if self.shared.stop_fd >= 0:
                c.close(self.shared.stop_fd)
            ipf_table_free(self.shared.table)
            free(self.shared)

    def set_table(self, routes, peers, bytes local_mac not None):
        """Replaces the forwarding table while the loops run. routes:
        (prefix as host-order int, prefix length, peer index); peers: (IPv4
        as host-order int, next-hop MAC or None until resolved[, path MTU]);
        local_mac: the underlay interface's now, the source of every frame.
        Returns the new table's generation once no loop can still see the
        old table, whose per-peer counts are then folded into the totals by
        peer address (so a peer's index may change) and which is freed."""
        cdef ipf_table *t
        cdef ipf_table *old
        cdef Worker w
        with self.lock:
            t = build_table(routes, peers, local_mac, self.generation + 1, 2 * len(self.workers))
            old = ipf_table_publish(&self.shared.table, t)
            self.generation = t.generation
            for w in self.workers:
                w.wait_quiescent()
            add_peer_counts(old, self.folded)
            ipf_table_free(old)
            return self.generation

    def set_mtu(self, int mtu):
        """Sets the underlay's MTU, the largest outer packet, while the
        loops run (each reads it per packet). A raise stops at what every
        worker's ring slots hold, which were sized for the MTU at start.
        Returns the MTU now in force."""
        cdef Worker w
        cdef uint32_t applied
        if not 68 <= mtu <= 65535:
            raise ValueError(f"mtu {mtu} out of range 68..65535")
        applied = mtu
        with self.lock:
            for w in self.workers:
                applied = min(applied, w.mtu_room)
            self.tn.mtu = applied
            for w in self.workers:
                ipf_store_u32(&w.tx.tn.mtu, applied)
            return applied

    def set_peer_pmtu(self, str peer, uint32_t mtu):
        """Sets a peer's path MTU, learned from fragmentation-needed (0:
        forget it), in the running table; False when the peer is unknown."""
        cdef int32_t i
        with self.lock:
            self.pmtu_updates += mtu != 0
            i = ipf_peer_find(self.shared.table, ip4(peer))
            if i < 0:
                return False
            ipf_store_u32(&self.shared.table.peers[i].pmtu, mtu)
            return True

    def sink_fileno(self):
        """The raw IPIP socket whose error queue holds ICMP errors about
        our outer packets (read with MSG_ERRQUEUE)."""
        return self.sink_fd

    def send_icmp_error(self, bytes packet not None, int type, int code, uint32_t info=0):
        """Relays an ICMP error about packet (an inner packet, or as much of
        it as was quoted) to its source, within the node's budget that the
        loops share; False when RFC 1812 forbids one or a rate limit holds
        it back."""
        return icmp_send(&self.relay, &self.relayed, <const uint8_t *><const char *>packet, len(packet),
                         type, code, info)

    def stop(self):
        cdef uint64_t one = 1
        ipf_store_u32(&self.shared.stopping, 1)
        c.write(self.shared.stop_fd, &one, sizeof(one))

    def snapshot(self):
        """Every counter, read once from the loops' structs: a
        counters.Snapshot (its queue_full is the daemon's to add)."""
        cdef Worker w
        cdef ipf_tx_stats tx
        cdef ipf_rx_stats rx
        cdef uint64_t sent = self.relayed.sent, ratelimited = self.relayed.ratelimited
        with self.lock:  # the table is not swapped (its counts folded) meanwhile
            totals = {ip: list(v) for ip, v in self.folded.items()}
            add_peer_counts(self.shared.table, totals)
        peers = MappingProxyType({str(ipaddress.IPv4Address(ip)): counters.PeerCounts(*v)
                                  for ip, v in sorted(totals.items())})
        workers = []
        for w in self.workers:
            w.read(&tx, &rx)
            sent += tx.icmp.sent
            ratelimited += tx.icmp.ratelimited
            workers.append(counters.Worker(direction(tx.packets, tx.bytes, tx.gso, tx.drops, TX_REASONS),
                                           direction(rx.packets, rx.bytes, rx.gro, rx.drops, RX_REASONS),
                                           counters.Ring(rx.seen, rx.taken)))
        return counters.Snapshot(tuple(workers), counters.Icmp(sent, ratelimited, self.relayed.sent,
                                                               self.pmtu_updates), self.generation, peers=peers)


cdef void add_peer_counts(const ipf_table *t, dict totals) except *:
    """Adds t's per-peer counts, summed over its rows (a worker's encap
    loop's, then its decap loop's), to totals: peer IPv4 (host order) ->
    [tx packets, tx bytes, rx packets, rx bytes]. Peers without any are
    left out."""
    cdef uint32_t i, row
    cdef uint64_t v[4]
    cdef const ipf_peer_count *n
    for i in range(t.n_peers):
        memset(v, 0, sizeof(v))
        for row in range(t.count_rows):
            n = ipf_table_counts(t, row) + i
            v[(row & 1) * 2] += n.packets
            v[(row & 1) * 2 + 1] += n.bytes
        if v[0] == 0 and v[2] == 0:
            continue
        total = totals.setdefault(ntohl(t.peers[i].ip), [0, 0, 0, 0])
        total[0] += v[0]
        total[1] += v[1]
        total[2] += v[2]
        total[3] += v[3]


cdef object direction(uint64_t packets, uint64_t bytes, uint64_t offloaded, const uint64_t *drops,
                      tuple reasons):
    """A loop's counters as a counters.Direction; drops[i] counts reasons[i - 1]."""
    cdef Py_ssize_t i
    by_reason = {}
    for i in range(len(reasons)):
        by_reason[reasons[i]] = drops[i + 1]
    return counters.Direction(packets, bytes, offloaded, MappingProxyType(by_reason))


cdef class Worker:
    """One TUN queue, one send socket and one receive ring, and the two
    loops that move packets between them, each with its own state."""

    def __init__(self, Datapath dp not None, int tun_fd, int fanout_mode, int index):
        self.dp = dp
        check(c.fcntl(tun_fd, c.F_SETFL, c.fcntl(tun_fd, c.F_GETFL) | c.O_NONBLOCK), "tun O_NONBLOCK")
        self.tx = <ipf_tx *>aligned_zeroed(sizeof(ipf_tx))
        self.tx.fd = -1
        self.rx = <ipf_rx *>aligned_zeroed(sizeof(ipf_rx))
        self.rx.fd = -1
        self.tx.shared = self.rx.shared = dp.shared
        self.tx.count_row, self.rx.count_row = 2 * index, 2 * index + 1  # as add_peer_counts reads them
        self.tx.tun_fd = self.rx.tun_fd = tun_fd
        self.tx.ifindex = self.rx.ifindex = dp.ifindex
        self.tx.spin.max_ns = self.rx.spin.max_ns = dp.busy_poll_ns
        self.tx.spin.budget_pct = self.rx.spin.budget_pct = dp.busy_poll_budget
        self.tx.batch = self.rx.batch = dp.batch
        self.tx.vnet = self.rx.vnet = dp.vnet

        self.tx.tn = dp.tn  # a copy: the loop reads it on every packet
        self.tx.partial = dp.tx_partial
        self.tx.icmp.fd = dp.relay.fd
        self.tx.icmp.src = dp.tn.src
        self.tx.icmp.budget = &dp.shared.icmp
        self.tx.buf_size = (HEADROOM + (GSO_MAX if dp.vnet else dp.mtu) + 63) & ~63u
        # Committed now, so the worker is at its working size from the
        # start, as its rings are.
        self.tx.buf = <uint8_t *>aligned_zeroed(self.tx.buf_size)

        self.rx.local = dp.tn.src
        self.rx.check_mac = dp.check_source_mac
        self.rx.udp_gro = dp.udp_gro
        self.rx.nap_min = max(1, dp.batch // 4)
        self.rx.coalesce_us = dp.coalesce_us
        open_tx(self.tx, dp.ifindex, dp.mtu, dp.mark)
        open_rx(self.rx, dp.ifindex, dp.mtu, dp.ring_frames, dp.fanout_id | (fanout_mode << 16))
        # Slots and buffer are sized for the MTU at start, rounded up: the
        # outer MTU may be raised up to what they hold (set_mtu).
        self.mtu_room = min(tx_slot_mtu(self.tx), rx_slot_mtu(self.rx))
        if not dp.vnet:  # an inner packet is read whole into the buffer
            self.mtu_room = min(self.mtu_room, self.tx.buf_size - HEADROOM + IPF_IP_HLEN)

    def __dealloc__(self):
        if self.tx != NULL:
            close_ring(&self.tx.ring, self.tx.fd)
            free(self.tx.buf)
            free(self.tx)
        if self.rx != NULL:
            close_ring(&self.rx.ring, self.rx.fd)
            free(self.rx)

    cdef void wait_quiescent(self) noexcept nogil:
        """Returns once neither loop can hold a table pointer loaded before
        this call (see qsbr in table.h)."""
        cdef uint64_t seen_tx = ipf_qsbr_snapshot(&self.tx.qsbr)
        cdef uint64_t seen_rx = ipf_qsbr_snapshot(&self.rx.qsbr)
        while not (ipf_qsbr_passed(&self.tx.qsbr, seen_tx) and ipf_qsbr_passed(&self.rx.qsbr, seen_rx)):
            c.usleep(50)

    cdef void read(self, ipf_tx_stats *tx, ipf_rx_stats *rx):
        """Copies both loops' counters, the receive ring's statistics added
        first (PACKET_STATISTICS resets on read): its drops to ring_full,
        the frames past its filter (drops included) to seen."""
        cdef c.tpacket_stats st
        cdef c.socklen_t n = sizeof(st)
        if c.getsockopt(self.rx.fd, c.SOL_PACKET, c.PACKET_STATISTICS, &st, &n) == 0:
            self.rx.stats.drops[IPF_RX_RING_FULL] += st.tp_drops
            self.rx.stats.seen += st.tp_packets
        tx[0] = self.tx.stats
        rx[0] = self.rx.stats

    @property
    def ring_frames(self):
        """Frames in the receive ring, as requested rounded up to a power of two."""
        return self.rx.ring.frames

    def run_encap(self, str name="ipf-encap"):
        """TUN -> IPIP on the underlay, until the datapath stops. Call on its
        own thread; name is what `top -H` and perf show for it."""
        set_loop_thread(name)
        with nogil:
            encap_loop(self.tx)
            tx_drain(self.tx)
        raise_loop_error(self.tx.err, "encap")

    def run_decap(self, str name="ipf-decap"):
        """IPIP from the underlay -> TUN, until the datapath stops. Call on its own thread."""
        set_loop_thread(name)
        with nogil:
            decap_loop(self.rx)
        raise_loop_error(self.rx.err, "decap")


cdef int raise_loop_error(int err, str loop) except -1:
    if err:
        raise OSError(err, f"{loop} loop: {os.strerror(err)}")
    return 0
