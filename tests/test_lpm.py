"""The C longest-prefix match against the Python reference (RouteTable.lookup)."""
from __future__ import annotations

import random
from ipaddress import IPv4Address, IPv4Network

import pytest

from ipipfast_lab.packets import Lpm
from ipipfast.routes import Route, RouteTable


def random_table(rng: random.Random, n: int) -> RouteTable:
    """Overlapping prefixes clustered in 198.18.0.0/15, with a few wide ones."""
    seen: dict[IPv4Network, Route] = {}
    vias = [IPv4Address(f"198.18.255.{i}") for i in range(1, 20)]
    while len(seen) < n:
        length = rng.choice([8, 12, 15, 16, 20, 23, 24, 25, 26, 28, 30, 31, 32])
        base = (198 << 24) | (18 << 16) | rng.getrandbits(17) if length >= 15 else rng.getrandbits(32)
        net = IPv4Network((base, length), strict=False)
        if not net.overlaps(IPv4Network("198.18.255.0/24")):
            seen[net] = Route(net, rng.choice(vias))
    return RouteTable.from_routes(seen.values())


def probes(rng: random.Random, table: RouteTable, n: int) -> list[int]:
    """Addresses at, just inside and just outside every prefix, plus random ones."""
    out = []
    for r in table.routes:
        first, last = int(r.cidr.network_address), int(r.cidr.broadcast_address)
        out += [first, last, (first - 1) & 0xffffffff, (last + 1) & 0xffffffff]
    return out + [rng.getrandbits(32) for _ in range(n)] + [(198 << 24) | (18 << 16) | rng.getrandbits(17) for _ in range(n)]


@pytest.mark.parametrize("seed,size", [(1, 1), (2, 10), (3, 300), (4, 2000)], ids=["1 route", "10", "300", "2000"])
def test_matches_reference(seed, size):
    rng = random.Random(seed)
    table = random_table(rng, size)
    lpm = Lpm(table.datapath_entries())
    for addr in probes(rng, table, 2000):
        want = table.lookup(addr)
        got = lpm.lookup(addr)
        assert got == (table.peers.index(want.via) if want else -1), IPv4Address(addr)


def test_default_route_and_host_routes():
    lpm = Lpm([(0, 0, 7), (int(IPv4Address("198.18.0.1")), 32, 8)])
    assert lpm.lookup(int(IPv4Address("198.18.0.1"))) == 8
    assert lpm.lookup(int(IPv4Address("198.18.0.2"))) == 7
    assert lpm.lookup(0xffffffff) == 7


def test_host_bits_are_ignored():
    lpm = Lpm([(int(IPv4Address("198.19.1.77")), 24, 3)])
    assert lpm.lookup(int(IPv4Address("198.19.1.1"))) == 3


def test_empty():
    assert Lpm([]).lookup(12345) == -1


@pytest.mark.parametrize("entry", [(0, 33, 0), (0, -1, 0), (0, 8, -1)], ids=["length 33", "length -1", "value -1"])
def test_bad_entries_are_refused(entry):
    with pytest.raises((ValueError, OverflowError)):
        Lpm([entry])


def test_100k_routes():
    # Calico's /26 blocks: 100k of them, each to one of 1000 nodes.
    base = int(IPv4Address("198.18.0.0"))
    entries = [(base + (i << 6), 26, i % 1000) for i in range(100_000)]
    lpm = Lpm(entries)
    for i in range(0, 100_000, 997):
        assert lpm.lookup(base + (i << 6) + 5) == i % 1000
