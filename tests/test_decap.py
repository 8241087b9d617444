"""Decapsulation: validation by reason, RFC 6040 ECN, frames built by scapy."""
from __future__ import annotations

from ipaddress import IPv4Address

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw, raw

from ipipfast_lab.packets import Dropped, Tunnel

LOCAL, PEER, STRANGER = "198.18.0.11", "198.18.0.10", "198.18.0.99"
OTHER_PEER = "198.18.5.10"  # a routed peer: its next hop is the gateway
PEER_MAC, GATEWAY_MAC = "02:00:00:00:00:0a", "02:00:00:00:00:01"


def tunnel(**kw) -> Tunnel:
    peers = [(int(IPv4Address(PEER)), bytes.fromhex(PEER_MAC.replace(":", ""))),
             (int(IPv4Address(OTHER_PEER)), bytes.fromhex(GATEWAY_MAC.replace(":", "")))]
    return Tunnel(LOCAL, routes=[], peers=peers, **kw)


def inner(tos=0, size=8, dst="198.19.1.2") -> bytes:
    return raw(IP(src="198.19.0.2", dst=dst, tos=tos) / UDP(sport=1, dport=2) / Raw(b"y" * size))


def frame(payload: bytes, *, src=PEER, dst=LOCAL, tos=0, flags=0, frag=0, proto=4, ihl=None,
          options=b"", chksum=None, length=None, mac=PEER_MAC) -> bytes:
    ip = IP(src=src, dst=dst, proto=proto, tos=tos, flags=flags, frag=frag, options=options)
    if ihl is not None:
        ip.ihl = ihl
    if chksum is not None:
        ip.chksum = chksum
    if length is not None:
        ip.len = length
    return raw(Ether(src=mac, dst="02:00:00:00:00:0b") / ip / Raw(payload))


def test_valid():
    pkt = inner()
    assert tunnel().decapsulate(frame(pkt)) == pkt


def test_ethernet_padding_is_trimmed():
    pkt = raw(IP(src="198.19.0.2", dst="198.19.1.2") / ICMP())  # 28 bytes: the frame gets padded
    assert tunnel().decapsulate(frame(pkt) + b"\x00" * 12) == pkt


def test_outer_options_are_skipped():
    pkt = inner()
    assert tunnel().decapsulate(frame(pkt, options=b"\x01\x01\x01\x00")) == pkt


def test_inner_with_trailing_bytes_is_trimmed():
    pkt = inner()
    assert tunnel().decapsulate(frame(pkt + b"extra")) == pkt


GOOD = frame(inner())
DROPS = [
    ("empty", b"", "truncated"),
    ("ethernet only", GOOD[:14], "truncated"),
    ("outer header cut", GOOD[:30], "truncated"),
    ("not ipv4 ethertype", GOOD[:12] + b"\x86\xdd" + GOOD[14:], "not_ipip"),
    ("outer version 6", GOOD[:14] + b"\x65" + GOOD[15:], "bad_header"),
    ("outer ihl 4", frame(inner(), ihl=4), "bad_header"),
    ("outer ihl above total length", GOOD[:14] + b"\x4f" + GOOD[15:], "bad_header"),
    ("outer ihl past the frame", frame(inner(), options=b"\x01" * 4)[:14 + 22], "truncated"),
    ("outer total length past the frame", frame(inner(), length=200), "truncated"),
    ("outer total length below ihl", frame(inner(), length=19), "bad_header"),
    ("outer checksum", frame(inner(), chksum=0x1234), "bad_checksum"),
    ("not protocol 4", frame(inner(), proto=17), "not_ipip"),
    ("not to this node", frame(inner(), dst="198.18.0.12"), "not_local"),
    ("more fragments", frame(inner(), flags="MF"), "fragment"),
    ("fragment offset", frame(inner(), frag=10), "fragment"),
    ("unknown peer", frame(inner(), src=STRANGER), "unknown_peer"),
    ("on-link peer from another MAC", frame(inner(), mac=GATEWAY_MAC), "source_mac"),
    ("routed peer from a MAC not its gateway's", frame(inner(), src=OTHER_PEER), "source_mac"),
    ("ipip in ipip", frame(raw(IP(src="198.19.0.2", dst=LOCAL, proto=4) / Raw(inner()))), "inner_ipip"),
    ("inner to this node's underlay address", frame(inner(dst=LOCAL)), "inner_to_local"),
    ("inner to the sender's underlay address", frame(inner(dst=PEER)), "inner_to_peer"),
    ("inner to another peer's underlay address", frame(inner(dst=OTHER_PEER)), "inner_to_peer"),
    ("inner shorter than a header", frame(inner()[:19]), "truncated"),
    ("inner not ipv4", frame(b"\x60" + inner()[1:]), "inner_bad"),
    ("inner ihl 4", frame(b"\x44" + inner()[1:]), "inner_bad"),
    ("inner total length past the outer", frame(inner()[:-1]), "truncated"),
    ("inner checksum", frame(inner()[:10] + b"\x00\x01" + inner()[12:]), "inner_bad"),
]


@pytest.mark.parametrize("name,data,reason", DROPS, ids=[d[0] for d in DROPS])
def test_drops(name, data, reason):
    with pytest.raises(Dropped) as e:
        tunnel().decapsulate(data)
    assert e.value.reason == reason


def test_routed_peer_from_its_gateway():
    pkt = inner()
    assert tunnel().decapsulate(frame(pkt, src=OTHER_PEER, mac=GATEWAY_MAC)) == pkt


def test_peer_without_a_resolved_mac_is_dropped():
    t = Tunnel(LOCAL, routes=[], peers=[(int(IPv4Address(PEER)), None)])
    with pytest.raises(Dropped, match="no_neigh"):
        t.decapsulate(frame(inner()))


def test_source_mac_check_off():
    """check_source_mac off (tunnel.check_source_mac: false): any MAC, and a
    peer without one, as tunl0 takes them."""
    pkt = inner()
    assert tunnel(check_source_mac=False).decapsulate(frame(pkt, mac=GATEWAY_MAC)) == pkt
    t = Tunnel(LOCAL, routes=[], peers=[(int(IPv4Address(PEER)), None)], check_source_mac=False)
    assert t.decapsulate(frame(pkt)) == pkt


NOT_ECT, ECT1, ECT0, CE = 0, 1, 2, 3
DROP = None
# RFC 6040 section 4.2, Figure 4: rows are the arriving inner, columns the outer.
RFC6040 = {
    NOT_ECT: {NOT_ECT: NOT_ECT, ECT0: NOT_ECT, ECT1: NOT_ECT, CE: DROP},
    ECT0: {NOT_ECT: ECT0, ECT0: ECT0, ECT1: ECT1, CE: CE},
    ECT1: {NOT_ECT: ECT1, ECT0: ECT1, ECT1: ECT1, CE: CE},
    CE: {NOT_ECT: CE, ECT0: CE, ECT1: CE, CE: CE},
}
NAMES = {NOT_ECT: "not-ect", ECT0: "ect0", ECT1: "ect1", CE: "ce"}
ECN_CASES = [(i, o, RFC6040[i][o]) for i in RFC6040 for o in RFC6040[i]]


@pytest.mark.parametrize("inner_ecn,outer_ecn,result", ECN_CASES,
                         ids=[f"inner {NAMES[i]} outer {NAMES[o]}" for i, o, _ in ECN_CASES])
def test_ecn_decapsulation(inner_ecn, outer_ecn, result):
    dscp = 0xb8
    pkt = inner(tos=dscp | inner_ecn)
    data = frame(pkt, tos=outer_ecn)
    if result is DROP:
        with pytest.raises(Dropped, match="ecn"):
            tunnel().decapsulate(data)
        return
    out = IP(tunnel().decapsulate(data))
    assert out.tos == dscp | result
    # The checksum was kept right: scapy recomputes it from the other fields.
    sent = out.chksum
    del out.chksum
    assert IP(raw(out)).chksum == sent


def test_batch_matches_single():
    """A batch, decapsulated in place as the decap loop does it, makes of each
    frame byte for byte what single decapsulation makes (ECN marks
    included), and drops what that drops, for the same reason."""
    frames = [GOOD, frame(inner(), src=STRANGER), frame(inner(size=1000)), frame(inner(tos=0x02), tos=0x03),
              frame(inner(), tos=0x03), frame(inner() + b"pad"), GOOD[:30]]
    t, inners = tunnel(), []
    assert t.decap_batch(frames, rounds=4, inners=inners) == 4 * 4
    assert [p if isinstance(p, bytes) else p.reason for p in inners] == [single(t, f) for f in frames]


def single(t: Tunnel, data: bytes) -> bytes | str:
    """The inner packet of data, or the reason it is dropped."""
    try:
        return t.decapsulate(data)
    except Dropped as e:
        return e.reason
