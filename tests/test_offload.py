"""TUN offloads: segmentation of GSO super-packets (encap) and coalescing of
TCP segments (decap), against packets built by scapy."""
from __future__ import annotations

import struct
from ipaddress import IPv4Address

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw, raw

from ipipfast_lab.packets import GRO_FLOWS, Dropped, Tunnel, coalesce
from ipipfast_lab.traffic import inet_checksum

LOCAL, PEER = "198.18.0.10", "198.18.0.11"
LOCAL_MAC, PEER_MAC = "02:00:00:00:00:0a", "02:00:00:00:00:0b"
SRC, DST = "198.19.0.2", "198.19.1.2"
GSO_TCPV4, GSO_UDP_L4, GSO_TCPV6 = 1, 5, 4
NEEDS_CSUM = 1
TS = [("NOP", None), ("NOP", None), ("Timestamp", (1000, 2000))]


def tunnel(mtu: int = 1500) -> Tunnel:
    return Tunnel(LOCAL, bytes.fromhex(LOCAL_MAC.replace(":", "")), mtu=mtu,
                  routes=[(int(IPv4Address("198.19.1.0")), 24, 0)],
                  peers=[(int(IPv4Address(PEER)), bytes.fromhex(PEER_MAC.replace(":", "")))])


def outer(inner: bytes, ip_id: int) -> bytes:
    inner_ip = IP(inner)
    return raw(Ether(dst=PEER_MAC, src=LOCAL_MAC)
               / IP(src=LOCAL, dst=PEER, proto=4, ttl=inner_ip.ttl, tos=inner_ip.tos & 3, id=ip_id,
                    flags="DF" if inner_ip.flags.DF else 0) / Raw(inner))


def payload(n: int) -> bytes:
    return bytes((i * 7 + 3) & 0xff for i in range(n))


# (name, tcp flags of the super-packet, payload size, mss, expected flags per segment)
TSO_CASES = [
    ("exact multiple", "PA", 4200, 1400, ["A", "A", "PA"]),
    ("short tail", "PA", 3000, 1400, ["A", "A", "PA"]),
    ("fin only on the last", "FPA", 2000, 1400, ["A", "FPA"]),
    ("cwr only on the first", "CA", 2800, 1400, ["CA", "A"]),
    ("one segment", "A", 500, 1400, ["A"]),
]


@pytest.mark.parametrize("name,flags,size,mss,seg_flags", TSO_CASES, ids=[c[0] for c in TSO_CASES])
def test_tcp_segmentation(name, flags, size, mss, seg_flags):
    data = payload(size)
    sup = IP(src=SRC, dst=DST, id=100, flags="DF", ttl=63, tos=0x02) / TCP(
        sport=1111, dport=2222, seq=5000, ack=77, flags=flags, window=512, options=TS) / Raw(data)
    frames = tunnel().segment(raw(sup), GSO_TCPV4, mss, ip_id=40)
    assert len(frames) == len(seg_flags)
    for i, (frame, f) in enumerate(zip(frames, seg_flags)):
        chunk = data[i * mss:(i + 1) * mss]
        seg = raw(IP(src=SRC, dst=DST, id=100 + i, flags="DF", ttl=63, tos=0x02) / TCP(
            sport=1111, dport=2222, seq=5000 + i * mss, ack=77, flags=f, window=512, options=TS) / Raw(chunk))
        assert frame == outer(seg, 40 + i), f"segment {i}"


def test_udp_segmentation():
    data = payload(2500)
    sup = IP(src=SRC, dst=DST, id=9, ttl=64) / UDP(sport=53, dport=5353) / Raw(data)
    frames = tunnel().segment(raw(sup), GSO_UDP_L4, 1000, ip_id=1)
    assert len(frames) == 3
    for i, frame in enumerate(frames):
        seg = raw(IP(src=SRC, dst=DST, id=9 + i, ttl=64) / UDP(sport=53, dport=5353) / Raw(data[i * 1000:(i + 1) * 1000]))
        assert frame == outer(seg, 1 + i)


def complete_l4(frame: bytes, at: int) -> bytes:
    """Completes a partial L4 checksum (the field holds the pseudo-header
    sum) as a device does: the complement of the sum from the L4 header on."""
    l4 = 14 + 20 + 20
    done = bytearray(frame)
    done[l4 + at:l4 + at + 2] = inet_checksum(bytes(done[l4:])).to_bytes(2, "big")
    return bytes(done)


PARTIAL_CASES = [
    ("tcp", GSO_TCPV4, TCP(sport=1111, dport=2222, seq=5000, ack=77, flags="PA", options=TS), 16),
    ("udp", GSO_UDP_L4, UDP(sport=53, dport=5353), 6),
]


@pytest.mark.parametrize("name,gso_type,l4,at", PARTIAL_CASES, ids=[c[0] for c in PARTIAL_CASES])
def test_partial_segments_leave_the_checksum_to_the_device(name, gso_type, l4, at):
    sup = raw(IP(src=SRC, dst=DST, id=9, flags="DF", ttl=64) / l4 / Raw(payload(3000)))
    full = tunnel().segment(sup, gso_type, 1200, ip_id=3)
    partial = tunnel().segment(sup, gso_type, 1200, ip_id=3, partial=True)
    assert len(partial) == len(full) == 3
    for p, f in zip(partial, full):
        assert p != f  # the checksum is not computed
        assert complete_l4(p, at) == f  # what the device makes of it is what we would have sent


SEG_DROPS = [
    ("segment larger than the mtu", GSO_TCPV4, 1461, 1500, "too_big"),
    ("ipv6 gso type", GSO_TCPV6, 1000, 1500, "not_ipv4"),
    ("zero gso size", GSO_TCPV4, 0, 1500, "bad_header"),
]


@pytest.mark.parametrize("name,gso_type,mss,mtu,reason", SEG_DROPS, ids=[c[0] for c in SEG_DROPS])
def test_segmentation_drops(name, gso_type, mss, mtu, reason):
    sup = IP(src=SRC, dst=DST) / TCP() / Raw(payload(5000))
    with pytest.raises(Dropped, match=reason):
        tunnel(mtu).segment(raw(sup), gso_type, mss)


def test_udp_gso_type_on_tcp_is_refused():
    with pytest.raises(Dropped, match="bad_header"):
        tunnel().segment(raw(IP(src=SRC, dst=DST) / TCP() / Raw(payload(3000))), GSO_UDP_L4, 1000)


# ---- coalescing ---------------------------------------------------------------

def segment(i: int, *, mss: int = 1400, seq0: int = 1, ip_id0: int = 10, flags: str = "A", sport: int = 1111,
            df: bool = True, size: int | None = None, id_step: int = 1, bad_checksum: bool = False,
            options=TS) -> bytes:
    p = IP(src=DST, dst=SRC, id=ip_id0 + i * id_step, flags="DF" if df else 0, ttl=62) / TCP(
        sport=sport, dport=2222, seq=seq0 + i * mss, ack=99, flags=flags, window=1000, options=options) / Raw(
        payload(size if size is not None else mss)[::-1])
    b = bytearray(raw(p))
    if bad_checksum:
        b[36] ^= 0xff
    return bytes(b)


def check_merged(vnet: bytes, pkt: bytes, segs: list[bytes]) -> None:
    """pkt must be the segments as one TCP packet, its checksum left partial
    exactly as virtio_net_hdr says; the oracle is scapy's whole packet."""
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = struct.unpack("=BBHHHH", vnet)
    first, last = IP(segs[0]), IP(segs[-1])
    thl = first[TCP].dataofs * 4
    assert (flags, gso_type, hdr_len, gso_size, csum_start, csum_offset) == (
        NEEDS_CSUM, GSO_TCPV4, 20 + thl, len(first[TCP].payload), 20, 16)
    body = b"".join(bytes(IP(s)[TCP].payload) for s in segs)
    want = first.copy()
    del want.len, want.chksum, want[TCP].chksum
    want[TCP].remove_payload()
    want[TCP].flags = int(first[TCP].flags) | (int(last[TCP].flags) & 0x08)  # PSH of the last
    want = IP(raw(want / Raw(body)))  # scapy recomputes lengths and checksums
    # Complete the partial checksum as the kernel would, then compare whole.
    done = bytearray(pkt)
    done[36:38] = inet_checksum(bytes(done[20:])).to_bytes(2, "big")
    assert bytes(done) == raw(want)


def test_a_train_becomes_one_gso_packet():
    segs = [segment(i) for i in range(5)]
    [(vnet, pkt)] = coalesce(segs)
    check_merged(vnet, pkt, segs)


def test_short_last_segment_and_psh_close_the_train():
    segs = [segment(0), segment(1), segment(2, size=100, flags="PA"), segment(3)]
    writes = coalesce(segs)
    assert len(writes) == 2
    check_merged(*writes[0], segs[:3])
    assert writes[1] == (bytes(10), segs[3])


def test_fixed_ids_merge_only_with_df():
    segs = [segment(i, id_step=0) for i in range(3)]
    check_merged(*coalesce(segs)[0], segs)
    segs = [segment(i, id_step=0, df=False) for i in range(3)]
    assert [len(p) for _, p in coalesce(segs)] == [len(s) for s in segs]


BREAKS = [
    ("sequence gap", [segment(0), segment(2)], [1, 1]),
    ("bad checksum is written alone", [segment(0), segment(1, bad_checksum=True), segment(2)], [1, 1, 1]),
    ("syn never merges", [segment(0, flags="S"), segment(1)], [1, 1]),
    ("larger than the first", [segment(0, size=500), segment(1, size=600, seq0=1 - 1400 + 500)], [1, 1]),
    ("different options", [segment(0), segment(1, options=[("NOP", None), ("NOP", None), ("Timestamp", (1001, 2000))])], [1, 1]),
    ("pure ack", [raw(IP(src=DST, dst=SRC) / TCP(flags="A")), segment(0)], [1, 1]),
    ("three then a gap", [segment(0), segment(1), segment(2), segment(4)], [3, 1]),
]


def check_writes(packets: list[bytes], trains: list[int], check_train) -> None:
    """coalesce(packets) makes one write per train, each of `trains`
    packets in order: a lone one as it came, the others as check_train
    accepts them."""
    writes = coalesce(packets)
    assert len(writes) == len(trains)
    i = 0
    for (vnet, pkt), n in zip(writes, trains):
        if n == 1:
            assert (vnet, pkt) == (bytes(10), packets[i])
        else:
            check_train(vnet, pkt, packets[i:i + n])
        i += n


@pytest.mark.parametrize("name,segs,trains", BREAKS, ids=[b[0] for b in BREAKS])
def test_what_breaks_a_train(name, segs, trains):
    check_writes(segs, trains, check_merged)


def test_interleaved_flows_make_a_train_each():
    """Segments of several flows, interleaved as streams share a ring,
    merge per flow, as the kernel's GRO keeps a train per flow; the trains
    are written in the order they started."""
    a = [segment(i) for i in range(3)]
    b = [segment(i, sport=7, seq0=90001, ip_id0=500) for i in range(3)]
    writes = coalesce([a[0], b[0], a[1], b[1], a[2], b[2]])
    assert len(writes) == 2
    check_merged(*writes[0], a)
    check_merged(*writes[1], b)


def test_a_flow_beyond_the_open_trains_writes_the_oldest_first():
    flows = [[segment(i, sport=1000 + f, ip_id0=100 * f) for i in range(2)] for f in range(GRO_FLOWS + 1)]
    firsts = [f[0] for f in flows]
    writes = coalesce(firsts + [f[1] for f in flows[1:]])
    assert writes[0] == (bytes(10), flows[0][0])  # its place went to the newcomer
    assert len(writes) == 1 + GRO_FLOWS
    for w, f in zip(writes[1:], flows[1:]):
        check_merged(*w, f)


def test_what_comes_after_a_train_waits_for_it():
    """A packet that merges with nothing (here a FIN of the same flow) is
    written after every open train, so no flow's segments are reordered."""
    a = [segment(i) for i in range(2)]
    fin = segment(2, flags="FA")
    writes = coalesce([a[0], a[1], fin])
    check_merged(*writes[0], a)
    assert writes[1:] == [(bytes(10), fin)]


def flow(f: int, n: int) -> list[bytes]:
    return [segment(i, sport=1000 + f, ip_id0=100 * f) for i in range(n)]


A, B = flow(0, 4), flow(1, 3)
A_PSH = [segment(0, sport=1000), segment(1, sport=1000, flags="PA")]
# (name, packets found in the ring in batches of 2, hold, the trains written in order)
BATCH_ENDS = [
    ("a train grows across batches while its flow keeps coming", A, True, [A]),
    ("not held, a train is written at each batch's end", A, False, [A[:2], A[2:]]),
    ("a flow quiet for a batch is written at its end", [A[0], B[0], B[1], B[2]], True, [A[:1], B]),
    ("a full train is written at the batch's end though held", A_PSH + B[:2], True, [A_PSH, B[:2]]),
]


@pytest.mark.parametrize("name,packets,hold,trains", BATCH_ENDS, ids=[c[0] for c in BATCH_ENDS])
def test_the_end_of_a_batch(name, packets, hold, trains):
    """What the decap loop writes at the end of each batch, and when its
    ring runs dry (after a full batch it looks once more and finds none)."""
    writes = coalesce(packets, batch=2, hold=hold)
    assert len(writes) == len(trains)
    for (vnet, pkt), train in zip(writes, trains):
        if len(train) == 1:
            assert (vnet, pkt) == (bytes(10), train[0])
        else:
            check_merged(vnet, pkt, train)


def test_train_stops_below_64k():
    segs = [segment(i) for i in range(60)]
    writes = coalesce(segs)
    assert all(len(p) <= 65535 for _, p in writes)
    assert sum(len(p) - 52 for _, p in writes) == 60 * 1400


def as_partial(seg: bytes) -> bytes:
    """seg as a local sender hands it to its device: the TCP checksum holds
    the pseudo-header sum only (CHECKSUM_PARTIAL)."""
    pseudo = seg[12:20] + struct.pack("!BBH", 0, 6, len(seg) - 20)
    b = bytearray(seg)
    b[36:38] = (~inet_checksum(pseudo) & 0xFFFF).to_bytes(2, "big")
    return bytes(b)


def test_partial_segments_are_trusted_and_merge():
    segs = [segment(i) for i in range(4)]
    # Unverifiable without trust: each is written alone, as it came.
    assert [p for _, p in coalesce([as_partial(s) for s in segs])] == [as_partial(s) for s in segs]
    [(vnet, pkt)] = coalesce([as_partial(s) for s in segs], partial=True)
    check_merged(vnet, pkt, segs)


def test_a_lone_partial_segment_keeps_needs_csum():
    seg = segment(0, flags="PA")
    [(vnet, pkt)] = coalesce([as_partial(seg)], partial=True)
    assert struct.unpack("=BBHHHH", vnet) == (NEEDS_CSUM, 0, 0, 0, 20, 16)
    done = bytearray(pkt)
    done[36:38] = inet_checksum(bytes(done[20:])).to_bytes(2, "big")
    assert bytes(done) == seg


# ---- UDP coalescing (the TUN takes UDP GSO packets) ---------------------------

def datagram(i: int, size: int = 500, *, ip_id0: int = 30, df: bool = True, sport: int = 4000,
             zero_checksum: bool = False) -> bytes:
    p = IP(src=DST, dst=SRC, id=ip_id0 + i, flags="DF" if df else 0, ttl=61, tos=0x10) / UDP(
        sport=sport, dport=53) / Raw(bytes([i & 0xFF]) * size)
    if zero_checksum:
        p[UDP].chksum = 0
    return raw(p)


def split_udp(vnet: bytes, pkt: bytes) -> list[bytes]:
    """What the kernel's UDP segmentation (__udp_gso_segment) makes of a
    write: one datagram per gso_size of payload, rebuilt by scapy."""
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = struct.unpack("=BBHHHH", vnet)
    assert (flags, gso_type, hdr_len, csum_start, csum_offset) == (NEEDS_CSUM, GSO_UDP_L4, 28, 20, 6)
    first = IP(pkt)
    body = pkt[28:]
    out = []
    for i in range(0, len(body), gso_size):
        d = first.copy()
        del d.len, d.chksum, d[UDP].len, d[UDP].chksum
        d.id = (first.id + i // gso_size) & 0xFFFF
        d[UDP].remove_payload()
        out.append(raw(d / Raw(body[i:i + gso_size])))
    return out


def test_a_udp_flow_becomes_one_udp_gso_packet():
    grams = [datagram(i) for i in range(6)] + [datagram(6, size=120)]  # a shorter last one may join
    [(vnet, pkt)] = coalesce(grams)
    assert split_udp(vnet, pkt) == grams
    # Its checksum is the pseudo-header sum over the whole, as segmentation expects.
    assert struct.unpack("!H", pkt[24:26])[0] == len(pkt) - 20


UDP_BREAKS = [
    ("larger than the first", [datagram(0, 300), datagram(1, 500)], [1, 1]),
    ("after a shorter one", [datagram(0), datagram(1, 100), datagram(2)], [2, 1]),
    ("id gap", [datagram(0), datagram(2)], [1, 1]),
    ("no checksum never merges", [datagram(0, zero_checksum=True), datagram(1, zero_checksum=True)], [1, 1]),
    ("tcp after udp", [datagram(0), segment(0)], [1, 1]),
]


def check_udp_train(vnet: bytes, pkt: bytes, grams: list[bytes]) -> None:
    assert split_udp(vnet, pkt) == grams


@pytest.mark.parametrize("name,grams,trains", UDP_BREAKS, ids=[b[0] for b in UDP_BREAKS])
def test_what_breaks_a_udp_train(name, grams, trains):
    check_writes(grams, trains, check_udp_train)


def test_interleaved_udp_flows_make_a_train_each():
    a = [datagram(i) for i in range(3)]
    b = [datagram(i, sport=9, ip_id0=700) for i in range(3)]
    writes = coalesce([a[0], b[0], a[1], b[1], a[2], b[2]])
    assert [split_udp(*w) for w in writes] == [a, b]


def test_udp_is_not_coalesced_where_the_tun_takes_no_udp_gso():
    grams = [datagram(i) for i in range(3)]
    assert coalesce(grams, udp=False) == [(bytes(10), g) for g in grams]
