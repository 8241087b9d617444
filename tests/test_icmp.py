"""What ipipfast does with an ICMP error about one of its outer packets."""
from __future__ import annotations

from ipaddress import IPv4Address

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.packet import Raw, raw

from ipipfast.icmp import Decision, decide

NODE, PEER = IPv4Address("198.18.0.10"), IPv4Address("198.18.0.11")
INNER = raw(IP(src="198.19.0.2", dst="198.19.1.2", flags="DF") / UDP(sport=1, dport=2) / Raw(b"q" * 100))
INNER_NO_DF = raw(IP(src="198.19.0.2", dst="198.19.1.2") / UDP(sport=1, dport=2) / Raw(b"q" * 100))


def quote(inner: bytes = INNER, src=str(NODE), dst=str(PEER), proto=4, keep: int | None = None) -> bytes:
    q = raw(IP(src=src, dst=dst, proto=proto) / Raw(inner))
    return q if keep is None else q[:keep]


CASES = [
    ("frag needed: learn and relay", 3, 4, 1400, quote(), Decision(PEER, 1400, (INNER, 3, 4, 1380))),
    ("frag needed below min_pmtu is clamped", 3, 4, 300, quote(), Decision(PEER, 552, (INNER, 3, 4, 532))),
    ("frag needed without mtu (RFC 1191 old router)", 3, 4, 0, quote(), Decision(PEER)),
    ("frag needed, inner without DF: learn only", 3, 4, 1400, quote(INNER_NO_DF), Decision(PEER, 1400)),
    ("net unreachable relayed", 3, 0, 0, quote(), Decision(PEER, None, (INNER, 3, 0, 0))),
    ("host unreachable relayed", 3, 1, 0, quote(), Decision(PEER, None, (INNER, 3, 1, 0))),
    ("protocol unreachable becomes host unreachable", 3, 2, 0, quote(), Decision(PEER, None, (INNER, 3, 1, 0))),
    ("admin prohibited relayed", 3, 13, 0, quote(), Decision(PEER, None, (INNER, 3, 13, 0))),
    ("port unreachable not relayed", 3, 3, 0, quote(), Decision(PEER)),
    ("source route failed not relayed", 3, 5, 0, quote(), Decision(PEER)),
    ("ttl exceeded relayed", 11, 0, 0, quote(), Decision(PEER, None, (INNER, 11, 0, 0))),
    ("reassembly time exceeded not relayed", 11, 1, 0, quote(), Decision(PEER)),
    ("quote of 8 inner bytes: too short to relay", 3, 1, 0, quote(keep=28), Decision(PEER)),
    ("quote of the inner header + 8: relayed", 3, 1, 0, quote(keep=48), Decision(PEER, None, (INNER[:28], 3, 1, 0))),
    ("short quote still teaches the mtu", 3, 4, 1400, quote(keep=28), Decision(PEER, 1400)),
    ("not our packet", 3, 1, 0, quote(src="198.18.0.77"), Decision()),
    ("not ipip", 3, 1, 0, quote(proto=17), Decision()),
    ("garbage", 3, 1, 0, b"\x00" * 10, Decision()),
]


@pytest.mark.parametrize("name,t,code,info,q,want", CASES, ids=[c[0] for c in CASES])
def test_decide(name, t, code, info, q, want):
    assert decide(NODE, t, code, info, q) == want


def test_relayed_error_is_valid_icmp():
    """The relayed message, built by the datapath, parsed by scapy."""
    from ipipfast_lab.packets import icmp_error
    out = IP(icmp_error(INNER, str(NODE), 3, 4, 1380))
    assert (out.src, out.dst, out[ICMP].type, out[ICMP].code, out[ICMP].nexthopmtu) == (
        str(NODE), "198.19.0.2", 3, 4, 1380)
    assert raw(out[ICMP].payload)[:len(INNER)] == INNER
