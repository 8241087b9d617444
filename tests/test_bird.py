"""A real BIRD 2 on every node, as Calico runs it: an iBGP mesh over the
underlay, each node's pod CIDR written into the others' TUN (`via <node> dev
<tun> onlink proto bird`); ipipfast with `routes: []` forwards by those kernel
routes. The kernel's own routing table, read back over netlink, is the
oracle."""
from __future__ import annotations

import os
import shutil

import pytest

from ipipfast_lab.bird import KernelRoute, kernel_routes, running_birds, wait_kernel_routes
from ipipfast_lab.daemons import running_tunnels
from ipipfast_lab.testbed import Node, Testbed

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

