"""The TX ring's bookkeeping, as the encap loop keeps it (worker.h), on a
ring in plain memory: the test sets each slot's status as the kernel and
the device would (the TP_STATUS_* values of linux/if_packet.h)."""
from __future__ import annotations

import struct

import pytest

from ipipfast_lab.packets import TxRing

AVAILABLE, SEND_REQUEST, SENDING = 0, 1, 2  # TP_STATUS_* in linux/if_packet.h
ENCAP_HLEN = 14 + 20
VNET_HDR = struct.Struct("<BBHHHH")  # virtio_net_hdr: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
NEEDS_CSUM = 1


def frame(inner: int, fill: int = 0xAB) -> bytes:
    """An encapsulated frame carrying `inner` bytes."""
    return bytes(ENCAP_HLEN) + bytes([fill]) * inner


# (name, head, inner sizes queued, each slot's status after the send(), refused,
#  (packets, bytes, send_failed) counted, head and frames queued after, statuses after)
SENDS = [
    ("all taken and released", 0, [10, 20, 30], [AVAILABLE] * 3, False,
     (3, 60, 0), 3, 0, [AVAILABLE] * 3),
    ("all taken, the device still holds them", 0, [10, 20, 30], [SENDING] * 3, False,
     (3, 60, 0), 3, 0, [SENDING] * 3),
    ("send buffer full: the last two left for the next send", 0, [10, 20, 30, 40],
     [AVAILABLE, SENDING, SEND_REQUEST, SEND_REQUEST], False,
     (2, 30, 0), 4, 2, [AVAILABLE, SENDING, SEND_REQUEST, SEND_REQUEST]),
    ("nothing taken", 0, [10, 20], [SEND_REQUEST] * 2, False,
     (0, 0, 0), 2, 2, [SEND_REQUEST] * 2),
    ("refused: all dropped and handed back, the ring rewound", 0, [10, 20, 30], [SEND_REQUEST] * 3, True,
     (0, 0, 3), 0, 0, [AVAILABLE] * 3),
    ("refused after the kernel took one", 0, [10, 20, 30], [SENDING, SEND_REQUEST, SEND_REQUEST], True,
     (1, 10, 2), 1, 0, [SENDING, AVAILABLE, AVAILABLE]),
    ("across the ring's end", 6, [10, 20, 30, 40], [AVAILABLE, AVAILABLE, SEND_REQUEST, SEND_REQUEST], False,
     (2, 30, 0), 2, 2, [AVAILABLE, AVAILABLE, SEND_REQUEST, SEND_REQUEST]),
    ("refused across the ring's end", 6, [10, 20, 30, 40], [AVAILABLE, SEND_REQUEST, SEND_REQUEST, SEND_REQUEST],
     True, (1, 10, 3), 7, 0, [AVAILABLE] * 4),
]


@pytest.mark.parametrize("name,head,sizes,kernel,refused,counted,head_after,queued,statuses", SENDS,
                         ids=[c[0] for c in SENDS])
def test_after_a_send(name, head, sizes, kernel, refused, counted, head_after, queued, statuses):
    ring = TxRing(frames=8, head=head)
    for size in sizes:
        assert ring.put(frame(size))
    assert [ring.status(head + i) for i in range(len(sizes))] == [SEND_REQUEST] * len(sizes)
    assert (ring.head, ring.queued, ring.queued_bytes) == ((head + len(sizes)) % 8, len(sizes), sum(sizes))
    for i, status in enumerate(kernel):
        ring.set_status(head + i, status)
    ring.sent(refused)
    assert ring.counters == counted
    assert (ring.head, ring.queued) == (head_after, queued)
    assert ring.queued_bytes == sum(sizes[len(sizes) - queued:])
    assert [ring.status(head + i) for i in range(len(sizes))] == statuses


def test_what_a_send_left_is_counted_once_the_next_takes_it():
    ring = TxRing(frames=8)
    for size in (10, 20, 30):
        ring.put(frame(size))
    ring.set_status(0, AVAILABLE)
    ring.sent()
    assert (ring.counters, ring.queued) == ((1, 10, 0), 2)
    ring.put(frame(40))
    for i in (1, 2, 3):
        ring.set_status(i, AVAILABLE)
    ring.sent()
    assert (ring.counters, ring.queued, ring.queued_bytes) == ((4, 100, 0), 0, 0)


def test_a_slot_still_held_takes_no_frame():
    ring = TxRing(frames=2)
    assert ring.put(frame(1)) and ring.put(frame(2))
    assert not ring.put(frame(3))  # the ring is full of frames not yet sent
    ring.set_status(0, SENDING)
    ring.set_status(1, SENDING)
    ring.sent()
    assert not ring.put(frame(3))  # sent, and the device holds them still
    ring.set_status(0, AVAILABLE)
    assert ring.put(frame(3)) and ring.slot(0)[1] == frame(3)


@pytest.mark.parametrize("offload", [True, False], ids=["device completes checksums", "computed here"])
def test_slot_holds_the_frame_behind_its_virtio_net_hdr(offload):
    ring = TxRing(frames=4, partial=offload)
    data = frame(100, fill=7)
    ring.put(data, partial=True, cstart=54, coff=16)
    ring.put(data)
    vh, got = ring.slot(0)
    assert got == data
    want = (NEEDS_CSUM, 0, len(data), 0, 54, 16) if offload else (0, 0, len(data), 0, 0, 0)
    assert VNET_HDR.unpack(vh) == want
    assert VNET_HDR.unpack(ring.slot(1)[0]) == (0, 0, len(data), 0, 0, 0)
