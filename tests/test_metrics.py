"""The Prometheus metrics: the collector on hand-built snapshots, parsed back
by prometheus_client's own parser; a live daemon's scrape linted by promtool."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ipipfast.counters import Direction, Icmp, PeerCounts, Ring, Snapshot, Worker
from ipipfast.metrics import Reading, registry
from ipipfast_lab import traffic
from ipipfast_lab.daemons import TunnelProcess, wait_until
from ipipfast_lab.testbed import Testbed
from netns_helpers import METRICS_LISTEN, scrape_metrics

Series = tuple[str, frozenset[tuple[str, str]]]
TX_REASONS = ("no_route", "too_big")
RX_REASONS = ("unknown_peer", "ring_full")


def S(name: str, **labels: str) -> Series:
    return name, frozenset(labels.items())


def parse(text: str) -> tuple[dict[Series, float], dict[str, tuple[str, str]]]:
    """(value per series, (type, help) per family), by prometheus_client's parser."""
    samples, families = {}, {}
    for fam in text_string_to_metric_families(text):
        families[fam.name] = (fam.type, fam.documentation)
        for s in fam.samples:
            series = (s.name, frozenset(s.labels.items()))
            assert series not in samples, f"repeated series {series}"
            samples[series] = s.value
    return samples, families


def ours(samples: dict[Series, float]) -> dict[Series, float]:
    return {k: v for k, v in samples.items() if k[0].startswith("ipipfast_")}


def scrape(reading: Reading) -> str:
    return generate_latest(registry(lambda: reading)).decode()


def peer_samples(samples: dict[Series, float]) -> dict[tuple[str, str, str], float]:
    """(family, peer, direction) -> value of the per-peer families."""
    return {(name, dict(labels)["peer"], dict(labels)["direction"]): v for (name, labels), v in samples.items()
            if name in ("ipipfast_peer_packets_total", "ipipfast_peer_bytes_total")}


def direction(packets: int, nbytes: int, offloaded: int, reasons: tuple[str, ...], *drops: int) -> Direction:
    return Direction(packets, nbytes, offloaded, dict(zip(reasons, drops)))


TWO_WORKERS = Snapshot(
    workers=(Worker(tx=direction(10, 1500, 2, TX_REASONS, 3, 0), rx=direction(7, 900, 1, RX_REASONS, 0, 4),
                    ring=Ring(seen=11, taken=7)),
             Worker(tx=direction(5, 500, 0, TX_REASONS, 1, 2), rx=direction(1, 100, 0, RX_REASONS, 6, 0),
                    ring=Ring(seen=7, taken=7))),
    icmp=Icmp(sent=4, ratelimited=1, relayed=2, pmtu_updates=3),
    generation=7,
    queue_full=9,
    foreign_ipip=5,
)
ROUTES = {("file", "encapsulated"): 3, ("file", "direct"): 1}
RELOADS = {"applied": 2, "unchanged": 3, "refused": 1}
KERNEL = {"kernel_route_writes": 12, "kernel_route_batches": 3, "kernel_route_write_errors": 1, "kernel_resyncs": 4,
          "kernel_resyncs_changed": 1, "kernel_notifications_lost": 2, "kernel_routes_refused_no_gateway": 1,
          "kernel_routes_refused_multipath": 0, "kernel_routes_refused_bad_gateway": 0, "kernel_routes_refused_tos": 0}


def test_every_family_from_one_snapshot_summed_over_workers() -> None:
    samples, _ = parse(scrape(Reading(TWO_WORKERS, ROUTES, RELOADS, KERNEL)))
    assert ours(samples) == {
        S("ipipfast_packets_total", direction="tx"): 15,
        S("ipipfast_packets_total", direction="rx"): 8,
        S("ipipfast_bytes_total", direction="tx"): 2000,
        S("ipipfast_bytes_total", direction="rx"): 1000,
        S("ipipfast_dropped_packets_total", direction="tx", reason="no_route"): 4,
        S("ipipfast_dropped_packets_total", direction="tx", reason="too_big"): 2,
        S("ipipfast_dropped_packets_total", direction="tx", reason="queue_full"): 9,
        S("ipipfast_dropped_packets_total", direction="rx", reason="unknown_peer"): 6,
        S("ipipfast_dropped_packets_total", direction="rx", reason="ring_full"): 4,
        S("ipipfast_rx_ring_frames_total", stage="seen"): 18,
        S("ipipfast_rx_ring_frames_total", stage="taken"): 14,
        S("ipipfast_gso_packets_total"): 2,
        S("ipipfast_gro_packets_total"): 1,
        S("ipipfast_icmp_errors_sent_total"): 4,
        S("ipipfast_icmp_errors_ratelimited_total"): 1,
        S("ipipfast_icmp_errors_relayed_total"): 2,
        S("ipipfast_pmtu_updates_total"): 3,
        S("ipipfast_foreign_ipip_dropped_packets_total"): 5,
        S("ipipfast_reloads_total", result="applied"): 2,
        S("ipipfast_reloads_total", result="unchanged"): 3,
        S("ipipfast_reloads_total", result="refused"): 1,
        S("ipipfast_kernel_route_writes_total"): 12,
        S("ipipfast_kernel_route_write_errors_total"): 1,
        S("ipipfast_kernel_resyncs_total", changed="false"): 3,
        S("ipipfast_kernel_resyncs_total", changed="true"): 1,
        S("ipipfast_kernel_notifications_lost_total"): 2,
        S("ipipfast_kernel_routes_refused_total", reason="no_gateway"): 1,
        S("ipipfast_kernel_routes_refused_total", reason="multipath"): 0,
        S("ipipfast_kernel_routes_refused_total", reason="bad_gateway"): 0,
        S("ipipfast_kernel_routes_refused_total", reason="tos"): 0,
        S("ipipfast_routes", source="file", kind="encapsulated"): 3,
        S("ipipfast_routes", source="file", kind="direct"): 1,
        S("ipipfast_table_generation"): 7,
    }


ETCD = {"etcd_errors": 3, "etcd_lists": 2, "etcd_compacted": 1, "etcd_watch_events": 40, "etcd_route_changes": 9,
        "etcd_lease_grants": 2, "etcd_lease_expired": 1, "etcd_registrations": 3, "etcd_connected": 0,
        "etcd_registered": 1, "etcd_conflicts": 1, "etcd_revision": 1234}


def test_etcd_families() -> None:
    key = "/coreos.com/network/subnets/198.19.0.0-24"
    routes = {**ROUTES, ("etcd", "encapsulated"): 5, ("etcd", "direct"): 0}
    samples, families = parse(scrape(Reading(TWO_WORKERS, routes, RELOADS, KERNEL, ETCD,
                                             [("198.19.0.0/24", key, "198.18.0.10")])))
    assert {k: v for k, v in ours(samples).items() if k[0].startswith("ipipfast_etcd_")} == {
        S("ipipfast_etcd_connected"): 0,
        S("ipipfast_etcd_revision"): 1234,
        S("ipipfast_etcd_registered"): 1,
        S("ipipfast_etcd_conflicts", cidr="198.19.0.0/24", key=key, holder="198.18.0.10"): 1,
        S("ipipfast_etcd_errors_total"): 3,
        S("ipipfast_etcd_lists_total"): 2,
        S("ipipfast_etcd_watch_compacted_total"): 1,
        S("ipipfast_etcd_watch_events_total"): 40,
        S("ipipfast_etcd_route_changes_total"): 9,
        S("ipipfast_etcd_lease_grants_total"): 2,
        S("ipipfast_etcd_lease_expired_total"): 1,
        S("ipipfast_etcd_registrations_total"): 3,
    }
    assert samples[S("ipipfast_routes", source="etcd", kind="encapsulated")] == 5
    gauges = {"ipipfast_etcd_connected", "ipipfast_etcd_revision", "ipipfast_etcd_registered", "ipipfast_etcd_conflicts"}
    for name, (kind, help) in families.items():
        if name.startswith("ipipfast_etcd_"):
            assert kind == ("gauge" if name in gauges else "counter"), name
            assert len(help) > 20, name
def test_peers_are_series_up_to_the_cap_and_the_rest_one_sum_that_never_goes_down() -> None:
    def peers(**counts: tuple[int, int, int, int]) -> Reading:
        return Reading(Snapshot((), Icmp(), 1, peers={p.replace("_", "."): PeerCounts(*c) for p, c in counts.items()}),
                       ROUTES, RELOADS, KERNEL)
    a, b, c = "198_18_0_11", "198_18_0_12", "198_18_0_13"
    readings = iter([
        peers(),
        # a and b first carry traffic in one scrape: the cap of 1 goes to the larger, b
        peers(**{a: (1, 100, 0, 0), b: (2, 200, 2, 200)}),
        # c, larger than both, comes after: "other" it is, beside a
        peers(**{a: (3, 300, 1, 50), b: (2, 200, 3, 300), c: (10, 10**6, 10, 10**6)}),
        peers(**{a: (4, 400, 1, 50), b: (2, 200, 3, 300), c: (11, 10**6 + 9, 10, 10**6)}),
    ])
    reg = registry(lambda: next(readings), peer_series=1)
    scrapes = [peer_samples(parse(generate_latest(reg).decode())[0]) for _ in range(4)]
    assert scrapes[0] == {}
    p, by = "ipipfast_peer_packets_total", "ipipfast_peer_bytes_total"
    assert scrapes[1] == {(p, "198.18.0.12", "tx"): 2, (p, "198.18.0.12", "rx"): 2, (by, "198.18.0.12", "tx"): 200,
                          (by, "198.18.0.12", "rx"): 200, (p, "other", "tx"): 1, (p, "other", "rx"): 0,
                          (by, "other", "tx"): 100, (by, "other", "rx"): 0}
    assert scrapes[2][(p, "other", "tx")] == 13 and scrapes[2][(by, "other", "rx")] == 50 + 10**6
    assert scrapes[3][(p, "other", "tx")] == 15 and scrapes[3][(by, "other", "tx")] == 400 + 10**6 + 9
    for s in scrapes[1:]:
        assert {peer for _, peer, _ in s} == {"198.18.0.12", "other"}
    for earlier, later in zip(scrapes[1:], scrapes[2:]):
        assert all(later[k] >= v for k, v in earlier.items())


def test_no_peer_series_puts_every_peer_in_other() -> None:
    reading = Reading(Snapshot((), Icmp(), 1, peers={"198.18.0.11": PeerCounts(1, 2, 3, 4)}), ROUTES, RELOADS, KERNEL)
    samples = peer_samples(parse(generate_latest(registry(lambda: reading, peer_series=0)).decode())[0])
    assert samples == {("ipipfast_peer_packets_total", "other", "tx"): 1,
                       ("ipipfast_peer_packets_total", "other", "rx"): 3,
                       ("ipipfast_peer_bytes_total", "other", "tx"): 2, ("ipipfast_peer_bytes_total", "other", "rx"): 4}


def test_types_and_help() -> None:
    _, families = parse(scrape(Reading(TWO_WORKERS, ROUTES, RELOADS, KERNEL)))
    gauges = {"ipipfast_routes", "ipipfast_table_generation"}
    for name, (kind, help) in families.items():
        if name.startswith("ipipfast_"):
            assert kind == ("gauge" if name in gauges else "counter"), name
            assert len(help) > 20, name


def test_every_drop_reason_is_a_series_even_at_zero() -> None:
    # rate() needs the series before the first drop
    idle = Snapshot((Worker(direction(0, 0, 0, TX_REASONS, 0, 0), direction(0, 0, 0, RX_REASONS, 0, 0)),),
                    Icmp(), generation=1)
    samples, _ = parse(scrape(Reading(idle, {("file", "encapsulated"): 0, ("file", "direct"): 0},
                                      {"applied": 0, "unchanged": 0, "refused": 0}, KERNEL)))
    dropped = {dict(labels)["reason"]: v for (name, labels), v in samples.items()
               if name == "ipipfast_dropped_packets_total"}
    assert dropped == {r: 0 for r in TX_REASONS + RX_REASONS + ("queue_full",)}


def test_huge_counters_survive() -> None:
    big = Snapshot((Worker(direction(2**53, 2**64 - 1, 0, ()), direction(0, 0, 0, ())),), Icmp(), 1)
    text = scrape(Reading(big, ROUTES, RELOADS, KERNEL))
    assert 'ipipfast_bytes_total{direction="tx"} 1.8446744073709552e+19' in text
    assert parse(text)[0][S("ipipfast_packets_total", direction="tx")] == 2**53


def test_process_and_platform_metrics_beside_ours() -> None:
    samples, families = parse(scrape(Reading(TWO_WORKERS, ROUTES, RELOADS, KERNEL)))
    assert samples[S("process_resident_memory_bytes")] > 0
    assert "process_open_fds" in families and "python_info" in families


def test_each_scrape_reads_afresh() -> None:
    readings = iter([Reading(TWO_WORKERS, ROUTES, RELOADS, KERNEL),
                     Reading(Snapshot((), Icmp(), generation=8), ROUTES, RELOADS, KERNEL)])
    reg = registry(lambda: next(readings))
    first, second = (parse(generate_latest(reg).decode())[0] for _ in range(2))
    assert first[S("ipipfast_table_generation")] == 7 and second[S("ipipfast_table_generation")] == 8
    assert second[S("ipipfast_packets_total", direction="tx")] == 0


@pytest.mark.netns
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces, TUN and AF_PACKET")
def test_a_live_scrape_parses_and_passes_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    with Testbed(nodes=2, pods_per_node=1) as tb:
        tunnels = [TunnelProcess(tb, n, {**tb.node_config(n), "stats": {"listen": METRICS_LISTEN}})
                   for n in tb.nodes]
        try:
            for t in tunnels:
                t.wait_ready()
            a, b = tb.nodes[0].pods[0], tb.nodes[1].pods[0]
            assert traffic.ping(tb, a, b.ip, count=4, interval=0.01)["received"] == 4
            ta = tunnels[0]
            # the scrape comes after the counters show the pings: wait for that state first
            wait_until(lambda: ta.counters()["rx_packets"] >= 4, what="four decapsulated replies")
            text = scrape_metrics(tb, tb.nodes[0])
            status = ta.status()
        finally:
            for t in tunnels:
                t.stop()
    lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    samples, families = parse(text)
    assert samples[S("ipipfast_packets_total", direction="tx")] >= 4
    assert samples[S("ipipfast_dropped_packets_total", direction="rx", reason="unknown_peer")] == 0
    assert samples[S("ipipfast_foreign_ipip_dropped_packets_total")] == 0  # the tunnel's own frames pass
    assert samples[S("ipipfast_routes", source="file", kind="encapsulated")] == 1
    assert samples[S("ipipfast_routes", source="file", kind="direct")] == 0
    assert samples[S("ipipfast_table_generation")] == status["generation"] >= 1
    assert samples[S("ipipfast_reloads_total", result="applied")] == 0
    assert samples[S("process_resident_memory_bytes")] > 0
    assert families["ipipfast_packets"][0] == "counter"


PING_BYTES = 20 + 8 + 56  # an echo of traffic.ping's default size, as the TUN carries it


@pytest.mark.netns
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces, TUN and AF_PACKET")
def test_per_peer_counts_of_pings_with_the_cap_and_across_a_table_swap() -> None:
    """Three nodes, peer_series 1 on the first: the first peer pinged gets the
    series, the second is "other"; the pings' counts (the ping tool's, sent and
    answered) are what the scrape says, also for pings after a reload has
    swapped the table and moved the peers' indexes."""
    with Testbed(nodes=3, pods_per_node=1) as tb:
        n0, n1, n2 = tb.nodes
        cfg0 = {**tb.node_config(n0), "stats": {"listen": METRICS_LISTEN, "peer_series": 1}}
        tunnels = [TunnelProcess(tb, n0, cfg0)] + [TunnelProcess(tb, n, tb.node_config(n)) for n in (n1, n2)]
        try:
            for t in tunnels:
                t.wait_ready()
            t0 = tunnels[0]
            a = n0.pods[0]

            def pinged(dst: str, count: int) -> None:
                assert traffic.ping(tb, a, dst, count=count, interval=0.01)["received"] == count

            def scraped(until: dict[tuple[str, str, str], float]) -> dict[tuple[str, str, str], float]:
                def now() -> dict[tuple[str, str, str], float] | None:
                    got = peer_samples(parse(scrape_metrics(tb, n0))[0])
                    return got if all(got.get(k) == v for k, v in until.items()) else None
                try:
                    return wait_until(now, what="the scrape to show the pings")
                except TimeoutError:
                    return peer_samples(parse(scrape_metrics(tb, n0))[0])

            def expect(peer: str, n: int) -> dict[tuple[str, str, str], float]:
                return {("ipipfast_peer_packets_total", peer, d): n for d in ("tx", "rx")} | \
                       {("ipipfast_peer_bytes_total", peer, d): n * PING_BYTES for d in ("tx", "rx")}

            pinged(n1.pods[0].ip, 5)
            assert scraped(expect(n1.ip, 5)) == expect(n1.ip, 5)  # n1's own series, and no "other" yet

            # A route to one more peer, before the others in the table: every index moves.
            gen = t0.status()["generation"]
            extra = {"cidr": "198.19.99.0/24", "via": "198.18.0.9"}  # no host there
            st = t0.reload({**cfg0, "routes": [extra] + cfg0["routes"]})
            assert st["reloads"]["applied"] == 1 and st["generation"] > gen

            pinged(n2.pods[0].ip, 3)  # a peer past the cap: "other"
            pinged(n1.pods[0].ip, 2)
            want = expect(n1.ip, 7) | expect("other", 3)
            assert scraped(want) == want
            peers = t0.status()["counters"]["peers"]
            assert peers == {n1.ip: {"tx_packets": 7, "tx_bytes": 7 * PING_BYTES, "rx_packets": 7,
                                     "rx_bytes": 7 * PING_BYTES},
                             n2.ip: {"tx_packets": 3, "tx_bytes": 3 * PING_BYTES, "rx_packets": 3,
                                     "rx_bytes": 3 * PING_BYTES}}
        finally:
            for t in tunnels:
                t.stop()
