"""The kernel route source end to end: routes written into a node's TUN by
the test (pyroute2 in the node's namespace, felix-style proto 80), real
packets between pods, frames on the underlay parsed by scapy, and the
kernel's routes read back with iproute2."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import yaml
from scapy.layers.inet import IP

from ipipfast.config import digest
from ipipfast_lab import traffic
from ipipfast_lab.daemons import TunnelProcess, delta, start_tunnels
from ipipfast_lab.testbed import UNDERLAY_GATEWAY, Node, Testbed
from netns_helpers import Capture

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces, TUN and AF_PACKET")]

RTNH_F_ONLINK = 4
OURS = "191"  # 0xbf: iproute2 prints it in decimal unless rt_protos names it


def tun_name(tb: Testbed, node: Node) -> str:
    return f"{tb.prefix}t{node.index}"


def kernel_route(tb: Testbed, node: Node, cidr: str, via: str, how: str = "replace", proto: int = 80) -> None:
    """`ip route replace <cidr> via <via> dev <tun> onlink proto 80`, as felix writes it."""
    ipr = tb.ipr(node)
    index = ipr.link_lookup(ifname=tun_name(tb, node))[0]
    ipr.route(how, dst=cidr, gateway=via, oif=index, proto=proto, flags=RTNH_F_ONLINK)


def ip_routes(tb: Testbed, node: Node, *args: str) -> list[dict]:
    return json.loads(tb.run(node, ["ip", "-json", "route", "show", *args]).stdout or "[]")


def wait_routes(tb: Testbed, node: Node, cidr: str, holds: Callable[[list[dict]], bool], timeout: float = 10) -> list[dict]:
    """The kernel's routes for cidr once holds() is true of them."""
    deadline = time.monotonic() + timeout
    while not holds(routes := ip_routes(tb, node, "exact", cidr)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert holds(routes), routes
    return routes


def unicast(routes: list[dict]) -> list[dict]:
    return [r for r in routes if r.get("type", "unicast") == "unicast"]


def routes_by(status: dict, source: str, kind: str) -> int:
    return next((n for s, k, n in status["table"]["routes_by"] if (s, k) == (source, kind)), 0)


def generation(t: TunnelProcess) -> int:
    return t.status()["table"]["generation"]


def outer_destinations(cap: Capture, src: str) -> set[str]:
    return {f[IP].dst for f in cap.ipip() if f[IP].src == src}


def start(tb: Testbed, configs: list[dict]) -> list[TunnelProcess]:
    return start_tunnels(tb, configs=configs)


@pytest.fixture
def felix() -> Iterator[tuple[Testbed, list[TunnelProcess]]]:
    """Three nodes; node 0 has no routes in its file (it learns them from
    the kernel), the others route to every node from theirs."""
    with Testbed(nodes=3, pods_per_node=1) as tb:
        procs = start(tb, [{**tb.node_config(tb.nodes[0]), "routes": []}] + [tb.node_config(n) for n in tb.nodes[1:]])
        try:
            yield tb, procs
        finally:
            for p in procs:
                p.stop()


def test_felix_routes_carry_traffic_are_repointed_and_withdrawn(felix, tmp_path) -> None:
    tb, (t0, _, _) = felix
    n0, n1, n2 = tb.nodes
    a, b = n0.pods[0], n1.pods[0]
    assert traffic.ping(tb, a, b.ip, count=2, interval=0.01, timeout=0.3)["received"] == 0  # the blackhole

    kernel_route(tb, n0, n1.pod_cidr, n1.ip)
    t0.wait_for(lambda s: routes_by(s, "kernel", "encapsulated") == 1)
    with Capture(tb, n0, tmp_path) as cap:
        assert traffic.ping(tb, a, b.ip, count=5, interval=0.01)["received"] == 5
    assert outer_destinations(cap, n0.ip) == {n1.ip}
    # Nothing of ours is written where felix's route already leads into the TUN.
    assert [r["protocol"] for r in unicast(ip_routes(tb, n0, "exact", n1.pod_cidr))] == ["80"]

    g = generation(t0)
    kernel_route(tb, n0, n1.pod_cidr, n2.ip)  # re-pointed to another node at once
    t0.wait_for(lambda s: s["table"]["generation"] > g)
    with Capture(tb, n0, tmp_path) as cap:
        traffic.ping(tb, a, b.ip, count=5, interval=0.01, timeout=0.3)  # node 2 hands it on to node 1
    assert outer_destinations(cap, n0.ip) == {n2.ip}

    tb.ipr(n0).route("del", dst=n1.pod_cidr, proto=80)
    t0.wait_for(lambda s: routes_by(s, "kernel", "encapsulated") == 0)
    with Capture(tb, n0, tmp_path) as cap:
        assert traffic.ping(tb, a, b.ip, count=3, interval=0.01, timeout=0.3)["received"] == 0
    assert not [f for f in cap.frames if IP in f and b.ip in (f[IP].dst, getattr(f[IP].payload, "dst", None))]
    assert t0.counters()["kernel_notifications_lost"] == 0


def test_gatewayless_and_multipath_routes_are_refused_and_counted(felix) -> None:
    tb, (t0, _, _) = felix
    n0, n1, n2 = tb.nodes
    ipr = tb.ipr(n0)
    tun = ipr.link_lookup(ifname=tun_name(tb, n0))[0]
    ipr.route("add", dst="198.19.50.0/24", oif=tun, proto=80)
    ipr.route("add", dst="198.19.51.0/24", proto=80, multipath=[
        {"gateway": n1.ip, "oif": tun, "flags": RTNH_F_ONLINK}, {"gateway": n2.ip, "oif": tun, "flags": RTNH_F_ONLINK}])
    kernel_route(tb, n0, "198.19.52.0/24", "198.19.52.1")  # via inside its own CIDR: a tunnel loop
    status = t0.wait_for(lambda s: len(s["table"]["refused"]) == 3)
    assert sorted((r["cidr"], r["reason"], r["detail"]) for r in status["table"]["refused"]) == [
        ("198.19.50.0/24", "no_gateway", "proto 80"), ("198.19.51.0/24", "multipath", "proto 80"),
        ("198.19.52.0/24", "bad_gateway", "proto 80")]
    counters = t0.counters()
    assert [counters[f"kernel_routes_refused_{r}"] for r in ("no_gateway", "multipath", "bad_gateway")] == [1, 1, 1]
    assert routes_by(status, "kernel", "encapsulated") == 0
    log = t0.log()
    assert "kernel route 198.19.50.0/24 metric 0 proto 80 into the tunnel refused (no_gateway)" in log
    assert "refused (multipath): 2 next hops" in log
    ipr.route("del", dst="198.19.50.0/24", proto=80)
    t0.wait_for(lambda s: len(s["table"]["refused"]) == 2)
    assert t0.counters()["kernel_routes_refused_no_gateway"] == 1  # counted once, when it came


def test_file_beats_kernel_and_both_sides_are_shown(felix, tmp_path) -> None:
    tb, (_, t1, _) = felix
    n0, n1, n2 = tb.nodes
    a, c = n1.pods[0], n2.pods[0]
    wait_routes(tb, n1, n2.pod_cidr, lambda rs: [r["protocol"] for r in unicast(rs)] == [OURS])
    kernel_route(tb, n1, n2.pod_cidr, n0.ip)  # BIRD-style replace of our route: towards another node
    status = t1.wait_for(lambda s: s["table"]["conflicts"] != [])
    line = next(i for i, text in enumerate(t1.config_path.read_text().splitlines(), 1) if n2.pod_cidr in text)
    assert status["table"]["conflicts"] == [{
        "cidr": n2.pod_cidr,
        "winner": {"source": "file", "node": n2.ip, "detail": f"node.yaml:{line}"},
        "loser": {"source": "kernel", "node": n0.ip, "detail": "proto 80"}}]
    with Capture(tb, n1, tmp_path) as cap:
        assert traffic.ping(tb, a, c.ip, count=5, interval=0.01)["received"] == 5
    assert outer_destinations(cap, n1.ip) == {n2.ip}  # the file's node, by the rule
    # The kernel's route leads into the TUN, so ours is not put back over it...
    assert [r["protocol"] for r in unicast(ip_routes(tb, n1, "exact", n2.pod_cidr))] == ["80"]
    # ... until it goes.
    tb.ipr(n1).route("del", dst=n2.pod_cidr, proto=80)
    routes = wait_routes(tb, n1, n2.pod_cidr, lambda rs: [r["protocol"] for r in unicast(rs)] == [OURS])
    assert (routes[0]["dev"], routes[0]["gateway"], routes[0]["flags"]) == (tun_name(tb, n1), n2.ip, ["onlink"])
    t1.wait_for(lambda s: s["table"]["conflicts"] == [])
    assert traffic.ping(tb, a, c.ip, count=3, interval=0.01)["received"] == 3


def test_lost_notifications_are_repaired_by_a_dump(tmp_path) -> None:
    """A daemon stopped (SIGSTOP) while 60,000 routes arrive: its monitor's
    buffer overflows, the kernel says ENOBUFS, and a dump puts it right."""
    n_routes = 60_000
    with Testbed(nodes=2, pods_per_node=1) as tb:
        n0, n1 = tb.nodes
        t0, t1 = start(tb, [{**tb.node_config(n0), "routes": []}, tb.node_config(n1)])
        try:
            batch = tmp_path / "routes"
            tun = tun_name(tb, n0)
            first = 198 << 24 | 19 << 16 | 64 << 8
            lines = [f"route add {first + i >> 24}.{first + i >> 16 & 255}.{first + i >> 8 & 255}.{first + i & 255}"
                     f" via {n1.ip} dev {tun} onlink proto 80\n" for i in range(n_routes)]
            batch.write_text("".join(lines) + f"route add {n1.pod_cidr} via {n1.ip} dev {tun} onlink proto 80\n")
            t0.proc.send_signal(signal.SIGSTOP)
            try:
                tb.run(n0, ["ip", "-batch", str(batch)])
            finally:
                t0.proc.send_signal(signal.SIGCONT)
            status = t0.wait_for(lambda s: routes_by(s, "kernel", "encapsulated") == n_routes + 1, timeout=60)
            assert status["kernel_routes"]["kernel_notifications_lost"] >= 1
            assert status["kernel_routes"]["kernel_resyncs_changed"] >= 1
            assert traffic.ping(tb, n0.pods[0], n1.pods[0].ip, count=3, interval=0.01)["received"] == 3
        finally:
            t0.stop()
            t1.stop()


def test_a_link_flap_puts_our_routes_back(tmp_path) -> None:
    """IPv4 flushes a down device's routes without a notification: the
    daemon re-reads the kernel's routes when its TUN goes down or up."""
    with Testbed(nodes=2, pods_per_node=1) as tb:
        n0, n1 = tb.nodes
        t0, t1 = start(tb, [tb.node_config(n) for n in tb.nodes])
        try:
            resyncs = t0.counters()["kernel_resyncs"]
            tb.run(n0, ["ip", "link", "set", tun_name(tb, n0), "down"])
            tb.run(n0, ["ip", "link", "set", tun_name(tb, n0), "up"])
            wait_routes(tb, n0, n1.pod_cidr, lambda rs: [r["protocol"] for r in unicast(rs)] == [OURS])
            t0.wait_for(lambda s: s["kernel_routes"]["kernel_resyncs_changed"] >= 1)
            assert t0.counters()["kernel_resyncs"] > resyncs
            assert traffic.ping(tb, n0.pods[0], n1.pods[0].ip, count=3, interval=0.01)["received"] == 3
        finally:
            t0.stop()
            t1.stop()


def test_an_edited_file_is_followed_and_a_bad_edit_refused_with_its_line() -> None:
    """No SIGHUP: the daemon watches the file's directory (inotify)."""
    with Testbed(nodes=2, pods_per_node=1) as tb:
        n0, n1 = tb.nodes
        a, b = n0.pods[0], n1.pods[0]
        t0, t1 = start(tb, [tb.node_config(n) for n in tb.nodes])
        try:
            good = tb.node_config(n0)
            t0.config_path.write_text("node: {ip: 198.18.0.10/24, interface: x}\nroutes:\n"
                                      "  - {cidr: 198.19.1.0/33, via: 198.18.0.11}\n")
            t0.wait_for(lambda s: s["reloads"]["refused"] == 1)
            assert "reload refused, keeping the running table" in t0.log() and "node.yaml:3: routes[0].cidr" in t0.log()
            assert traffic.ping(tb, a, b.ip, count=3, interval=0.01)["received"] == 3

            edited = t0.config_path.with_suffix(".new")  # as an editor saves: a new file renamed over the old
            edited.write_text(text := json.dumps({**good, "routes": []}))
            edited.replace(t0.config_path)
            t0.wait_for(lambda s: s["config_digest"] == digest(text).hex())
            wait_routes(tb, n0, n1.pod_cidr, lambda rs: unicast(rs) == [])
            assert traffic.ping(tb, a, b.ip, count=3, interval=0.01, timeout=0.3)["received"] == 0

            t0.config_path.write_text(text := yaml.safe_dump(good))  # written in place
            t0.wait_for(lambda s: s["config_digest"] == digest(text).hex() and routes_by(s, "file", "encapsulated") == 1)
            wait_routes(tb, n0, n1.pod_cidr, lambda rs: len(unicast(rs)) == 1)
            assert traffic.ping(tb, a, b.ip, count=3, interval=0.01)["received"] == 3
        finally:
            t0.stop()
            t1.stop()


def test_a_mode_change_at_run_time_converges_both_ways() -> None:
    """Two nodes share an underlay subnet, a third is behind the router:
    CrossSubnet moves the same-subnet route from the TUN to the underlay
    and back, in one replace each, leaving nothing stale."""
    with Testbed(nodes=3, pods_per_node=1, underlay="routed", subnets=[1, 1, 2]) as tb:
        n0, n1, n2 = tb.nodes
        procs = start(tb, [tb.node_config(n) for n in tb.nodes])
        t0 = procs[0]
        tun = tun_name(tb, n0)

        def ours() -> list[tuple[str, str, str]]:
            return sorted((r["dst"], r["dev"], r["gateway"]) for r in ip_routes(tb, n0, "proto", OURS))

        def converged(want: list[tuple[str, str, str]]) -> None:
            deadline = time.monotonic() + 10
            while ours() != want and time.monotonic() < deadline:
                time.sleep(0.05)
            assert ours() == want
            for other in (n1, n2):
                assert traffic.ping(tb, n0.pods[0], other.pods[0].ip, count=3, interval=0.01)["received"] == 3

        try:
            always = [(n1.pod_cidr, tun, n1.ip), (n2.pod_cidr, tun, n2.ip)]
            converged(always)
            writes = t0.counters()["kernel_route_writes"]
            t0.reload(tb.node_config(n0, mode="CrossSubnet"))
            t0.wait_for(lambda s: s["routes_direct"] == 1)
            converged([(n1.pod_cidr, n0.interface, n1.ip), (n2.pod_cidr, tun, n2.ip)])
            assert t0.counters()["kernel_route_writes"] == writes + 1  # one replace
            t0.reload(tb.node_config(n0, mode="Always"))
            t0.wait_for(lambda s: s["routes_direct"] == 0)
            converged(always)
            assert t0.counters()["kernel_route_writes"] == writes + 2
        finally:
            for p in procs:
                p.stop()


def test_a_reload_that_changes_one_route_is_one_netlink_call_and_loses_no_packet() -> None:
    """A stream of UDP round trips to an unchanged route while the file is
    reloaded again and again: every datagram comes back, nothing is dropped,
    and each reload writes one route in one batch; none when the file only
    changed in a comment, or not at all."""
    with Testbed(nodes=2, pods_per_node=1) as tb:
        n0, n1 = tb.nodes
        t0, t1 = start(tb, [tb.node_config(n) for n in tb.nodes])
        try:
            base = tb.node_config(n0)
            extra = {"cidr": "198.19.99.0/24", "via": n1.ip}
            before = t0.counters()
            before_generation = generation(t0)
            result: dict = {}
            sender = threading.Thread(target=lambda: result.update(
                traffic.udp_roundtrip(tb, n0.pods[0], n1.pods[0], count=3000, size=256, timeout=1.0)))
            sender.start()
            try:
                for i in range(10):
                    text = yaml.safe_dump({**base, "routes": base["routes"] + ([extra] if i % 2 == 0 else [])})
                    for version in (text, text + "# the same routes\n"):  # the second: nothing to do
                        t0.reload(version)
                        t0.wait_for(lambda s, v=version: s["config_digest"] == digest(v).hex())
            finally:
                sender.join()
            assert (result["received"], result["corrupt"], result["echoed"]) == (3000, 0, 3000), result
            d = delta(before, t0.counters())
            assert {k: v for k, v in d.items() if "drop" in k} == {}, d
            assert (d["kernel_route_writes"], d["kernel_route_batches"]) == (10, 10), d
            assert generation(t0) == before_generation + 10  # the datapath too saw only the ten changes
        finally:
            t0.stop()
            t1.stop()


def _show_in_node(n: Node, tun: str, out: dict) -> None:
    """In the node's namespace: a Routing on the node's links, the file and
    the kernel both naming routes, and what show() says of them."""
    import socket
    import subprocess
    from ipaddress import IPv4Interface

    from ipipfast.routes import Mode, Route, RouteSet
    from ipipfast.routing import Routing

    routing = Routing(socket.if_nametoindex(tun), socket.if_nametoindex(n.interface),
                      IPv4Interface(f"{n.ip}/{n.prefixlen}"), Mode.CROSS_SUBNET, True, 90, "/etc/node.yaml", lambda: None)
    try:
        routing.set_file(RouteSet.of([Route.parse("198.19.1.0/24", "198.18.0.11"),
                                      Route.parse("198.19.2.0/24", "198.18.9.12"),
                                      Route.parse("198.19.3.0/24", "198.18.9.13")], detail=7))
        ip = lambda *a: subprocess.run(["ip", "route", *a], check=True)  # noqa: E731
        ip("add", "198.19.3.0/24", "via", "198.18.9.14", "dev", tun, "onlink", "proto", "bird")
        ip("add", "198.19.4.0/24", "via", "198.18.9.14", "dev", tun, "onlink", "proto", "80")
        ip("add", "198.19.5.0/24", "dev", tun, "proto", "80")
        ip("add", "198.19.2.0/24", "via", "198.18.0.11", "dev", n.interface, "proto", "static")
        routing.take_kernel()
        routing.build()
        routing.resolve()
        routing.program()
        out.update(json.loads(json.dumps(routing.show())))  # plain data, as the control socket sends it
        out["counts"] = {f"{s}/{k}": v for (s, k), v in routing.counts().items()}
    finally:
        routing.close()


def test_show_gives_each_route_its_source_and_the_conflicts_and_refusals(tmp_path) -> None:
    with Testbed(nodes=2, pods_per_node=1) as tb:
        n0 = tb.nodes[0]
        tun = f"{tb.prefix}s0"
        tb.run(n0, ["ip", "tuntap", "add", "dev", tun, "mode", "tun"])
        tb.run(n0, ["ip", "link", "set", tun, "up"])
        path = tmp_path / "show.json"

        def run(node: Node) -> None:
            out: dict = {}
            _show_in_node(node, tun, out)
            path.write_text(json.dumps(out))
        tb.in_netns(n0, run, n0)
        shown = json.loads(path.read_text())
    assert shown["routes"] == [
        {"cidr": "198.19.1.0/24", "node": "198.18.0.11", "source": "file", "detail": "node.yaml:7",
         "kind": "direct", "next_hop": "198.18.0.11", "kernel": "ours"},
        {"cidr": "198.19.2.0/24", "node": "198.18.9.12", "source": "file", "detail": "node.yaml:7",
         "kind": "encapsulated", "next_hop": UNDERLAY_GATEWAY, "kernel": "held by another route"},
        {"cidr": "198.19.3.0/24", "node": "198.18.9.13", "source": "file", "detail": "node.yaml:7",
         "kind": "encapsulated", "next_hop": UNDERLAY_GATEWAY, "kernel": "proto bird"},
        {"cidr": "198.19.4.0/24", "node": "198.18.9.14", "source": "kernel", "detail": "proto 80",
         "kind": "encapsulated", "next_hop": UNDERLAY_GATEWAY, "kernel": "proto 80"},
    ]
    assert shown["conflicts"] == [{"cidr": "198.19.3.0/24",
                                   "winner": {"source": "file", "node": "198.18.9.13", "detail": "node.yaml:7"},
                                   "loser": {"source": "kernel", "node": "198.18.9.14", "detail": "proto bird"}}]
    assert shown["refused"] == [{"cidr": "198.19.5.0/24", "metric": 0, "reason": "no_gateway", "detail": "proto 80",
                                 "via": None}]
    assert (shown["mode"], shown["held"]) == ("CrossSubnet", 1)
    assert shown["counts"] == {"file/direct": 1, "file/encapsulated": 2, "kernel/encapsulated": 1}


def test_a_storm_of_signals_never_stalls_the_main_thread() -> None:
    """Edits, each followed at once by a SIGHUP, by the hundred: the watcher
    thread wakes the main thread, and the signal lands as it wakes. Its
    wake-up takes no lock a handler could find held (a threading.Event's
    did: a handler landing as the main thread left its wait() stopped that
    thread for good), so the last edit is still taken and SIGTERM stops it."""
    with Testbed(nodes=2, pods_per_node=1) as tb:
        n0, n1 = tb.nodes
        t0, t1 = start(tb, [tb.node_config(n) for n in tb.nodes])
        try:
            base = tb.node_config(n0)
            for i in range(300):
                t0.reload({**base, "routes": base["routes"] + [{"cidr": f"198.19.{100 + i % 2}.0/24", "via": n1.ip}]})
                time.sleep(0.002 * (i % 5))
            text = yaml.safe_dump({**base, "routes": []})
            t0.write_config(text)
            t0.wait_for(lambda s: s["config_digest"] == digest(text).hex())
            wait_routes(tb, n0, n1.pod_cidr, lambda rs: unicast(rs) == [])
        finally:
            assert t0.stop() == 0
            t1.stop()
