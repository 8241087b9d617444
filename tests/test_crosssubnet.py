"""Calico's ipipMode on a routed underlay: three nodes on two subnets
(198.18.1.0/24: n0, n1; 198.18.2.0/24: n2) joined by a router namespace that
knows no pod routes. The oracles: each node's kernel routes of ours read back
over netlink, compared with what the mode says for the topology; pod traffic;
and every frame on the nodes' underlays parsed by scapy (a direct packet is
plain IP to the pod, an encapsulated one IPIP with outer node -> node), with
the MAC it went to."""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from scapy.layers.inet import IP
from scapy.layers.l2 import Ether

from ipipfast.routing import RTPROT_IPIPFAST
from ipipfast_lab import traffic
from ipipfast_lab.bird import KernelRoute, kernel_routes, wait_kernel_routes
from ipipfast_lab.daemons import TunnelProcess, start_tunnels
from ipipfast_lab.testbed import Node, Testbed
from netns_helpers import Capture

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces, TUN and AF_PACKET")]

PINGS = 3
DIRECT, ENCAPSULATED, DROPPED = "direct", "encapsulated", "dropped"


def same_subnet(tb: Testbed, a: Node, b: Node) -> bool:
    return tb.subnets[a.index] == tb.subnets[b.index]


def path(tb: Testbed, mode: str, a: Node, b: Node) -> str:
    """How a's pod reaches b's under Calico's ipipMode, with a router that
    knows no pod routes: in Never (BGP mode) across it, not at all."""
    if mode == "Always" or (mode == "CrossSubnet" and not same_subnet(tb, a, b)):
        return ENCAPSULATED
    return DIRECT if same_subnet(tb, a, b) else DROPPED


def expected_routes(tb: Testbed, node: Node, mode: str) -> set[KernelRoute]:
    """Our routes on node under mode: into the TUN on-link; on the underlay
    via a node of the subnet; or via the gateway, on-link, as BIRD resolves
    a next hop behind a router."""
    out = set()
    for other in tb.nodes:
        if other is node:
            continue
        how = path(tb, mode, node, other)
        if how == ENCAPSULATED:
            out.add(KernelRoute(other.pod_cidr, via=other.ip, dev=f"{tb.prefix}t{node.index}", onlink=True))
        elif how == DIRECT:
            out.add(KernelRoute(other.pod_cidr, via=other.ip, dev=node.interface))
        else:
            out.add(KernelRoute(other.pod_cidr, via=node.gateway, dev=node.interface, onlink=True))
    return out


def router_mac(tb: Testbed, node: Node) -> str:
    """The MAC of the router's address on node's subnet."""
    assert tb.router is not None
    return tb.mac(tb.router, tb.router_links[tb.subnets[node.index]])


def hop_mac(tb: Testbed, a: Node, b: Node) -> str:
    """Where a's frames to b go on the wire: b itself, or the router."""
    return tb.mac(b) if same_subnet(tb, a, b) else router_mac(tb, a)


def expected_next_hops(tb: Testbed, node: Node) -> dict[str, str]:
    """The daemon's next hops: every peer, each with the MAC its frames go to
    (and, for a direct one, the MAC its IPIP must come from: decap checks it)."""
    return {o.ip: hop_mac(tb, node, o) for o in tb.nodes if o is not node}


def plain(frames: list[Ether], src: str, dst: str) -> list[Ether]:
    return [f for f in frames if IP in f and f[IP].proto != 4 and (f[IP].src, f[IP].dst) == (src, dst)]


def ipip(frames: list[Ether], src: str, dst: str) -> list[Ether]:
    """IPIP frames whose inner packet goes src -> dst."""
    return [f for f in frames if IP in f and f[IP].proto == 4 and isinstance(f[IP].payload, IP)
            and (f[IP].payload.src, f[IP].payload.dst) == (src, dst)]


def config(tb: Testbed, node: Node, mode: str) -> dict:
    return tb.node_config(node, mode=mode)


def converge(tb: Testbed, tunnels: list[TunnelProcess], mode: str) -> None:
    """Until every node's routes of ours are exactly what mode says, and
    every daemon has every peer as a next hop, resolved."""
    for node, t in zip(tb.nodes, tunnels):
        wait_kernel_routes(tb, node, expected_routes(tb, node, mode), timeout=10, proto=RTPROT_IPIPFAST)
        want = expected_next_hops(tb, node)
        status = t.wait_for(lambda s, w=want: s["mode"] == mode and s["next_hops"] == w)
        assert status["routes_direct"] == sum(path(tb, mode, node, o) != ENCAPSULATED
                                              for o in tb.nodes if o is not node)


def check_paths(tb: Testbed, mode: str, tmp: Path) -> None:
    """Pings between every pair of pods, with captures on every underlay:
    each request and reply went the way mode says, and nowhere else."""
    pairs = [(a, b) for a in tb.nodes for b in tb.nodes if a.index < b.index]
    # Where nothing comes back, the way back is tried too (its requests die the same way).
    pings = pairs + [(b, a) for a, b in pairs if path(tb, mode, a, b) == DROPPED]
    caps = [Capture(tb, n, tmp) for n in tb.nodes]
    for cap in caps:
        cap.__enter__()
    results = {}
    try:
        for a, b in pings:
            results[a.index, b.index] = traffic.ping(tb, a.pods[0], b.pods[0].ip, count=PINGS, interval=0.01,
                                                     timeout=0.3 if path(tb, mode, a, b) == DROPPED else 1.0)
    finally:
        for cap in caps:
            cap.__exit__(None, None, None)
    frames = [cap.frames for cap in caps]
    for a, b in pings:
        how, pa, pb = path(tb, mode, a, b), a.pods[0].ip, b.pods[0].ip
        got = results[a.index, b.index]["received"]
        where = f"{mode}: {a.name} -> {b.name} ({how})"
        legs = [(a, b, pa, pb)] + ([(b, a, pb, pa)] if how != DROPPED else [])  # the request, the reply
        for x, y, src, dst in legs:
            sent_plain, sent_ipip = plain(frames[x.index], src, dst), ipip(frames[x.index], src, dst)
            if how == ENCAPSULATED:
                assert not sent_plain, f"{where}: plain frames on the underlay"
                assert len(sent_ipip) >= PINGS, where
                assert {(f[IP].src, f[IP].dst, f[Ether].dst) for f in sent_ipip} == {(x.ip, y.ip, hop_mac(tb, x, y))}
                assert len(ipip(frames[y.index], src, dst)) >= PINGS, f"{where}: not at {y.name}"
            else:
                assert not sent_ipip, f"{where}: IPIP on the underlay"
                assert len(sent_plain) >= PINGS, where
                assert {f[Ether].dst for f in sent_plain} == {hop_mac(tb, x, y)}, where
        if how == DROPPED:
            assert got == 0, where
            # The router had no route for it: nothing reached b, by either path.
            assert not plain(frames[b.index], pa, pb) and not ipip(frames[b.index], pa, pb), where
        else:
            assert got == PINGS, where
            assert len(plain(frames[b.index], pa, pb) if how == DIRECT else ipip(frames[b.index], pa, pb)) >= PINGS


@pytest.fixture
def bed() -> Iterator[Testbed]:
    with Testbed(nodes=3, pods_per_node=1, underlay="routed", subnets=[1, 1, 2]) as tb:
        yield tb


def running(tb: Testbed, mode: str) -> list[TunnelProcess]:
    return start_tunnels(tb, configs=[config(tb, n, mode) for n in tb.nodes])


def stop(tunnels: list[TunnelProcess]) -> None:
    for t in tunnels:
        t.stop()


def test_crosssubnet_is_direct_inside_the_subnet_and_encapsulated_across(bed, tmp_path) -> None:
    tunnels = running(bed, "CrossSubnet")
    try:
        converge(bed, tunnels, "CrossSubnet")
        check_paths(bed, "CrossSubnet", tmp_path)
        n0, n1, n2 = bed.nodes
        for a, b in ((n0, n1), (n0, n2), (n2, n1)):
            t = traffic.tcp_transfer(bed, a.pods[0], b.pods[0], 1 << 20)
            assert t["match"], (a.name, b.name, t)
    finally:
        stop(tunnels)


def test_mode_changes_at_run_time_converge_with_nothing_stale(bed, tmp_path) -> None:
    """Always -> CrossSubnet -> Never -> CrossSubnet -> Always by file edits
    on every node: after each, the routes of every node are exactly the
    mode's, the next hops too, and the traffic takes the mode's path."""
    tunnels = running(bed, "Always")
    try:
        converge(bed, tunnels, "Always")
        check_paths(bed, "Always", tmp_path)
        for mode in ("CrossSubnet", "Never", "CrossSubnet", "Always"):
            for node, t in zip(bed.nodes, tunnels):
                t.reload(config(bed, node, mode))
            converge(bed, tunnels, mode)
            check_paths(bed, mode, tmp_path)
        for t in tunnels:
            assert t.counters()["kernel_route_write_errors"] == 0
    finally:
        stop(tunnels)


def route_to(tb: Testbed, node: Node, cidr: str) -> set[KernelRoute]:
    return {r for r in kernel_routes(tb, node, RTPROT_IPIPFAST) if r.cidr == cidr}


def test_our_routes_and_next_hops_follow_the_route_to_the_peer(bed, tmp_path) -> None:
    """The route to a peer changes under a running daemon: its direct route
    (Never, with a router that knows the pod CIDRs, as Calico's BGP mode
    peering with its top-of-rack router) and its encapsulated frames
    (CrossSubnet) go to the new next hop; with no route to the peer, neither
    goes anywhere; the route back, both are back."""
    n0, n1, n2 = bed.nodes
    a, c = n0.pods[0], n2.pods[0]
    for n in bed.nodes:  # the router learns every pod CIDR from its node
        bed.ipr(bed.router).route("add", dst=n.pod_cidr, gateway=n.ip)
    ipr = bed.ipr(n0)
    u0 = ipr.link_lookup(ifname=n0.interface)[0]
    tunnels = running(bed, "Never")
    t0 = tunnels[0]
    via = lambda gateway: {KernelRoute(n2.pod_cidr, via=gateway, dev=n0.interface, onlink=True)}  # noqa: E731
    try:
        converge(bed, tunnels, "Never")
        with Capture(bed, n0, tmp_path) as cap:
            assert traffic.ping(bed, a, c.ip, count=PINGS, interval=0.01)["received"] == PINGS  # through the router
        assert {f[Ether].dst for f in plain(cap.frames, a.ip, c.ip)} == {router_mac(bed, n0)}

        ipr.route("add", dst=f"{n2.ip}/32", gateway=n1.ip, oif=u0)  # n2 by way of n1 now
        wait_kernel_routes(bed, n0, expected_routes(bed, n0, "Never") - via(n0.gateway) | via(n1.ip),
                           timeout=10, proto=RTPROT_IPIPFAST)
        with Capture(bed, n0, tmp_path) as cap:
            assert traffic.ping(bed, a, c.ip, count=PINGS, interval=0.01)["received"] == PINGS  # n1 forwards
        assert {f[Ether].dst for f in plain(cap.frames, a.ip, c.ip)} == {bed.mac(n1)}
        ipr.route("del", dst=f"{n2.ip}/32", gateway=n1.ip, oif=u0)
        wait_kernel_routes(bed, n0, expected_routes(bed, n0, "Never"), timeout=10, proto=RTPROT_IPIPFAST)

        ipr.route("del", dst="0.0.0.0/0")  # n0 reaches nothing behind the router
        wait_kernel_routes(bed, n0, expected_routes(bed, n0, "Never") - via(n0.gateway), timeout=10,
                           proto=RTPROT_IPIPFAST)
        shown = next(r for r in t0.request("routes")["routes"] if r["cidr"] == n2.pod_cidr)
        assert (shown["next_hop"], shown["kernel"]) == (None, "no route to its node")
        with Capture(bed, n0, tmp_path) as cap:
            assert traffic.ping(bed, a, c.ip, count=PINGS, interval=0.01, timeout=0.3)["received"] == 0
        assert not plain(cap.frames, a.ip, c.ip) and not ipip(cap.frames, a.ip, c.ip)  # the blackhole took it
        ipr.route("add", dst="0.0.0.0/0", gateway=n0.gateway, oif=u0, flags=4)  # onlink, as the testbed's
        wait_kernel_routes(bed, n0, expected_routes(bed, n0, "Never"), timeout=10, proto=RTPROT_IPIPFAST)

        t0.reload(config(bed, n0, "CrossSubnet"))
        t0.wait_for(lambda s: s["next_hops"].get(n2.ip) == router_mac(bed, n0))
        ipr.route("add", dst=f"{n2.ip}/32", gateway=n1.ip, oif=u0)
        t0.wait_for(lambda s: s["next_hops"].get(n2.ip) == bed.mac(n1))
        with Capture(bed, n0, tmp_path) as cap:
            # n1 forwards no IPIP it did not send (its tc egress drop): the frames' MAC tells.
            traffic.ping(bed, a, c.ip, count=PINGS, interval=0.01, timeout=0.3)
        sent = ipip(cap.frames, a.ip, c.ip)
        assert len(sent) >= PINGS and {(f[IP].dst, f[Ether].dst) for f in sent} == {(n2.ip, bed.mac(n1))}
        ipr.route("del", dst=f"{n2.ip}/32", gateway=n1.ip, oif=u0)
        t0.wait_for(lambda s: s["next_hops"].get(n2.ip) == router_mac(bed, n0))
        with Capture(bed, n0, tmp_path) as cap:
            assert traffic.ping(bed, a, c.ip, count=PINGS, interval=0.01)["received"] == PINGS
        assert {(f[IP].dst, f[Ether].dst) for f in ipip(cap.frames, a.ip, c.ip)} == {(n2.ip, router_mac(bed, n0))}
        assert t0.counters()["kernel_route_write_errors"] == 0
    finally:
        stop(tunnels)


def test_a_peer_that_moves_into_the_subnet_converges(bed, tmp_path) -> None:
    """CrossSubnet; n2 moves from 198.18.2.0/24 into n0's and n1's subnet
    with a new address, and the files follow it: its route on n0 and n1 goes
    from the TUN to the underlay, via the new address, nothing is left of the
    old one, and every pair talks direct."""
    tunnels = running(bed, "CrossSubnet")
    try:
        converge(bed, tunnels, "CrossSubnet")
        n0, n1, n2 = bed.nodes
        old = n2.ip
        tunnels[2].stop()  # its address is in its config: it starts again with the new one
        bed.move_node(n2, 1)
        assert n2.ip == "198.18.1.12" and same_subnet(bed, n0, n2)
        tunnels[2] = TunnelProcess(bed, n2, config(bed, n2, "CrossSubnet"))
        tunnels[2].wait_ready()
        for node, t in zip(bed.nodes[:2], tunnels):
            t.reload(config(bed, node, "CrossSubnet"))
        converge(bed, tunnels, "CrossSubnet")  # all direct now: no next hops at all
        for node, t in zip(bed.nodes, tunnels):
            assert all(r.via != old for r in kernel_routes(bed, node, RTPROT_IPIPFAST))
            assert all(r["node"] != old for r in t.request("routes")["routes"])
        check_paths(bed, "CrossSubnet", tmp_path)
    finally:
        stop(tunnels)
