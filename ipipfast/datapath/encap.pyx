# The encap loop: TUN reads -> IPIP frames in the TX ring; and the ICMP
# errors it (and the control thread) sends to inner senders.

cdef enum:
    GSO_MAX = 65536
    # Outer IP IDs a worker takes from the datapath's counter at a time.
    ID_BLOCK = 64


cdef void encap_loop(ipf_tx *tx) noexcept nogil:
    cdef ipf_qsbr *q = &tx.qsbr
    cdef const ipf_table *t
    cdef ipf_peer_count *counts
    # Every packet is in the TX ring (or dropped) before the next read,
    # so one buffer takes them all, and it stays in this core's cache
    # for the kernel's copy into it and ours out of it. A batch is the
    # number of reads between two send()s.
    cdef uint8_t *pkt = tx.buf + HEADROOM
    cdef ssize_t r
    cdef uint32_t i, n
    cdef uint32_t hdr = IPF_VNET_HLEN if tx.vnet else 0
    cdef virtio_net_hdr vh
    cdef bint drained
    memset(&vh, 0, sizeof(vh))
    while not stopping(tx.shared):
        t = ipf_qsbr_enter(q, &tx.shared.table)
        counts = ipf_table_counts(t, tx.count_row)
        drained = False
        for i in range(tx.batch):
            # The virtio_net_hdr lands in the headroom, read before the
            # outer headers overwrite it.
            r = c.read(tx.tun_fd, pkt - hdr, tx.buf_size - HEADROOM + hdr)
            if r < 0:
                drained = True
                break
            if r < hdr:
                tx.stats.drops[IPF_TX_BAD_HEADER] += 1
                continue
            if hdr:
                memcpy(&vh, pkt - hdr, hdr)
            n = <uint32_t>r - hdr
            encap_one(tx, t, counts, pkt, n, &vh)
        if drained and c.errno != c.EAGAIN and c.errno != c.EINTR:
            tx.err = c.errno
            ipf_qsbr_leave(q)
            return
        ipf_qsbr_quiescent(q)
        tx_kick(tx)
        if drained:
            ipf_qsbr_leave(q)
            if not wait_readable(tx.tun_fd, tx.shared, &tx.spin, tx.ifindex, &tx.err):
                return
    ipf_qsbr_leave(q)


cdef void encap_one(ipf_tx *tx, const ipf_table *t, ipf_peer_count *counts, uint8_t *pkt, uint32_t n,
                    const virtio_net_hdr *vh) noexcept nogil:
    """Queues pkt's frames (one, or one per segment) in the TX ring,
    counted toward their peer in counts (the loop's row of t's)."""
    cdef const ipf_peer *peer
    cdef ipf_gso_plan plan
    cdef uint32_t length, s
    cdef bint gso = vh.gso_type != VIRTIO_NET_HDR_GSO_NONE
    cdef bint partial = not gso and vh.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM
    cdef int reason
    cdef c.iovec iov[2]
    if partial:
        if not ipf_csum_fits(n, vh.csum_start, vh.csum_offset):
            tx.stats.drops[IPF_TX_BAD_HEADER] += 1
            return
        if not tx.partial:
            ipf_csum_complete(pkt, n, vh.csum_start, vh.csum_offset)
    reason = ipf_encap_classify(t, &tx.tn, pkt, n, gso, &length, &peer)
    if reason == IPF_TX_OK and gso:
        reason = ipf_gso_plan_of(vh, pkt, length, ipf_peer_mtu(&tx.tn, peer), &plan)
    if reason != IPF_TX_OK:
        tx.stats.drops[reason] += 1
        if reason == IPF_TX_NO_ROUTE:
            icmp_send(&tx.icmp, &tx.stats.icmp, pkt, n, 3, 0, 0)  # destination net unreachable
        elif reason == IPF_TX_TOO_BIG and pkt[6] & 0x40:
            # fragmentation needed, with the MTU that fits inside the tunnel
            icmp_send(&tx.icmp, &tx.stats.icmp, pkt, n, 3, 4, ipf_peer_mtu(&tx.tn, peer) - IPF_IP_HLEN)
        return
    if not gso:
        ipf_encap_write(&tx.tn, t.src_mac, peer, pkt, length, next_id(tx))
        iov[0].iov_base = pkt - IPF_ENCAP_HLEN
        iov[0].iov_len = length + IPF_ENCAP_HLEN
        tx_queue(tx, &counts[peer - t.peers], iov, 1, partial, vh.csum_start + IPF_ENCAP_HLEN, vh.csum_offset)
        return
    tx.stats.gso += 1
    for s in range(plan.nseg):
        ipf_gso_segment(&tx.tn, t.src_mac, peer, pkt, length, &plan, s, next_id(tx), tx.partial, tx.seg_hdrs,
                        iov)
        tx_queue(tx, &counts[peer - t.peers], iov, 2, True, IPF_ENCAP_HLEN + (pkt[0] & 0x0f) * 4,
                 ipf_l4_csum_offset(plan.proto))


cdef inline uint16_t next_id(ipf_tx *tx) noexcept nogil:
    """The next outer IP ID. Workers take blocks from one counter, so
    that no two frames toward a peer share an ID (RFC 6864: a repeated
    ID lets fragments of two packets be joined) without an atomic per
    frame."""
    if tx.ip_id == tx.ip_id_end:
        tx.ip_id = ipf_fetch_add_u32(&tx.shared.ip_id, ID_BLOCK)
        tx.ip_id_end = tx.ip_id + ID_BLOCK
    tx.ip_id += 1
    return <uint16_t>(tx.ip_id - 1)


cdef bint icmp_send(ipf_icmp_sender *s, ipf_icmp_stats *counts, const uint8_t *pkt, uint32_t n,
                    uint8_t type, uint8_t code, uint32_t info) noexcept nogil:
    """Sends an ICMP error about pkt (an inner packet, or as much of it as
    was quoted) to its source, as this node's stack does for tunl0: written
    into the TUN, a packet from a local source would be dropped as a
    martian. False when RFC 1812 forbids one, a rate limit holds it back
    or the send fails."""
    cdef uint32_t length = ipf_icmp_error(s.buf, s.src, pkt, n, type, code, info)
    cdef c.sockaddr_in dst
    if length == 0:
        return False
    memset(&dst, 0, sizeof(dst))
    dst.sin_family = c.AF_INET
    memcpy(&dst.sin_addr.s_addr, s.buf + 16, 4)
    if not ipf_icmp_allow(&s.dests, s.budget, dst.sin_addr.s_addr, now_ns()):
        counts.ratelimited += 1
        return False
    if c.sendto(s.fd, s.buf, length, 0, <c.sockaddr *>&dst, sizeof(dst)) != length:
        return False
    counts.sent += 1
    return True
