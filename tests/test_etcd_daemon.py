"""Clusters without BGP, end to end: ipipfast daemons on testbed nodes whose
only routes are the node leases in a real etcd (`routes: []`), on the
testbed's control-plane host. Oracles: etcdctl for what is stored, scapy
for the frames on the underlay, iproute2 for the kernel's routes,
prometheus_client's parser for the metrics."""
from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from scapy.layers.inet import ICMP, IP

from ipipfast_lab import traffic
from etcd_fixtures import etcd, prefix, tb  # noqa: F401 (fixtures)
from ipipfast_lab.daemons import TunnelProcess, wait_until
from ipipfast_lab.etcd import EtcdServer, node_config
from ipipfast_lab.testbed import Node, Pod, Testbed
from netns_helpers import METRICS_LISTEN, Capture, scrape_metrics

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces, TUN and AF_PACKET"),
    pytest.mark.skipif(shutil.which("etcd") is None or shutil.which("etcdctl") is None,
                       reason="needs etcd and etcdctl (Debian: etcd-server, etcd-client)"),
]

TTL = 5  # seconds: the daemons' leases, so that a dead node's expire within a test
MARGIN = 10  # seconds past the TTL for etcd to expire a lease and the watch to tell
FLANNEL = '{"PublicIP":"%s","BackendType":"ipip","BackendData":null}'  # as flannel's Go writes it


Start = Callable[..., TunnelProcess]


@pytest.fixture
def start(tb: Testbed, etcd: EtcdServer, prefix: str) -> Iterator[Start]:
    """start(node_index, **node_config options): a daemon on that node, on
    etcd alone, ready; stopped after the test, its log printed."""
    procs: list[TunnelProcess] = []

    def start_daemon(index: int, stats: bool = False, **kw: object) -> TunnelProcess:
        config = node_config(tb, tb.nodes[index], etcd, prefix, ttl=TTL, **kw)
        if stats:
            config["stats"] = {"listen": METRICS_LISTEN}
        procs.append(TunnelProcess(tb, tb.nodes[index], config))
        procs[-1].wait_ready()
        return procs[-1]

    yield start_daemon
    for p in procs:
        p.stop()
        print(f"--- daemon on {p.node.name}:\n{p.log()[-4000:]}")


def etcd_routes(t: TunnelProcess) -> dict[str, str]:
    """cidr -> node of the daemon's routes from etcd, from its control socket."""
    return {r["cidr"]: r["node"] for r in t.request("routes")["routes"] if r["source"] == "etcd"}


def wait_routes(t: TunnelProcess, expected: dict[str, str], timeout: float = 20) -> None:
    """Waits until the daemon's routes from etcd are exactly `expected` (cidr -> node)."""
    wait_until(lambda: etcd_routes(t) == expected, timeout, f"{t.node.name}'s etcd routes {expected}")


def others(tb: Testbed, me: Node, among: list[Node] | None = None) -> dict[str, str]:
    return {n.pod_cidr: n.ip for n in (among or tb.nodes) if n is not me}


def kernel_routes(tb: Testbed, node: Node) -> dict[str, tuple[str, list[str]]]:
    """Our routes in the node's TUN, read back by iproute2: cidr -> (gateway, flags)."""
    out = tb.run(node, ["ip", "-json", "route", "show", "dev", f"{tb.prefix}t{node.index}", "proto", "191"]).stdout
    return {r["dst"]: (r.get("gateway"), r.get("flags", [])) for r in json.loads(out or "[]")}


def pings(tb: Testbed, src: Pod, dst: Pod, count: int = 5) -> int:
    return traffic.ping(tb, src, dst.ip, count=count, interval=0.01)["received"]


def test_three_nodes_route_every_pair_through_the_tunnel(tb: Testbed, etcd: EtcdServer, prefix: str,
                                                           start: Start, tmp_path: Path) -> None:
    daemons = [start(i) for i in range(3)]
    for t in daemons:
        wait_routes(t, others(tb, t.node))
    stored = etcd.get(prefix + "/subnets/")
    assert sorted(stored) == sorted(f"{prefix}/subnets/{n.pod_cidr.replace('/', '-')}" for n in tb.nodes)
    for t in daemons:
        # Installed as ours, as flannel's ipip backend writes its routes: via the node, onlink.
        assert kernel_routes(tb, t.node) == {c: (ip, ["onlink"]) for c, ip in others(tb, t.node).items()}
        for r in t.request("routes")["routes"]:  # the key and its mod revision as etcd has them
            key = f"{prefix}/subnets/{r['cidr'].replace('/', '-')}"
            assert (r["source"], r["detail"], r["kind"]) == ("etcd", f"{key}@{stored[key]['mod_revision']}",
                                                             "encapsulated")
    for node in tb.nodes:
        a = node.pods[0]
        with Capture(tb, node, tmp_path) as cap:
            for other in tb.nodes:
                if other is not node:
                    assert pings(tb, a, other.pods[0]) == 5
        outer = {(f[IP].src, f[IP].dst, f[IP].payload.src, f[IP].payload.dst, f[ICMP].type) for f in cap.ipip()}
        for other in tb.nodes:
            if other is not node:
                b = other.pods[0]
                assert (node.ip, other.ip, a.ip, b.ip, 8) in outer  # the echo, encapsulated to b's node
                assert (other.ip, node.ip, b.ip, a.ip, 0) in outer  # its reply, from b's node


def test_a_killed_node_leaves_the_others_tables_within_its_ttl(tb: Testbed, etcd: EtcdServer, prefix: str,
                                                                start: Start) -> None:
    daemons = [start(i) for i in range(3)]
    for t in daemons:
        wait_routes(t, others(tb, t.node))
    gone = tb.nodes[2]
    daemons[2].stop(sig=signal.SIGKILL)
    killed = time.monotonic()
    survivors = tb.nodes[:2]
    for t in daemons[:2]:
        wait_routes(t, others(tb, t.node, survivors), timeout=TTL + 3 * MARGIN)
    waited = time.monotonic() - killed
    print(f"the killed node's routes left both tables {waited:.1f} s after the kill (TTL {TTL} s)")
    assert waited <= TTL + MARGIN
    assert f"{prefix}/subnets/{gone.pod_cidr.replace('/', '-')}" not in etcd.get(prefix + "/subnets/")
    for node in survivors:
        assert gone.pod_cidr not in kernel_routes(tb, node)
    assert pings(tb, tb.nodes[0].pods[0], gone.pods[0], count=3) == 0  # its CIDR falls to the blackhole

    back = start(2)
    for t in [*daemons[:2], back]:
        wait_routes(t, others(tb, t.node))
    assert back.status()["etcd"]["registered"] == {gone.pod_cidr: f"{prefix}/subnets/{gone.pod_cidr.replace('/', '-')}"}
    for node in survivors:
        assert pings(tb, node.pods[0], gone.pods[0]) == 5
        assert pings(tb, gone.pods[0], node.pods[0]) == 5


def test_etcd_away_the_last_table_forwards_and_a_new_node_appears_after(tb: Testbed, etcd: EtcdServer,
                                                                        start: Start) -> None:
    n0, n1, n2 = tb.nodes
    a, b = start(0), start(1)
    wait_routes(a, {n1.pod_cidr: n1.ip})
    wait_routes(b, {n0.pod_cidr: n0.ip})
    stopped = time.time()
    etcd.stop()
    try:
        for t in (a, b):
            state = t.wait_for(lambda s: not s["etcd"]["connected"], timeout=TTL + MARGIN)["etcd"]
            assert state["since"] >= stopped and "198.18.0.2:2379" in state["last_error"]
        shown = tb.python(n0, "-m", "ipipfast", "show").stdout
        assert "etcd: unreachable since" in shown and "forwarding by the last table" in shown
        c = start(2)  # a node that joins while etcd is away
        c.wait_for(lambda s: s["etcd"]["counters"]["etcd_errors"] > 0)
        # Retried with backoff, never flushed: the pods still reach each other, however long etcd is away.
        a.wait_for(lambda s: s["etcd"]["counters"]["etcd_errors"] >= 3, timeout=30)
        assert etcd_routes(a) == {n1.pod_cidr: n1.ip} and n1.pod_cidr in kernel_routes(tb, n0)
        assert pings(tb, n0.pods[0], n1.pods[0]) == 5 and pings(tb, n1.pods[0], n0.pods[0]) == 5
        assert etcd_routes(c) == {}
    finally:
        etcd.start()
    for t in (a, b, c):
        wait_routes(t, others(tb, t.node), timeout=30)
        # Both of its threads must answer again: the watch's list can bring the
        # routes back while the lease thread still waits out its backoff.
        t.wait_for(lambda s: s["etcd"]["connected"], timeout=30)
    for x, y in ((n0, n2), (n2, n1)):
        assert pings(tb, x.pods[0], y.pods[0]) == 5


def test_a_lease_written_by_hand_in_flannels_form_is_routed(tb: Testbed, etcd: EtcdServer, prefix: str,
                                                            start: Start) -> None:
    n0, n1, _ = tb.nodes
    a = start(0)
    b = start(1, pod_cidrs=[])  # registers nothing: its lease is written by hand, as a flannel node's
    lease = etcd.lease_grant(60)
    key = f"{prefix}/subnets/{n1.pod_cidr.replace('/', '-')}"
    etcd.etcdctl("put", key, FLANNEL % n1.ip, f"--lease={lease:x}")
    wait_routes(a, {n1.pod_cidr: n1.ip})
    wait_routes(b, {n0.pod_cidr: n0.ip})
    [route] = a.request("routes")["routes"]
    assert route["detail"] == f"{key}@{etcd.get(key)[key]['mod_revision']}"
    assert pings(tb, n0.pods[0], n1.pods[0]) == 5 and pings(tb, n1.pods[0], n0.pods[0]) == 5
    etcd.etcdctl("lease", "revoke", f"{lease:x}")
    wait_routes(a, {})
    assert n1.pod_cidr not in kernel_routes(tb, n0)


def test_a_cidr_another_node_holds_is_refused_naming_the_key_and_holder(tb: Testbed, etcd: EtcdServer,
                                                                        prefix: str, start: Start) -> None:
    n0, n1, _ = tb.nodes
    a = start(0)
    lease_a = a.wait_for(lambda s: bool(s["etcd"]["registered"]))["etcd"]["lease"]
    b = start(1, stats=True, pod_cidrs=[n0.pod_cidr, n1.pod_cidr])
    key = f"{prefix}/subnets/{n0.pod_cidr.replace('/', '-')}"
    state = b.wait_for(lambda s: n0.pod_cidr in s["etcd"]["conflicts"] and bool(s["etcd"]["registered"]))["etcd"]
    message = state["conflicts"][n0.pod_cidr]
    assert f"{key} is held by {n0.ip} (lease {lease_a})" in message
    assert list(state["registered"]) == [n1.pod_cidr]
    assert etcd_routes(b) == {}  # its own CIDR is not a route, whoever holds it
    wait_routes(a, {n1.pod_cidr: n1.ip})  # the CIDR it could register is routed by the others
    assert message in b.log()
    assert f"refused: {message}" in tb.python(n1, "-m", "ipipfast", "show").stdout
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(scrape_metrics(tb, n1)) for s in fam.samples}
    assert samples[("ipipfast_etcd_conflicts", (("cidr", n0.pod_cidr), ("holder", n0.ip), ("key", key)))] == 1
    assert samples[("ipipfast_etcd_connected", ())] == 1 and samples[("ipipfast_etcd_registered", ())] == 1
    assert samples[("ipipfast_routes", (("kind", "encapsulated"), ("source", "etcd")))] == 0


def test_a_clean_exit_leaves_the_lease_to_expire(tb: Testbed, etcd: EtcdServer, prefix: str, start: Start) -> None:
    """As flannel does: the others forward on to a node that restarts within its TTL."""
    n0, n1, _ = tb.nodes
    a, b = start(0), start(1)
    wait_routes(b, {n0.pod_cidr: n0.ip})
    lease = int(a.status()["etcd"]["lease"], 16)
    assert a.stop() == 0
    key = f"{prefix}/subnets/{n0.pod_cidr.replace('/', '-')}"
    assert etcd.get(key)[key]["lease"] == lease and etcd.lease(lease)[1] > 0
    assert etcd_routes(b) == {n0.pod_cidr: n0.ip}
