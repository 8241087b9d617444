"""A real BIRD 2 on every node, as Calico runs it: an iBGP mesh over the
underlay, each node's pod CIDR written into the others' TUN (`via <node> dev
<tun> onlink proto bird`); ipipfast with `routes: []` forwards by those kernel
routes. The kernel's own routing table, read back over netlink, and frames on
the underlay parsed by scapy are the oracles."""
from __future__ import annotations

import os
import shutil

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from ipipfast_lab import traffic
from ipipfast_lab.bird import KernelRoute, kernel_routes, running_birds, wait_kernel_routes
from ipipfast_lab.daemons import delta, running_tunnels
from ipipfast_lab.testbed import Node, Testbed
from netns_helpers import Capture

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces, TUN and AF_PACKET"),
              pytest.mark.skipif(not shutil.which("bird"), reason="needs BIRD 2 (Debian: bird2)")]


def tunnel(peer: Node, tun: str) -> KernelRoute:
    """Calico's form for a peer's block: via the peer, into the tunnel, on-link."""
    return KernelRoute(peer.pod_cidr, via=peer.ip, dev=tun, onlink=True)


def own(node: Node) -> KernelRoute:
    """The node's own block, from the blackhole BIRD originates it from."""
    return KernelRoute(node.pod_cidr, "blackhole")


def full_mesh(tb: Testbed, tuns: list[str]) -> dict[int, set[KernelRoute]]:
    """Each node's bird routes with every session up, by node index."""
    return {n.index: {own(n)} | {tunnel(p, tuns[n.index]) for p in tb.nodes if p is not n} for n in tb.nodes}


def test_bird_writes_every_block_into_the_tun_and_follows_the_session():
    """Three nodes: each BIRD writes the other two blocks into its TUN; one
    session shut down withdraws exactly the two routes it carried, on both of
    its ends, and brought back restores them."""
    with (Testbed(nodes=3) as tb, running_tunnels(tb, file_routes=False) as tunnels,
          running_birds(tb, tunnels) as birds):
        n0, n1, n2 = tb.nodes
        tuns = [t.status()["tunnel"] for t in tunnels]
        mesh = full_mesh(tb, tuns)
        for n in tb.nodes:
            wait_kernel_routes(tb, n, mesh[n.index])

        birds[0].disable(n1)
        wait_kernel_routes(tb, n0, mesh[0] - {tunnel(n1, tuns[0])})
        wait_kernel_routes(tb, n1, mesh[1] - {tunnel(n0, tuns[1])})
        assert kernel_routes(tb, n2) == mesh[2]
        assert birds[0].bgp_state(n1) == "Down" and birds[0].bgp_state(n2) == "Established"

        birds[0].enable(n1)
        for b in birds:
            b.wait_established()
        for n in tb.nodes:
            wait_kernel_routes(tb, n, mesh[n.index])


def test_crosssubnet_leaves_peers_of_the_subnet_on_the_underlay():
    """Calico's CrossSubnet: a peer in the node's subnet is routed to on the
    underlay (`via <peer> dev <underlay>`), one behind the router into the TUN;
    the sessions across the router are multihop."""
    with (Testbed(nodes=3, underlay="routed", subnets=[1, 1, 2]) as tb,
          running_tunnels(tb, file_routes=False, mode="CrossSubnet") as tunnels,
          running_birds(tb, tunnels, mode="CrossSubnet")):
        n0, n1, n2 = tb.nodes
        t0, t1, t2 = (t.status()["tunnel"] for t in tunnels)
        wait_kernel_routes(tb, n0, {own(n0), KernelRoute(n1.pod_cidr, via=n1.ip, dev=n0.interface), tunnel(n2, t0)})
        wait_kernel_routes(tb, n1, {own(n1), KernelRoute(n0.pod_cidr, via=n0.ip, dev=n1.interface), tunnel(n2, t1)})
        wait_kernel_routes(tb, n2, {own(n2), tunnel(n0, t2), tunnel(n1, t2)})


def _carries(frame: Ether, ip: str) -> bool:
    """Whether any IP header in the frame (outer or inner) is addressed to ip."""
    layer, n = frame.getlayer(IP), 1
    while layer is not None:
        if layer.dst == ip:
            return True
        n += 1
        layer = frame.getlayer(IP, nb=n)
    return False


def test_pod_traffic_follows_the_bgp_session(tmp_path):
    """Pods talk over the routes BIRD wrote (IPIP node to node on the wire);
    the session shut down, the routes go and the testbed's blackhole drops the
    traffic (nothing onto plain routing, nothing into the TUN); the session
    back, traffic resumes."""
    with (Testbed(nodes=2) as tb, running_tunnels(tb, file_routes=False) as tunnels,
          running_birds(tb, tunnels) as (bird0, bird1)):
        n0, n1 = tb.nodes
        a, b = n0.pods[0], n1.pods[0]
        ta = tunnels[0]
        tuns = [t.status()["tunnel"] for t in tunnels]
        mesh = full_mesh(tb, tuns)
        for n in tb.nodes:
            wait_kernel_routes(tb, n, mesh[n.index])

        with Capture(tb, n1, tmp_path) as cap:
            r = traffic.udp_roundtrip(tb, a, b, count=10, size=100)
        assert r["received"] == 10 and r["corrupt"] == 0, (r, *({k: v for k, v in t.counters().items() if v}
                                                                for t in tunnels))
        frames = cap.ipip()
        requests = [f for f in frames if (f[IP].src, f[IP].dst) == (n0.ip, n1.ip)]
        replies = [f for f in frames if (f[IP].src, f[IP].dst) == (n1.ip, n0.ip)]
        assert len(requests) == len(replies) == 10
        for f, (src, dst) in [(f, (a.ip, b.ip)) for f in requests] + [(f, (b.ip, a.ip)) for f in replies]:
            inner = f[IP].payload
            assert isinstance(inner, IP) and (inner.src, inner.dst) == (src, dst) and UDP in inner

        bird0.disable(n1)
        wait_kernel_routes(tb, n0, {own(n0)})
        wait_kernel_routes(tb, n1, {own(n1)})
        routes = [r for r in tb.ipr(n0).get_routes(family=2)
                  if f"{r.get_attr('RTA_DST')}/{r['dst_len']}" == n1.pod_cidr]
        assert [r["type"] for r in routes] == [6]  # RTN_BLACKHOLE alone: the testbed's
        before = ta.counters()
        with Capture(tb, n0, tmp_path) as cap:
            r = traffic.ping(tb, a, b.ip, count=5, interval=0.01, timeout=0.3)
        assert r["received"] == 0 and not r["icmp_errors"], r
        assert not [f for f in cap.frames if _carries(f, b.ip)], "traffic leaked onto the underlay"
        assert "tx_packets" not in delta(before, ta.counters())  # nor into the TUN

        bird0.enable(n1)
        bird0.wait_established()
        for n in tb.nodes:
            wait_kernel_routes(tb, n, mesh[n.index])
        assert traffic.ping(tb, a, b.ip, count=5, interval=0.01)["received"] == 5
        assert traffic.ping(tb, b, a.ip, count=5, interval=0.01)["received"] == 5
