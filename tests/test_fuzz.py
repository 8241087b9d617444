"""Fuzzing the per-packet C with invariants (hypothesis): whatever bytes
arrive, each packet is either dropped with a named reason or comes out
well-formed, and nothing crashes. The oracles are scapy and a plain RFC
1071 sum, never our own encoder."""
from __future__ import annotations

from ipaddress import IPv4Address

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw, raw

from ipipfast._datapath import RX_REASONS, TX_REASONS
from ipipfast_lab.packets import GRO_FLOWS, Dropped, Tunnel, coalesce
from ipipfast_lab.traffic import inet_checksum

LOCAL, PEER = "198.18.0.11", "198.18.0.10"
PEER_MAC = bytes.fromhex("02000000000a")
GSO_TCPV4, GSO_UDP_L4 = 1, 5
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def receiver() -> Tunnel:
    return Tunnel(LOCAL, routes=[], peers=[(int(IPv4Address(PEER)), PEER_MAC)])


def sender(mtu: int = 1500) -> Tunnel:
    return Tunnel(PEER, mtu=mtu, routes=[(int(IPv4Address("198.19.0.0")), 16, 0)],
                  peers=[(int(IPv4Address(LOCAL)), b"\x02" * 6)])


def ipip(inner: bytes, **outer) -> bytes:
    return raw(Ether(src="02:00:00:00:00:0a", dst="02:00:00:00:00:0b")
               / IP(src=PEER, dst=LOCAL, proto=4, **outer) / Raw(inner))


def inner_packet(size: int, proto: str = "udp", tos: int = 0) -> bytes:
    l4 = UDP(sport=1, dport=2) if proto == "udp" else TCP(sport=1, dport=2, flags="A")
    return raw(IP(src="198.19.0.2", dst="198.19.1.2", tos=tos) / l4 / Raw((bytes(range(256)) * (size // 256 + 1))[:size]))


GOOD = [ipip(inner_packet(n, p, tos), tos=otos)
        for n, p, tos, otos in ((8, "udp", 0, 0), (1400, "tcp", 1, 3), (0, "udp", 2, 2))]


def check_decap(frame: bytes) -> None:
    """The invariants of one received frame."""
    try:
        inner = receiver().decapsulate(frame)
    except Dropped as d:
        assert d.reason in RX_REASONS
        return
    assert frame[6:12] == PEER_MAC
    outer = frame[14:]
    ihl = (outer[0] & 0x0F) * 4
    assert outer[0] >> 4 == 4 and outer[9] == 4 and inet_checksum(outer[:ihl]) == 0
    assert outer[12:16] == IPv4Address(PEER).packed and outer[16:20] == IPv4Address(LOCAL).packed
    assert int.from_bytes(outer[6:8], "big") & 0x3FFF == 0  # not a fragment
    assert inner[0] >> 4 == 4 and int.from_bytes(inner[2:4], "big") == len(inner)
    assert inet_checksum(inner[:(inner[0] & 0x0F) * 4]) == 0
    assert inner[9] != 4 and inner[16:20] not in (outer[12:16], outer[16:20])  # no tunnel, no node
    sent = outer[ihl:ihl + len(inner)]
    # Only ECN (RFC 6040: CE from the outer) and the header checksum may differ.
    assert inner[:1] + inner[2:10] + inner[12:] == sent[:1] + sent[2:10] + sent[12:]
    assert inner[1] & 0xFC == sent[1] & 0xFC


@FUZZ
@given(st.binary(max_size=200))
def test_any_bytes_are_dropped_by_reason_or_decapsulated_well_formed(data):
    check_decap(data)


@FUZZ
@given(st.sampled_from(GOOD), st.lists(st.tuples(st.integers(0, 1500), st.integers(0, 255)), max_size=6),
       st.integers(0, 1500))
def test_mutated_ipip_frames_keep_the_invariants(frame, flips, cut):
    b = bytearray(frame)
    for at, value in flips:
        if at < len(b):
            b[at] = value
    check_decap(bytes(b[:max(cut, 14)]))


@FUZZ
@given(st.binary(max_size=120), st.integers(0, 2))
def test_any_inner_bytes_are_dropped_by_reason_or_encapsulated_right(data, variant):
    # Part of the time a plausible IPv4 header in front, so that the checks get past the first byte.
    if variant and len(data) >= 20:
        data = raw(IP(src="198.19.0.2", dst="198.19.1.2", ttl=data[8] or 1, tos=data[1]) / Raw(data[20:]))
    try:
        frame = sender().encapsulate(data)
    except Dropped as d:
        assert d.reason in TX_REASONS
        return
    outer = Ether(frame)[IP]
    assert (outer.src, outer.dst, outer.proto, outer.ihl) == (PEER, LOCAL, 4, 5)
    assert inet_checksum(frame[14:34]) == 0 and outer.len == len(frame) - 14
    assert frame[34:] == data[:len(frame) - 34]


@FUZZ
@given(st.integers(1, 9000), st.integers(200, 3000), st.sampled_from(["tcp", "udp"]), st.integers(576, 9000))
def test_segmentation_covers_the_payload_in_frames_that_fit(size, mss, proto, mtu):
    gso = GSO_TCPV4 if proto == "tcp" else GSO_UDP_L4
    sup = inner_packet(size, proto)
    hlen = 40 if proto == "tcp" else 28
    try:
        frames = sender(mtu).segment(sup, gso, mss)
    except Dropped as d:
        assert d.reason == "too_big" and hlen + mss + 20 > mtu
        return
    body = b""
    for f in frames:
        outer, seg = f[14:34], f[34:]
        assert len(outer) + len(seg) <= mtu and int.from_bytes(outer[2:4], "big") == len(f) - 14
        assert int.from_bytes(seg[2:4], "big") == len(seg) and inet_checksum(seg[:20]) == 0
        assert inet_checksum(seg[12:20] + bytes([0, seg[9]]) + (len(seg) - 20).to_bytes(2, "big") + seg[20:]) == 0
        body += seg[hlen:]
    assert body == sup[hlen:]


@FUZZ
@given(st.lists(st.sampled_from([0, 1, 2, 3, 5]), max_size=12), st.lists(st.integers(0, 1400), max_size=12))
def test_coalescing_delivers_every_payload_byte_once_in_order(order, sizes):
    """Segments of one flow in any order and size: what is written carries
    the same payload bytes, in the order they came."""
    segs = []
    for i, k in enumerate(order):
        n = sizes[i] if i < len(sizes) else 1400
        segs.append(raw(IP(src="198.19.1.2", dst="198.19.0.2", id=k, flags="DF")
                        / TCP(sport=5, dport=6, seq=1 + 1400 * k, flags="A") / Raw(bytes([k]) * n)))
    writes = coalesce(segs)
    assert b"".join(bytes(IP(p)[TCP].payload) for _, p in writes) == b"".join(bytes(IP(s)[TCP].payload) for s in segs)
    for _, p in writes:
        assert int.from_bytes(p[2:4], "big") == len(p) <= 65535 and inet_checksum(p[:20]) == 0


@FUZZ
@given(st.lists(st.tuples(st.integers(0, GRO_FLOWS + 2), st.integers(1, 1400), st.booleans()), max_size=60))
def test_interleaved_flows_each_keep_their_order(packets):
    """Segments of up to 11 flows in any interleaving (more flows than open
    trains, so trains are evicted), of any sizes, with sequence gaps: the
    writes of each flow give back its payload in the order it was sent, and
    each write is a whole IPv4 packet."""
    seq, ip_id, sent = {}, {}, {}
    segs = []
    for flow, n, gap in packets:
        seq[flow] = seq.get(flow, 1) + (1000 if gap else 0)
        ip_id[flow] = ip_id.get(flow, 100 * flow)
        payload = bytes([len(segs) & 0xff]) * n
        segs.append(raw(IP(src="198.19.1.2", dst="198.19.0.2", id=ip_id[flow], flags="DF")
                        / TCP(sport=1000 + flow, dport=6, seq=seq[flow], flags="A") / Raw(payload)))
        sent[flow] = sent.get(flow, b"") + payload
        seq[flow] += n
        ip_id[flow] += 1
    got: dict[int, bytes] = {}
    for _, p in coalesce(segs):
        assert int.from_bytes(p[2:4], "big") == len(p) <= 65535 and inet_checksum(p[:20]) == 0
        flow = IP(p)[TCP].sport - 1000
        got[flow] = got.get(flow, b"") + bytes(IP(p)[TCP].payload)
    assert got == sent


@FUZZ
@given(st.lists(st.tuples(st.integers(1, 1400), st.integers(0, 2)), max_size=12))
def test_udp_coalescing_gives_back_each_datagram(grams):
    """Datagrams of one flow, of any sizes and with ID gaps: split as the
    kernel splits a UDP GSO packet (by gso_size), the writes give back each
    payload, in order, none merged with another."""
    sent, ip_id = [], 0
    for n, gap in grams:
        ip_id += gap
        sent.append(raw(IP(src="198.19.1.2", dst="198.19.0.2", id=ip_id, flags="DF")
                        / UDP(sport=5, dport=6) / Raw(bytes([len(sent)]) * n)))
        ip_id += 1
    got = []
    for vnet, p in coalesce(sent):
        gso_size = int.from_bytes(vnet[4:6], "little")
        body = p[28:]
        got += [body[i:i + gso_size] for i in range(0, len(body), gso_size)] if vnet[1] else [body]
    assert got == [s[28:] for s in sent]
