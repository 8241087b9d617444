# Entry points into the datapath's per-packet C for the tests and the micro
# benchmarks: the very functions the loops call (the headers in
# ipipfast/includes, and the cdef helpers that ipipfast._datapath exports),
# one packet or one batch at a time, without sockets. A second extension,
# so that the one a node loads holds none of this.
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from libc.stdlib cimport malloc, calloc, free
from libc.string cimport memcpy, memset

from ipipfast._datapath cimport HEADROOM, ip4, lpm_routes, set_tunnel, build_table
from ipipfast.includes cimport system as c
from ipipfast.includes.system cimport ntohs, virtio_net_hdr
from ipipfast.includes.ip cimport IPF_ETH_HLEN, IPF_ENCAP_HLEN
from ipipfast.includes.csum cimport ipf_csum
from ipipfast.includes.lpm cimport *
from ipipfast.includes.counters cimport IPF_TX_OK, IPF_RX_OK, IPF_TX_SEND_FAILED
from ipipfast.includes.table cimport ipf_peer, ipf_peer_count, ipf_table, ipf_table_free, ipf_table_counts, \
    ipf_peer_count_add, ipf_load_status, ipf_store_status
from ipipfast.includes.encap cimport *
from ipipfast.includes.decap cimport ipf_decap
from ipipfast.includes.icmp cimport ipf_icmp_error, IPF_ICMP_MAX
from ipipfast.includes.offload cimport *
from ipipfast.includes.worker cimport ipf_tx, ipf_ring_slot, ipf_tx_free, ipf_tx_put, ipf_tx_sent, ipf_spin, \
    ipf_spin_window, ipf_spin_done

from ipipfast._datapath import RX_REASONS, TX_REASONS


class Dropped(Exception):
    """The datapath would drop this packet; .reason names the counter."""

    def __init__(self, str reason):
        super().__init__(reason)
        self.reason = reason


def checksum(const uint8_t[::1] data not None):
    """RFC 1071 checksum of data (0 when data holds a correct one)."""
    if data.shape[0] == 0:
        return 0xffff
    return ntohs(ipf_csum(&data[0], data.shape[0]))


def icmp_error(bytes packet not None, str src, int type, int code, uint32_t info=0):
    """The ICMP error the datapath would send about packet, or None."""
    cdef uint8_t out[IPF_ICMP_MAX]
    cdef uint32_t n = ipf_icmp_error(out, ip4(src), <const uint8_t *><const char *>packet,
                                     len(packet), type, code, info)
    return PyBytes_FromStringAndSize(<char *>out, n) if n else None


cdef uint8_t *copy_in(list items, uint32_t stride, uint32_t at, uint32_t limit, uint32_t *lens,
                     str too_big) except NULL:
    """One buffer (to free()) holding items, item i at i * stride + at, as a
    batch lies in the loop's memory; their lengths go to lens. An item
    longer than limit raises ValueError(too_big)."""
    cdef Py_ssize_t i
    cdef uint8_t *bufs = <uint8_t *>malloc((len(items) or 1) * <size_t>stride)
    if bufs == NULL:
        raise MemoryError()
    for i, item in enumerate(items):
        if len(item) > limit:
            free(bufs)
            raise ValueError(too_big)
        lens[i] = len(item)
        memcpy(bufs + i * stride + at, <const char *>item, len(item))
    return bufs


cdef class Tunnel:
    """A tunnel's outer-header rules and forwarding table, as Datapath keeps
    them, for encapsulating and decapsulating single packets or batches."""

    cdef ipf_tunnel tn
    cdef ipf_table *table
    cdef bint check_mac

    def __cinit__(self):
        self.table = NULL

    def __init__(self, str local_ip, bytes local_mac=b"\x02\x00\x00\x00\x00\x01", *, int mtu=1500,
                 ttl=None, tos=0, bint pmtudisc=False, bint ignore_df=False, routes=(), peers=(),
                 bint check_source_mac=True):
        """routes and peers as for Datapath.set_table; check_source_mac as for Datapath."""
        set_tunnel(&self.tn, local_ip, mtu, ttl, tos, pmtudisc, ignore_df)
        self.table = build_table(routes, peers, local_mac, 1, 2)  # the rows of counts of one worker's loops
        self.check_mac = check_source_mac

    def __dealloc__(self):
        ipf_table_free(self.table)

    def encapsulate(self, bytes inner not None, uint16_t ip_id=0):
        """The Ethernet frame that carries inner, or Dropped(reason)."""
        cdef uint32_t n = len(inner), length
        cdef const ipf_peer *peer
        cdef int reason
        cdef uint8_t *buf = <uint8_t *>malloc(HEADROOM + n + 1)
        if buf == NULL:
            raise MemoryError()
        try:
            memcpy(buf + HEADROOM, <const char *>inner, n)
            reason = ipf_encap_classify(self.table, &self.tn, buf + HEADROOM, n, 0, &length, &peer)
            if reason != IPF_TX_OK:
                raise Dropped(TX_REASONS[reason - 1])
            ipf_encap_write(&self.tn, self.table.src_mac, peer, buf + HEADROOM, length, ip_id)
            return PyBytes_FromStringAndSize(<char *>buf + HEADROOM - IPF_ENCAP_HLEN,
                                             length + IPF_ENCAP_HLEN)
        finally:
            free(buf)

    def decapsulate(self, bytes frame not None):
        """The inner packet that frame carries, or Dropped(reason)."""
        cdef uint32_t n = len(frame), inner_len, peer
        cdef uint8_t *inner
        cdef int reason
        cdef uint8_t *buf = <uint8_t *>malloc(n + 1)
        if buf == NULL:
            raise MemoryError()
        try:
            memcpy(buf, <const char *>frame, n)
            reason = ipf_decap(self.table, self.tn.src, self.check_mac, buf, n, &inner, &inner_len, &peer)
            if reason != IPF_RX_OK:
                raise Dropped(RX_REASONS[reason - 1])
            return PyBytes_FromStringAndSize(<char *>inner, inner_len)
        finally:
            free(buf)

    def segment(self, bytes packet not None, int gso_type, int gso_size, uint16_t ip_id=0,
                bint partial=False):
        """The frames a GSO super-packet (as the TUN hands it over, with this
        virtio_net_hdr gso_type and gso_size) leaves as, or Dropped(reason).
        partial: as with csum_offload, the L4 checksums are left for the
        device (they hold the pseudo-header sum)."""
        cdef uint32_t n = len(packet), length, k
        cdef const ipf_peer *peer
        cdef ipf_gso_plan plan
        cdef virtio_net_hdr vh
        cdef uint8_t slot[IPF_SEG_SLOT]
        cdef c.iovec iov[2]
        cdef int reason
        memset(&vh, 0, sizeof(vh))
        vh.gso_type = gso_type
        vh.gso_size = gso_size
        reason = ipf_encap_classify(self.table, &self.tn, <const uint8_t *><const char *>packet, n, 1,
                                    &length, &peer)
        if reason == IPF_TX_OK:
            reason = ipf_gso_plan_of(&vh, <const uint8_t *><const char *>packet, length, self.tn.mtu, &plan)
        if reason != IPF_TX_OK:
            raise Dropped(TX_REASONS[reason - 1])
        frames = []
        for k in range(plan.nseg):
            ipf_gso_segment(&self.tn, self.table.src_mac, peer, <const uint8_t *><const char *>packet, length,
                            &plan, k, <uint16_t>(ip_id + k), partial, slot, iov)
            frames.append(PyBytes_FromStringAndSize(<char *>iov[0].iov_base, iov[0].iov_len)
                          + PyBytes_FromStringAndSize(<char *>iov[1].iov_base, iov[1].iov_len))
        return frames

    def segment_rounds(self, bytes packet not None, int gso_type, int gso_size, int rounds=1,
                       bint partial=False):
        """Segments packet `rounds` times over in C (for benchmarks);
        returns the number of segments made."""
        cdef uint32_t n = len(packet), length, k
        cdef const ipf_peer *peer
        cdef ipf_gso_plan plan
        cdef virtio_net_hdr vh
        cdef uint8_t *slots
        cdef c.iovec iov[2]
        cdef const uint8_t *pkt = <const uint8_t *><const char *>packet
        cdef uint64_t made = 0
        cdef int r
        memset(&vh, 0, sizeof(vh))
        vh.gso_type = gso_type
        vh.gso_size = gso_size
        if (ipf_encap_classify(self.table, &self.tn, pkt, n, 1, &length, &peer) != IPF_TX_OK
                or ipf_gso_plan_of(&vh, pkt, length, self.tn.mtu, &plan) != IPF_TX_OK):
            raise ValueError("packet does not segment")
        slots = <uint8_t *>malloc(<size_t>plan.nseg * IPF_SEG_SLOT)
        if slots == NULL:
            raise MemoryError()
        with nogil:
            for r in range(rounds):
                for k in range(plan.nseg):
                    made += ipf_gso_segment(&self.tn, self.table.src_mac, peer, pkt, length, &plan, k, <uint16_t>k,
                                            partial, slots + <size_t>k * IPF_SEG_SLOT, iov) != 0
        free(slots)
        return made

    def encap_batch(self, list packets not None, int rounds=1, list frames=None):
        """Encapsulates packets in place `rounds` times over, as the encap
        loop does for one batch, each with its place as the outer IP ID
        (for benchmarks), counted per peer as the loop counts them; returns
        how many passed. frames, when given, gets what the last round made
        of each packet: its frame, or Dropped."""
        cdef Py_ssize_t count = len(packets), i
        cdef uint32_t *lens = <uint32_t *>malloc((count or 1) * sizeof(uint32_t))
        cdef int *reasons = <int *>calloc(count or 1, sizeof(int))
        cdef uint8_t *bufs = NULL
        cdef uint64_t ok = 0
        cdef uint32_t length, stride = HEADROOM + self.tn.mtu
        cdef const ipf_peer *peer
        cdef ipf_peer_count *counts = ipf_table_counts(self.table, 0)
        cdef int r, reason
        cdef uint8_t *pkt
        try:
            if lens == NULL or reasons == NULL:
                raise MemoryError()
            bufs = copy_in(packets, stride, HEADROOM, self.tn.mtu, lens, "packet larger than the tunnel MTU")
            with nogil:
                for r in range(rounds):
                    for i in range(count):
                        pkt = bufs + i * stride + HEADROOM
                        reason = ipf_encap_classify(self.table, &self.tn, pkt, lens[i], 0, &length, &peer)
                        if reason == IPF_TX_OK:
                            ipf_encap_write(&self.tn, self.table.src_mac, peer, pkt, length, <uint16_t>i)
                            ipf_peer_count_add(&counts[peer - self.table.peers], length)
                            ok += 1
                        else:
                            reasons[i] = reason
            if frames is not None:
                for i in range(count):
                    pkt = bufs + i * stride + HEADROOM
                    frames.append(Dropped(TX_REASONS[reasons[i] - 1]) if reasons[i] else
                                  PyBytes_FromStringAndSize(<char *>pkt - IPF_ENCAP_HLEN,
                                                            IPF_ENCAP_HLEN + (pkt[2] << 8 | pkt[3])))
            return ok
        finally:
            free(lens)
            free(reasons)
            free(bufs)

    def decap_batch(self, list frames not None, int rounds=1, list inners=None):
        """Decapsulates frames in place `rounds` times over, as the decap
        loop does for one batch (for benchmarks), counted per peer as the
        loop counts them; returns how many passed.
        inners, when given, gets what the last round made of each frame:
        its inner packet, or Dropped."""
        cdef Py_ssize_t count = len(frames), i
        cdef uint32_t stride = self.tn.mtu + IPF_ETH_HLEN
        cdef uint32_t *lens = <uint32_t *>malloc((count or 1) * sizeof(uint32_t))
        cdef int *reasons = <int *>calloc(count or 1, sizeof(int))
        cdef uint8_t *bufs = NULL
        cdef uint64_t ok = 0
        cdef uint8_t *inner
        cdef uint32_t inner_len, peer
        # In locals, as the loop holds them: a store through a pointer
        # would have them read again from self for every frame.
        cdef const ipf_table *t = self.table
        cdef ipf_peer_count *counts = ipf_table_counts(t, 1)
        cdef uint32_t local = self.tn.src
        cdef bint check_mac = self.check_mac
        cdef int r, reason
        try:
            if lens == NULL or reasons == NULL:
                raise MemoryError()
            bufs = copy_in(frames, stride, 0, stride, lens, "frame larger than the underlay MTU")
            with nogil:
                for r in range(rounds):
                    for i in range(count):
                        reason = ipf_decap(t, local, check_mac, bufs + i * stride, lens[i], &inner, &inner_len,
                                           &peer)
                        if reason == IPF_RX_OK:
                            ipf_peer_count_add(&counts[peer], inner_len)
                            ok += 1
                        else:
                            reasons[i] = reason
            if inners is not None:
                for i in range(count):
                    inner = bufs + i * stride + IPF_ETH_HLEN
                    inner += (inner[0] & 0x0f) * 4
                    inners.append(Dropped(RX_REASONS[reasons[i] - 1]) if reasons[i] else
                                  PyBytes_FromStringAndSize(<char *>inner, inner[2] << 8 | inner[3]))
            return ok
        finally:
            free(lens)
            free(reasons)
            free(bufs)


cdef tuple gro_take(ipf_gro *g):
    """The write a finished train makes: (virtio_net_hdr, packet)."""
    cdef uint32_t niov = ipf_gro_finish(g), k
    parts = [PyBytes_FromStringAndSize(<char *>g.iov[k].iov_base, g.iov[k].iov_len) for k in range(niov)]
    g.nseg = 0
    return parts[0], b"".join(parts[1:])


GRO_FLOWS = IPF_GRO_FLOWS  # trains open at once in the decap loop


cdef tuple gro_offer(ipf_gro_set *s, uint8_t *p, uint32_t n, uint8_t proto, int partial):
    """Offers an eligible packet to the set as the decap loop does; returns
    the train that had to be written first (ipf_gro_finish called), or None."""
    cdef int k = ipf_gro_join(s, p, n)
    cdef tuple written = None
    if k >= 0:
        return None
    k = -k - 1
    if s.train[k].nseg:
        written = gro_take(&s.train[k])
    ipf_gro_begin(s, k, p, n, proto, partial)
    return written


cdef list gro_take_due(ipf_gro_set *s, bint hold):
    """The writes at the end of a batch, as the decap loop makes them."""
    cdef int due[IPF_GRO_FLOWS]
    cdef uint32_t i, n = ipf_gro_batch_end(s, hold, due)
    out = []
    for i in range(n):
        out.append(gro_take(&s.train[due[i]]))
    return out


cdef list gro_take_all(ipf_gro_set *s):
    """The writes of every open train, in the order they started."""
    cdef int order[IPF_GRO_FLOWS]
    cdef uint32_t i, n = ipf_gro_all(s, order)
    out = []
    for i in range(n):
        out.append(gro_take(&s.train[order[i]]))
    return out


def coalesce(list packets not None, bint partial=False, bint udp=True, int batch=0, bint hold=True):
    """What the decap loop writes to the TUN for these decapsulated inner
    packets, in order: (virtio_net_hdr as bytes, packet bytes) per write.
    They come in batches of `batch` (0: one batch), each ended as the loop
    ends one, and then the ring runs dry; hold: trains may stay open across
    batches, as in a ring of 2048 frames or more. partial: they arrived
    with their L4 checksum left partial (the pseudo-header sum), which is
    trusted, not verified; udp: the TUN takes UDP GSO packets."""
    cdef ipf_gro_set *s = <ipf_gro_set *>calloc(1, sizeof(ipf_gro_set))
    cdef list bufs = [bytearray(pkt) for pkt in packets]  # GRO rewrites the first header in place
    cdef Py_ssize_t size = batch or len(bufs) + 1, first
    cdef bytearray b
    cdef uint8_t *p
    cdef uint8_t proto
    out = []
    if s == NULL:
        raise MemoryError()
    try:
        # The loop looks again after a full batch: the last one is short.
        for first in range(0, len(bufs) + 1, size):
            for b in bufs[first:first + size]:
                p = <uint8_t *>(<char *>b)
                proto = ipf_gro_eligible(p, len(b), partial, udp)
                if proto:
                    written = gro_offer(s, p, len(b), proto, partial)
                    if written is not None:
                        out.append(written)
                    continue
                out += gro_take_all(s)
                out.append((bytes(IPF_VNET_HLEN), bytes(b)))
            out += gro_take_due(s, hold)
        return out + gro_take_all(s)
    finally:
        free(s)


def coalesce_rounds(list packets not None, int rounds=1):
    """Coalesces the packets `rounds` times over in C, headers restored
    between rounds (for benchmarks); returns the number of trains."""
    cdef Py_ssize_t count = len(packets), i
    cdef uint32_t stride = 2048
    cdef uint8_t *bufs = NULL
    cdef uint32_t *lens = <uint32_t *>malloc((count or 1) * sizeof(uint32_t))
    cdef ipf_gro_set *s = <ipf_gro_set *>calloc(1, sizeof(ipf_gro_set))
    cdef uint8_t saved[64]
    cdef uint64_t trains = 0
    cdef int r, k
    cdef int order[IPF_GRO_FLOWS]
    cdef uint32_t j, n
    cdef uint8_t *p
    cdef uint8_t proto
    try:
        if lens == NULL or s == NULL:
            raise MemoryError()
        bufs = copy_in(packets, stride, 0, stride, lens, "packet larger than 2048 bytes")
        memcpy(saved, bufs, 64)
        with nogil:
            for r in range(rounds):
                for i in range(count):
                    p = bufs + i * stride
                    proto = ipf_gro_eligible(p, lens[i], 0, 1)
                    if proto:
                        k = ipf_gro_join(s, p, lens[i])
                        if k < 0:
                            k = -k - 1
                            if s.train[k].nseg:
                                ipf_gro_finish(&s.train[k])
                                trains += 1
                            ipf_gro_begin(s, k, p, lens[i], proto, 0)
                n = ipf_gro_all(s, order)
                for j in range(n):
                    ipf_gro_finish(&s.train[order[j]])
                    s.train[order[j]].nseg = 0
                trains += n
                memcpy(bufs, saved, 64)  # the first header was rewritten
        return trains
    finally:
        free(bufs)
        free(lens)
        free(s)


cdef class TxRing:
    """A worker's TX ring (ipf_tx) in plain memory, kept by the encap loop's
    own bookkeeping (worker.h); the caller plays the kernel and the device
    by setting the slots' statuses (TP_STATUS_* of linux/if_packet.h)."""

    cdef ipf_tx *tx

    def __cinit__(self, uint32_t frames=8, uint32_t frame_size=256, uint32_t head=0, bint partial=False):
        if frames & (frames - 1) or head >= frames:
            raise ValueError("frames must be a power of two, head one of them")
        self.tx = <ipf_tx *>c.aligned_alloc(64, sizeof(ipf_tx))
        if self.tx == NULL:
            raise MemoryError()
        memset(self.tx, 0, sizeof(ipf_tx))
        self.tx.ring.base = <uint8_t *>calloc(frames, frame_size)
        if self.tx.ring.base == NULL:
            raise MemoryError()
        self.tx.ring.frames, self.tx.ring.frame_size, self.tx.ring.head = frames, frame_size, head
        self.tx.partial = partial
        self.tx.data_off = c.TPACKET2_HDRLEN - sizeof(c.sockaddr_ll)

    def __dealloc__(self):
        if self.tx != NULL:
            free(self.tx.ring.base)
            free(self.tx)

    def put(self, bytes frame not None, bint partial=False, uint16_t cstart=0, uint16_t coff=0):
        """Queues frame as the encap loop does once the slot at head is
        free; False (and nothing queued) when it is not."""
        cdef c.iovec iov
        if len(frame) + IPF_VNET_HLEN + self.tx.data_off > self.tx.ring.frame_size:
            raise ValueError("frame larger than a slot")
        if not ipf_tx_free(self.tx):
            return False
        iov.iov_base = <char *>frame
        iov.iov_len = len(frame)
        ipf_tx_put(self.tx, &iov, 1, partial, cstart, coff)
        return True

    def sent(self, bint refused=False):
        """What the encap loop does after a send(), the device having
        refused the frames or not."""
        ipf_tx_sent(self.tx, refused)

    def status(self, uint32_t i):
        return ipf_load_status(&ipf_ring_slot(&self.tx.ring, i % self.tx.ring.frames).tp_status)

    def set_status(self, uint32_t i, uint32_t status):
        ipf_store_status(&ipf_ring_slot(&self.tx.ring, i % self.tx.ring.frames).tp_status, status)

    def slot(self, uint32_t i):
        """What slot i holds: (virtio_net_hdr as bytes, frame)."""
        cdef c.tpacket2_hdr *h = ipf_ring_slot(&self.tx.ring, i % self.tx.ring.frames)
        cdef char *vh = <char *>h + self.tx.data_off
        return (PyBytes_FromStringAndSize(vh, IPF_VNET_HLEN),
                PyBytes_FromStringAndSize(vh + IPF_VNET_HLEN, h.tp_len - IPF_VNET_HLEN))

    @property
    def head(self):
        return self.tx.ring.head

    @property
    def queued(self):
        return self.tx.queued

    @property
    def queued_bytes(self):
        return self.tx.queued_bytes

    @property
    def counters(self):
        """(packets, bytes, send_failed) as the loop counts them."""
        return self.tx.stats.packets, self.tx.stats.bytes, self.tx.stats.drops[IPF_TX_SEND_FAILED]


cdef class BusyPoll:
    """A loop's busy-polling policy (ipf_spin, worker.h) on a clock the
    caller keeps, in nanoseconds: how long it would spin now that it is
    idle, and what it learns when work comes."""

    cdef ipf_spin spin

    def __init__(self, uint64_t max_ns, uint32_t budget_pct):
        memset(&self.spin, 0, sizeof(self.spin))
        self.spin.max_ns, self.spin.budget_pct = max_ns, budget_pct

    def window(self, uint64_t now):
        return ipf_spin_window(&self.spin, now)

    def done(self, uint64_t idle_since, uint64_t spun, uint64_t now):
        ipf_spin_done(&self.spin, idle_since, spun, now)


cdef class Lpm:
    """The datapath's longest-prefix-match table alone."""

    cdef ipf_lpm lpm

    def __init__(self, entries):
        """entries: (prefix as host-order int, length, value)."""
        cdef ipf_lpm_route *r = lpm_routes(entries, <uint64_t>IPF_LPM_MAX_VALUE + 1)
        try:
            if ipf_lpm_build(&self.lpm, r, len(entries)) < 0:
                raise MemoryError()
        finally:
            free(r)

    def __dealloc__(self):
        ipf_lpm_free(&self.lpm)

    def lookup(self, uint32_t addr):
        """Value of the longest prefix holding addr (host order), or -1."""
        return <int64_t>ipf_lpm_lookup(&self.lpm, addr) - 1

    def lookup_many(self, const uint32_t[::1] addrs not None):
        """Looks up every address (for benchmarks); returns how many matched."""
        cdef Py_ssize_t i
        cdef uint64_t hits = 0
        with nogil:
            for i in range(addrs.shape[0]):
                hits += ipf_lpm_lookup(&self.lpm, addrs[i]) != 0
        return hits
