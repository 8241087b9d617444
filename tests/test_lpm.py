"""The C longest-prefix match against a brute-force oracle: every route
tried, with ipaddress, the longest that holds the address wins."""
from __future__ import annotations

import random
from ipaddress import IPv4Address, IPv4Network

import pytest

from ipipfast_lab.packets import Lpm


def random_routes(rng: random.Random, n: int) -> dict[IPv4Network, int]:
    """Overlapping prefixes clustered in 198.18.0.0/15, with a few wide ones,
    each to a value."""
    routes: dict[IPv4Network, int] = {}
    while len(routes) < n:
        length = rng.choice([8, 12, 15, 16, 20, 23, 24, 25, 26, 28, 30, 31, 32])
        base = (198 << 24) | (18 << 16) | rng.getrandbits(17) if length >= 15 else rng.getrandbits(32)
        routes[IPv4Network((base, length), strict=False)] = rng.randrange(20)
    return routes


def longest_match(routes: dict[IPv4Network, int], addrs: list[int]) -> list[int]:
    """Each address's value by trying every route, longest first (the first
    that holds it is the longest), or -1: an address is in a network when
    its bits under the netmask are the network's."""
    longest_first = [(int(net.network_address), int(net.netmask), v)
                     for net, v in sorted(routes.items(), key=lambda r: -r[0].prefixlen)]
    return [next((v for network, mask, v in longest_first if a & mask == network), -1) for a in addrs]


def probes(rng: random.Random, routes: dict[IPv4Network, int], n: int) -> list[int]:
    """Addresses at, just inside and just outside every prefix, plus random ones."""
    out = []
    for net in routes:
        first, last = int(net.network_address), int(net.broadcast_address)
        out += [first, last, (first - 1) & 0xffffffff, (last + 1) & 0xffffffff]
    return out + [rng.getrandbits(32) for _ in range(n)] + [(198 << 24) | (18 << 16) | rng.getrandbits(17) for _ in range(n)]


@pytest.mark.parametrize("seed,size", [(1, 1), (2, 10), (3, 300), (4, 2000)], ids=["1 route", "10", "300", "2000"])
def test_matches_brute_force(seed, size):
    rng = random.Random(seed)
    routes = random_routes(rng, size)
    lpm = Lpm([(int(net.network_address), net.prefixlen, v) for net, v in routes.items()])
    addrs = probes(rng, routes, 2000)
    assert [lpm.lookup(a) for a in addrs] == longest_match(routes, addrs)


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
