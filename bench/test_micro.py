"""Micro benchmarks of the per-packet C (pytest-benchmark). Run by hand:

    python -m pytest bench/test_micro.py --benchmark-columns=median,ops

Each benchmark records ns per packet (or per lookup) in extra_info, which
`--benchmark-json` keeps; targets from issue 4: encap + decap <= 25 ns per
64-byte packet in a batch, LPM <= 15 ns at 100k routes.
"""
from __future__ import annotations

import array
import random
from ipaddress import IPv4Address

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.packet import Raw, raw

from ipipfast_lab.packets import Lpm, Tunnel, checksum, coalesce_rounds

LOCAL, PEER = "198.18.0.10", "198.18.0.11"
MAC = b"\x02" * 6
BATCH, ROUNDS = 64, 200
SIZES = [64, 512, 1400, 9000]


def tunnel(local: str = LOCAL, mtu: int = 9100) -> Tunnel:
    # Both ends' MAC is the one each holds for the other: decap checks the frame's source against it.
    return Tunnel(local, MAC, mtu=mtu, routes=[(int(IPv4Address("198.19.1.0")), 24, 0)],
                  peers=[(int(IPv4Address(PEER if local == LOCAL else LOCAL)), MAC)])


def inner(size: int) -> bytes:
    return raw(IP(src="198.19.0.2", dst="198.19.1.2") / UDP() / Raw(b"x" * (size - 28)))


def per_packet(benchmark, n: int) -> None:
    if benchmark.stats is not None:  # None under --benchmark-disable: each ran once, as a test
        benchmark.extra_info["ns_per_packet"] = round(benchmark.stats.stats.median / n * 1e9, 2)


@pytest.mark.parametrize("size", SIZES)
def test_encap_batch(benchmark, size):
    t, pkts = tunnel(), [inner(size)] * BATCH
    assert benchmark(t.encap_batch, pkts, ROUNDS) == BATCH * ROUNDS
    per_packet(benchmark, BATCH * ROUNDS)


@pytest.mark.parametrize("size", SIZES)
def test_decap_batch(benchmark, size):
    frame = tunnel().encapsulate(inner(size))
    t = tunnel(PEER)
    assert benchmark(t.decap_batch, [frame] * BATCH, ROUNDS) == BATCH * ROUNDS
    per_packet(benchmark, BATCH * ROUNDS)


@pytest.mark.parametrize("way", ["encap", "decap"])
def test_single_packet_from_python(benchmark, way):
    """The same work one packet per call: the cost of crossing into Python,
    which the datapath's loops never pay."""
    pkt = inner(64)
    if way == "encap":
        benchmark(tunnel().encapsulate, pkt)
    else:
        benchmark(tunnel(PEER).decapsulate, tunnel().encapsulate(pkt))
    per_packet(benchmark, 1)


@pytest.mark.parametrize("size", [20, 64, 1400, 9000])
def test_checksum(benchmark, size):
    data = bytes(range(256)) * (size // 256 + 1)
    benchmark(checksum, data[:size])


@pytest.mark.parametrize("routes", [10, 1000, 100_000])
def test_lpm_lookup(benchmark, routes):
    rng = random.Random(routes)
    base = int(IPv4Address("198.18.0.0"))
    lpm = Lpm([(base + (i << 6), 26, i % 1000) for i in range(routes)])  # Calico's /26 blocks
    addrs = array.array("I", (base + rng.randrange(routes << 6) for _ in range(1 << 16)))
    assert benchmark(lpm.lookup_many, addrs) == len(addrs)
    per_packet(benchmark, len(addrs))


@pytest.mark.parametrize("csum", ["computed", "left to the device"])
@pytest.mark.parametrize("mss", [536, 1440, 8960])
def test_tcp_segmentation(benchmark, mss, csum):
    data = b"s" * (65535 - 60)
    sup = raw(IP(src="198.19.0.2", dst="198.19.1.2", flags="DF") / TCP(flags="A") / Raw(data))
    made = benchmark(tunnel().segment_rounds, sup, 1, mss, 20, csum != "computed")
    per_packet(benchmark, made)


def test_tcp_coalescing(benchmark):
    segs = [raw(IP(src="198.19.1.2", dst="198.19.0.2", id=i, flags="DF") / TCP(seq=1 + i * 1400, flags="A")
                / Raw(b"c" * 1400)) for i in range(44)]
    assert benchmark(coalesce_rounds, segs, 50) == 50
    per_packet(benchmark, 44 * 50)
