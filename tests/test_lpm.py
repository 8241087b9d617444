"""The C longest-prefix match against a brute-force scan with ipaddress."""
from __future__ import annotations

import random
from ipaddress import IPv4Address, IPv4Network

import pytest

from ipipfast._datapath import Lpm


def random_table(rng: random.Random, n: int) -> dict[IPv4Network, int]:
    """Overlapping prefixes clustered in 198.18.0.0/15, with a few wide ones, each to a peer index."""
    seen: dict[IPv4Network, int] = {}
    while len(seen) < n:
        length = rng.choice([8, 12, 15, 16, 20, 23, 24, 25, 26, 28, 30, 31, 32])
        base = (198 << 24) | (18 << 16) | rng.getrandbits(17) if length >= 15 else rng.getrandbits(32)
        seen[IPv4Network((base, length), strict=False)] = rng.randrange(19)
    return seen


def brute_force(table: dict[IPv4Network, int], addr: int) -> int:
    """Every prefix that contains addr, by ipaddress's own network and mask; the longest wins."""
    best, peer = -1, -1
    for net, value in table.items():
        if addr & int(net.netmask) == int(net.network_address) and net.prefixlen > best:
            best, peer = net.prefixlen, value
    return peer


def probes(rng: random.Random, table: dict[IPv4Network, int], n: int) -> list[int]:
    """Addresses at, just inside and just outside prefixes (up to 300 of them), plus random ones."""
    out = []
    for net in rng.sample(list(table), min(len(table), 300)):
        first, last = int(net.network_address), int(net.broadcast_address)
        out += [first, last, (first - 1) & 0xffffffff, (last + 1) & 0xffffffff]
    return out + [rng.getrandbits(32) for _ in range(n)] + [(198 << 24) | (18 << 16) | rng.getrandbits(17) for _ in range(n)]


@pytest.mark.parametrize("seed,size", [(1, 1), (2, 10), (3, 300), (4, 2000)], ids=["1 route", "10", "300", "2000"])
def test_matches_reference(seed, size):
    rng = random.Random(seed)
    table = random_table(rng, size)
    lpm = Lpm([(int(net.network_address), net.prefixlen, peer) for net, peer in table.items()])
    for addr in probes(rng, table, 500):
        assert lpm.lookup(addr) == brute_force(table, addr), IPv4Address(addr)


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
