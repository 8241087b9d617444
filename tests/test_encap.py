"""Encapsulation: every outer header field, against frames built by scapy."""
from __future__ import annotations

from ipaddress import IPv4Address

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import Ether
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw, raw

from ipipfast_lab.packets import Dropped, Tunnel

LOCAL, PEER = "198.18.0.10", "198.18.0.11"
LOCAL_MAC, PEER_MAC = "02:00:00:00:00:0a", "02:00:00:00:00:0b"
POD_SRC, POD_DST = "198.19.0.2", "198.19.1.2"


def tunnel(**opts) -> Tunnel:
    routes = [(int(IPv4Address("198.19.1.0")), 24, 0)]
    peers = [(int(IPv4Address(PEER)), bytes.fromhex(PEER_MAC.replace(":", "")))]
    return Tunnel(LOCAL, bytes.fromhex(LOCAL_MAC.replace(":", "")), routes=routes, peers=peers, **opts)


def expected(inner: bytes, *, ttl: int, tos: int, df: bool, ip_id: int) -> bytes:
    """The frame as scapy builds it: the independent oracle."""
    return raw(Ether(dst=PEER_MAC, src=LOCAL_MAC)
               / IP(src=LOCAL, dst=PEER, proto=4, ttl=ttl, tos=tos, id=ip_id, flags="DF" if df else 0)
               / Raw(inner))


def inner(ttl=64, tos=0, df=True, size=0) -> bytes:
    return raw(IP(src=POD_SRC, dst=POD_DST, ttl=ttl, tos=tos, flags="DF" if df else 0, id=0x1234)
               / UDP(sport=1000, dport=2000) / Raw(b"x" * size))


# (name, tunnel options, inner packet, expected outer ttl, tos, df)
CASES = [
    ("ttl inherit", {}, inner(ttl=63), 63, 0, True),
    ("ttl inherit 1", {}, inner(ttl=1), 1, 0, True),
    ("ttl fixed", {"ttl": 17}, inner(ttl=63), 17, 0, True),
    ("tos 0 drops inner dscp", {}, inner(tos=0xb8), 64, 0, True),
    ("tos fixed", {"tos": 0x28}, inner(tos=0xb8), 64, 0x28, True),
    ("tos inherit", {"tos": None}, inner(tos=0xb8), 64, 0xb8, True),
    ("ecn ect0 copied", {}, inner(tos=0x02), 64, 0x02, True),
    ("ecn ect1 copied", {}, inner(tos=0x01), 64, 0x01, True),
    ("ecn ce becomes ect0", {}, inner(tos=0x03), 64, 0x02, True),
    ("ecn ce under inherit", {"tos": None}, inner(tos=0xbb), 64, 0xba, True),
    ("fixed tos keeps inner ecn", {"tos": 0x28}, inner(tos=0x01), 64, 0x29, True),
    ("df copied when clear", {}, inner(df=False), 64, 0, False),
    ("pmtudisc forces df", {"pmtudisc": True}, inner(df=False), 64, 0, True),
    ("ignore_df clears df", {"ignore_df": True}, inner(df=True), 64, 0, False),
    ("pmtudisc with ignore_df", {"pmtudisc": True, "ignore_df": True}, inner(df=False), 64, 0, True),
    ("small", {}, inner(size=0), 64, 0, True),
    ("1400 bytes", {}, inner(size=1400 - 28), 64, 0, True),
    ("exactly the tunnel mtu", {}, inner(size=1480 - 28), 64, 0, True),
]


@pytest.mark.parametrize("name,opts,pkt,ttl,tos,df", CASES, ids=[c[0] for c in CASES])
def test_outer_header(name, opts, pkt, ttl, tos, df):
    for ip_id in (0, 1, 0xffff):
        frame = tunnel(**opts).encapsulate(pkt, ip_id=ip_id)
        assert frame == expected(pkt, ttl=ttl, tos=tos, df=df, ip_id=ip_id)
        assert Ether(frame)[IP].payload.original == pkt  # the inner packet is untouched


def test_inner_options_and_padding():
    # TUN reads are exact, but a header with options still encapsulates whole.
    pkt = raw(IP(src=POD_SRC, dst=POD_DST, options=b"\x01\x01\x01\x00") / ICMP())
    assert tunnel().encapsulate(pkt) == expected(pkt, ttl=64, tos=0, df=False, ip_id=0)
    # Bytes past the IPv4 total length are not sent.
    assert tunnel().encapsulate(pkt + b"junk") == expected(pkt, ttl=64, tos=0, df=False, ip_id=0)


DROPS = [
    ("no route", inner(), {"routes": []}, "no_route"),
    ("ipv6", raw(IPv6(dst="2001:db8::1") / UDP()), {}, "not_ipv4"),
    ("empty", b"", {}, "not_ipv4"),
    ("shorter than a header", inner()[:19], {}, "bad_header"),
    ("ihl below 5", b"\x44" + inner()[1:], {}, "bad_header"),
    ("total length past the read", inner()[:-1], {}, "bad_header"),
    ("total length below ihl", inner()[:2] + b"\x00\x10" + inner()[4:], {}, "bad_header"),
    ("larger than the tunnel mtu", inner(size=1480 - 28 + 1), {}, "too_big"),
]


@pytest.mark.parametrize("name,pkt,opts,reason", DROPS, ids=[d[0] for d in DROPS])
def test_drops(name, pkt, opts, reason):
    t = tunnel() if not opts else Tunnel(LOCAL, routes=[], peers=[])
    with pytest.raises(Dropped) as e:
        t.encapsulate(pkt)
    assert e.value.reason == reason


def test_unresolved_next_hop_is_dropped():
    t = Tunnel(LOCAL, routes=[(int(IPv4Address("198.19.1.0")), 24, 0)], peers=[(int(IPv4Address(PEER)), None)])
    with pytest.raises(Dropped, match="no_neigh"):
        t.encapsulate(inner())


def test_batch_matches_single():
    """A batch, encapsulated in place as the encap loop does it, makes of each
    packet byte for byte what single encapsulation makes with its place as
    the IP ID, and drops what that drops, for the same reason."""
    pkts = [inner(size=n) for n in (0, 100, 1000)] + [raw(IPv6() / UDP()), inner(ttl=3, tos=0x03, df=False),
                                                      inner(size=1480 - 28 + 1), inner()[:-1]]
    t, frames = tunnel(), []
    assert t.encap_batch(pkts, rounds=3, frames=frames) == 3 * 4
    assert [f if isinstance(f, bytes) else f.reason for f in frames] == [single(t, p, i) for i, p in enumerate(pkts)]


def single(t: Tunnel, pkt: bytes, ip_id: int) -> bytes | str:
    """The frame for pkt, or the reason it is dropped."""
    try:
        return t.encapsulate(pkt, ip_id=ip_id)
    except Dropped as e:
        return e.reason
