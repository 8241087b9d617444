# The TX ring's system calls: the send() that hands the kernel the queued
# frames, and the waits for the device to take or release them. What a
# send() did to the ring is counted in C (ipf_tx_sent, worker.h).

cdef enum:
    # How long the encap loop waits for the device to take or release
    # frames (a full ring, or a send socket out of buffer) before it drops.
    TX_WAIT_US = 10000
    TX_WAIT_STEP_US = 50


cdef void tx_queue(ipf_tx *tx, ipf_peer_count *peer, const c.iovec *iov, uint32_t niov, bint partial,
                   uint16_t cstart, uint16_t coff) noexcept nogil:
    """Puts a frame in the next slot (ipf_tx_put), counted toward its
    peer; one the device does not free in time is dropped."""
    if not ipf_tx_free(tx) and not tx_room(tx):
        tx.stats.drops[IPF_TX_SEND_FAILED] += 1
        return
    ipf_peer_count_add(peer, ipf_tx_put(tx, iov, niov, partial, cstart, coff))


cdef bint tx_room(ipf_tx *tx) noexcept nogil:
    """The next slot still holds a frame: one queued and not yet taken,
    or taken and not yet released by the device. Sends what is queued
    and waits up to TX_WAIT_US for the slot; False if the device is
    down or stays that far behind."""
    cdef uint32_t waited = 0
    while tx_send(tx):
        if ipf_tx_free(tx):
            return True
        if not tx_nap(tx, &waited):
            return False
    return False


cdef bint tx_kick(ipf_tx *tx) noexcept nogil:
    """Has the kernel send every frame queued in the TX ring. If its send
    buffer is full of frames a device still holds, it tries again for up
    to TX_WAIT_US, and what it could not take stays queued. False if the
    device refused them (see tx_send)."""
    cdef uint32_t waited = 0
    while tx_send(tx):
        if tx.queued == 0 or not tx_nap(tx, &waited):
            return True
    return False


cdef bint tx_nap(ipf_tx *tx, uint32_t *waited) noexcept nogil:
    """One step of waiting for the device; False once TX_WAIT_US is spent.
    Stopping does not cut it short: what the loop read is still sent."""
    if waited[0] >= TX_WAIT_US:
        return False
    c.usleep(TX_WAIT_STEP_US)
    waited[0] += TX_WAIT_STEP_US
    return True


cdef void tx_drain(ipf_tx *tx) noexcept nogil:
    """At stop: sends what is still queued, waiting TX_WAIT_US at most, and
    counts what the device would not take as dropped; the ring goes with
    the socket, and nothing may leave it uncounted."""
    tx_kick(tx)
    tx.stats.drops[IPF_TX_SEND_FAILED] += tx.queued
    tx.queued = 0
    tx.queued_bytes = 0


cdef bint tx_send(ipf_tx *tx) noexcept nogil:
    """One send() of what is queued, counted by ipf_tx_sent. False when
    the device refused the frames (down, gone)."""
    cdef bint refused
    if tx.queued == 0:
        return True
    refused = c.send(tx.fd, NULL, 0, c.MSG_DONTWAIT) < 0 and c.errno != c.EAGAIN \
        and c.errno != c.ENOBUFS and c.errno != c.EINTR
    ipf_tx_sent(tx, refused)
    return not refused
