"""The Prometheus metrics: the collector on hand-built snapshots, parsed back
by prometheus_client's own parser; a live daemon's scrape linted by promtool."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ipipfast.counters import Direction, Icmp, Ring, Snapshot, Worker
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
