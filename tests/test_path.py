"""What tunl0 gets wrong, fixed: path MTU per peer, and ICMP errors about
outer packets relayed to the inner sender. Nodes in two subnets behind a
router whose hop toward them carries 1400 bytes."""
from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator

import pytest

from ipipfast_lab import traffic
from ipipfast.icmp import IcmpErrors, PMTU_EXPIRES
from ipipfast_lab.testbed import Testbed
from ipipfast_lab.daemons import TunnelProcess, running_tunnels, wait_until
from netns_helpers import Capture

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces, TUN and AF_PACKET")]

ROUTER_MTU = 1400
BIG = 1480 - 28          # ICMP payload of a full pod-MTU packet: outer 1500 > 1400
FITS = ROUTER_MTU - 20 - 28


@pytest.fixture
def routed() -> Iterator[tuple[Testbed, list[TunnelProcess]]]:
    with Testbed(nodes=2, pods_per_node=2, underlay="routed", router_mtu=ROUTER_MTU) as tb, \
            running_tunnels(tb) as tunnels:
        yield tb, tunnels


def test_path_mtu_is_learned_relayed_and_enforced(routed):
    tb, (ta, _) = routed
    n0, n1 = tb.nodes
    a1, a2, b = n0.pods[0], n0.pods[1], n1.pods[0]
    assert traffic.ping(tb, a1, b.ip, count=3, interval=0.01, size=FITS, df=True)["received"] == 3

    # The router refuses the 1500-byte outer packet; its "fragmentation
    # needed" reaches the node, which relays it to the pod with the MTU
    # that fits inside the tunnel.
    r = traffic.ping(tb, a1, b.ip, count=1, size=BIG, df=True)
    assert r["received"] == 0 and r["icmp_errors"] == {"3/4": 1}, r
    wait_until(lambda: ta.status()["path_mtu"] == {n1.ip: ROUTER_MTU}, what="the path MTU toward n1")
    c = ta.counters()
    assert c["pmtu_updates"] >= 1 and c["icmp_relayed"] >= 1

    # Another pod, which has learned nothing yet, is told by the datapath
    # itself before anything leaves the node (once: its kernel then knows).
    before = ta.counters()
    r = traffic.ping(tb, a2, b.ip, count=1, size=BIG, df=True)
    assert r["received"] == 0 and r["icmp_errors"] == {"3/4": 1}, r
    d = ta.wait_counters(before, {"tx_drop_too_big": 1, "icmp_sent": 1})
    assert (d["tx_drop_too_big"], d["icmp_sent"]) == (1, 1), d

    # Without DF the inner may be fragmented: it leaves whole with DF clear
    # and the router fragments it (tunl0's nopmtudisc does the same).
    assert traffic.ping(tb, a2, b.ip, count=2, interval=0.01, size=BIG)["received"] == 2


def test_tcp_finds_the_path_mtu_through_the_tunnel(routed):
    tb, _ = routed
    a, b = tb.nodes[0].pods[0], tb.nodes[1].pods[0]
    r = traffic.tcp_transfer(tb, a, b, 4 << 20, timeout=60)
    assert r["match"], r


def test_unreachable_peer_is_relayed(routed):
    tb, (ta, _) = routed
    n0, n1 = tb.nodes
    tb.router_unreachable(f"{n1.ip}/32")
    try:
        r = traffic.ping(tb, n0.pods[0], n1.pods[0].ip, count=3, interval=0.05)
        assert r["received"] == 0 and r["icmp_errors"] == {"3/1": 3}, r
    finally:
        tb.router_unreachable(f"{n1.ip}/32", remove=True)
    assert traffic.ping(tb, n0.pods[0], n1.pods[0].ip, count=2, interval=0.01)["received"] == 2


def test_ttl_exceeded_on_the_underlay_is_relayed(routed):
    # ttl inherit: the node forwards the pod's TTL 2 as 1 into the tunnel,
    # the outer header inherits it, and the router cannot forward it on.
    tb, _ = routed
    r = traffic.ping(tb, tb.nodes[0].pods[0], tb.nodes[1].pods[0].ip, count=2, interval=0.05, ttl=2)
    assert r["received"] == 0 and r["icmp_errors"] == {"11/0": 2}, r


class FakeDatapath:
    def __init__(self) -> None:
        self.pmtu: dict[str, int] = {}
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def sink_fileno(self) -> int:
        return self.sock.fileno()

    def set_peer_pmtu(self, peer: str, mtu: int) -> bool:
        self.pmtu[peer] = mtu
        return True

    def send_icmp_error(self, *args) -> bool:
        return True


def test_learned_mtu_expires(monkeypatch):
    from ipaddress import IPv4Address
    from scapy.layers.inet import IP, UDP
    from scapy.packet import raw
    node, peer = IPv4Address("198.18.1.10"), IPv4Address("198.18.2.10")
    dp = FakeDatapath()
    errors = IcmpErrors(dp, node)
    try:
        quote = raw(IP(src=str(node), dst=str(peer), proto=4) / IP(flags="DF") / UDP())
        now = [1000.0]
        monkeypatch.setattr(time, "monotonic", lambda: now[0])
        errors.handle(3, 4, 1400, quote)
        assert errors.pmtu(peer) == 1400 and dp.pmtu == {str(peer): 1400}
        now[0] += PMTU_EXPIRES - 1
        errors._expire()
        assert dp.pmtu[str(peer)] == 1400
        now[0] += 2
        errors._expire()
        assert errors.pmtu(peer) == 0 and dp.pmtu[str(peer)] == 0
    finally:
        errors.sock.close()
        dp.sock.close()


def test_cross_subnet_routes_same_subnet_peers_directly(tmp_path):
    """Calico's CrossSubnet: nodes 0 and 1 share a subnet and talk plainly;
    node 2 sits behind the router and is reached through the tunnel."""
    with Testbed(nodes=3, pods_per_node=1, underlay="routed", subnets=[1, 1, 2]) as tb, \
            running_tunnels(tb, mode="CrossSubnet") as (t0, _, _):
        n0, n1, n2 = tb.nodes
        assert t0.status()["routes_encapsulated"] == 1 and t0.status()["routes_direct"] == 1
        routes = {r["cidr"]: (r["node"], r["kind"], r["mac_state"]) for r in t0.request("routes")["routes"]}
        assert routes == {n1.pod_cidr: (n1.ip, "direct", "kernel"), n2.pod_cidr: (n2.ip, "encapsulated", "resolved")}
        before = t0.counters()
        with Capture(tb, n0, tmp_path) as cap:
            assert traffic.ping(tb, n0.pods[0], n1.pods[0].ip, count=5, interval=0.01)["received"] == 5
            assert traffic.ping(tb, n0.pods[0], n2.pods[0].ip, count=5, interval=0.01)["received"] == 5
        d = t0.wait_counters(before, {"tx_packets": 5, "rx_packets": 5})
        assert d["tx_packets"] == 5, d  # only node 2's pings took the tunnel
        ipip_peers = {f["IP"].dst for f in cap.ipip() if f["IP"].src == n0.ip}
        assert ipip_peers == {n2.ip}
        plain = [f for f in cap.frames if f.haslayer("ICMP") and f["IP"].dst == n1.pods[0].ip]
        assert len(plain) == 5  # to node 1's pod: on the wire as they are
