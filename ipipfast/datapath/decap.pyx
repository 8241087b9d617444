# The decap loop: IPIP frames from the receive ring -> inner packets
# written to the TUN, TCP segments (and UDP datagrams) of a flow coalesced
# into one GSO packet (offload.h), straight from the ring.

cdef void decap_loop(ipf_rx *rx) noexcept nogil:
    cdef ipf_qsbr *q = &rx.qsbr
    cdef const ipf_table *t
    cdef ipf_peer_count *counts
    cdef c.tpacket2_hdr *h
    cdef const virtio_net_hdr *rvh
    cdef uint8_t *frame
    cdef uint8_t *inner
    cdef uint32_t inner_len, got, slot, i, n, peer
    cdef uint16_t cstart, coff
    cdef uint8_t proto
    cdef bint partial, trusted
    cdef int reason, k
    cdef int due[IPF_GRO_FLOWS]
    while not stopping(rx.shared):
        t = ipf_qsbr_enter(q, &rx.shared.table)
        counts = ipf_table_counts(t, rx.count_row)
        got = 0
        while got < rx.batch:
            slot = rx.ring.head
            h = ipf_ring_slot(&rx.ring, slot)
            if not (ipf_load_status(&h.tp_status) & c.TP_STATUS_USER):
                break
            rx.ring.head = (slot + 1) & (rx.ring.frames - 1)
            got += 1
            rx.stats.taken += 1
            frame = <uint8_t *>h + h.tp_mac
            partial = trusted = False
            cstart = coff = 0
            if h.tp_snaplen < h.tp_len:
                reason = IPF_RX_TRUNCATED  # larger than a ring slot (e.g. GRO on the underlay)
            elif not ipf_rx_for_host(h):
                reason = IPF_RX_OTHER_HOST
            else:
                reason = ipf_decap(t, rx.local, rx.check_mac, frame, h.tp_snaplen, &inner, &inner_len, &peer)
            if reason == IPF_RX_OK and rx.ring_vnet:
                rvh = <const virtio_net_hdr *>(frame - IPF_VNET_HLEN)
                if rvh.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
                    if ipf_rx_partial(rvh, <uint32_t>(inner - frame), inner, inner_len, &cstart) < 0:
                        reason = IPF_RX_INNER_BAD
                    partial = True
                    coff = rvh.csum_offset
                    trusted = cstart == 20 and coff == ipf_l4_csum_offset(inner[9])  # the one GRO checks
                else:
                    trusted = rvh.flags & VIRTIO_NET_HDR_F_DATA_VALID
            if reason == IPF_RX_OK:
                # Counted now, while t is this batch's: a GRO train may be
                # written after a later batch, under another table.
                ipf_peer_count_add(&counts[peer], inner_len)
            proto = 0
            if reason == IPF_RX_OK and rx.vnet:
                proto = ipf_gro_eligible(inner, inner_len, trusted, rx.udp_gro)
            if proto:
                # Keep the slot: the train is written from the ring.
                k = ipf_gro_join(&rx.gro, inner, inner_len)
                if k < 0:
                    k = -k - 1
                    gro_write(rx, k)
                    ipf_gro_begin(&rx.gro, k, inner, inner_len, proto, partial)
                rx.gro_slots[k][rx.gro.train[k].nseg - 1] = slot
                continue
            gro_write_all(rx)  # whatever it is, it comes after its flow's train
            if reason == IPF_RX_OK:
                reason = write_inner(rx, inner, inner_len, partial, cstart, coff)
            if reason != IPF_RX_OK:
                rx.stats.drops[reason] += 1
            ipf_rx_release(rx, slot)
        n = ipf_gro_batch_end(&rx.gro, rx.gro_hold, due)
        for i in range(n):
            gro_write(rx, due[i])
        if got == rx.batch:
            ipf_qsbr_quiescent(q)
            continue
        ipf_qsbr_leave(q)
        if not rx_idle(rx, got):
            break
    else:
        ipf_qsbr_leave(q)
    gro_write_all(rx)  # every frame it took is written or counted, also when it stops


cdef void gro_write(ipf_rx *rx, int k) noexcept nogil:
    """Writes train k as one packet (a GSO packet when it holds more
    than one) and hands its slots back."""
    cdef ipf_gro *g = &rx.gro.train[k]
    cdef uint32_t niov, i, nseg = g.nseg
    cdef ssize_t want, r
    if nseg == 0:
        return
    niov = ipf_gro_finish(g)
    want = g.total + IPF_VNET_HLEN
    r = c.writev(rx.tun_fd, g.iov, niov)
    if r == want:
        rx.stats.packets += nseg
        rx.stats.gro += nseg > 1
        rx.stats.bytes += g.total + (nseg - 1) * g.hlen
    else:
        rx.stats.drops[IPF_RX_WRITE_FAILED] += nseg
    for i in range(nseg):
        ipf_rx_release(rx, rx.gro_slots[k][i])
    g.nseg = 0


cdef void gro_write_all(ipf_rx *rx) noexcept nogil:
    """Writes every open train, in the order they started."""
    cdef int order[IPF_GRO_FLOWS]
    cdef uint32_t i, n = ipf_gro_all(&rx.gro, order)
    for i in range(n):
        gro_write(rx, order[i])


cdef int write_inner(ipf_rx *rx, uint8_t *inner, uint32_t inner_len, bint partial, uint16_t cstart,
                     uint16_t coff) noexcept nogil:
    """Writes one inner packet to the TUN. partial: its L4 checksum at
    cstart + coff holds only the pseudo-header sum; the TUN's stack takes
    it as it is (CHECKSUM_PARTIAL), or it is completed here."""
    cdef uint32_t hdr = IPF_VNET_HLEN if rx.vnet else 0
    if hdr:
        # The outer headers before inner are spent: the virtio_net_hdr
        # goes there, and one write() takes both.
        memset(inner - hdr, 0, hdr)
        if partial:
            ipf_vnet_partial(<virtio_net_hdr *>(inner - hdr), cstart, coff)
    elif partial:
        ipf_csum_complete(inner, inner_len, cstart, coff)
    if c.write(rx.tun_fd, inner - hdr, inner_len + hdr) != inner_len + hdr:
        return IPF_RX_WRITE_FAILED
    rx.stats.packets += 1
    rx.stats.bytes += inner_len
    return IPF_RX_OK


cdef bint rx_idle(ipf_rx *rx, uint32_t got) noexcept nogil:
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
    if rx.coalesce_us and (got >= rx.nap_min or (rx.loaded and got > 1)):
        rx.loaded = True
        c.usleep(rx.coalesce_us)
        return not stopping(rx.shared)
    rx.loaded = False
    gro_write_all(rx)
    return wait_readable(rx.fd, rx.shared, &rx.spin, rx.ifindex, &rx.err)
