"""A pod that sends IPIP itself toward another node, masqueraded by its node
as Calico's natOutgoing does: the tc egress drop keeps it off the underlay
(captured there), counts it, and lets the tunnel's own frames by."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.packet import raw

from ipipfast import tc_drops
from ipipfast_lab import traffic
from ipipfast_lab.daemons import delta, running_tunnels
from ipipfast_lab.testbed import Node, Pod, Testbed
from netns_helpers import Capture

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces, TUN and AF_PACKET"),
    pytest.mark.skipif(shutil.which("nft") is None, reason="needs nft (Debian package nftables) to masquerade"),
]
MARKER = b"ipip from a pod"
SEND = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_IPIP)
for _ in range(int(sys.argv[3])):
    s.sendto(bytes.fromhex(sys.argv[2]), (sys.argv[1], 0))
"""


def masquerade_pods(tb: Testbed, node: Node, tmp: Path) -> None:
    """What Calico's natOutgoing puts on a node: pod sources leaving for
    anywhere outside the pod pool take the node's address."""
    rules = tmp / "nat.nft"
    rules.write_text(f"""table ip {tb.prefix}nat {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "{node.interface}" ip saddr 198.19.0.0/16 ip daddr != 198.19.0.0/16 masquerade
    }}
}}
""")
    tb.run(node, ["nft", "-f", str(rules)])


def send_ipip(tb: Testbed, pod: Pod, node: Node, target: Pod, count: int) -> None:
    """From pod, `count` IPIP packets to node's underlay address, each carrying
    a UDP datagram for target (what a hostile pod would slip past policy)."""
    inner = raw(IP(src=pod.ip, dst=target.ip) / UDP(sport=4444, dport=5555) / MARKER)
    tb.python(pod, "-c", SEND, node.ip, inner.hex(), str(count))


def from_pod(capture: Capture) -> list:
    """The pod's IPIP packets among the captured frames."""
    return [f for f in capture.ipip() if UDP in f[IP].payload and MARKER in raw(f[IP].payload)]


def answered(capture: Capture) -> list:
    """ICMP errors about the pod's inner datagrams, tunnelled back."""
    return [f for f in capture.ipip() if ICMP in f[IP].payload and MARKER in raw(f[IP].payload)]


def test_a_pods_ipip_never_leaves_the_node(tmp_path: Path) -> None:
    with Testbed(nodes=2, pods_per_node=1) as tb, running_tunnels(tb) as (t0, t1):
        n0, n1 = tb.nodes
        a, b = n0.pods[0], n1.pods[0]
        masquerade_pods(tb, n0, tmp_path)
        before0, before1 = t0.counters(), t1.counters()
        with Capture(tb, n0, tmp_path) as cap:
            send_ipip(tb, a, n1, b, count=5)
            ping = traffic.ping(tb, a, b.ip, count=5, interval=0.01)
            moved = t0.wait_counters(before0, {"foreign_ipip": 5})
        assert ping["received"] == 5  # the tunnel's own frames pass the drop
        assert moved["foreign_ipip"] == 5, moved
        assert from_pod(cap) == [] and answered(cap) == []
        tunnel = [f for f in cap.ipip() if f[IP].src == n0.ip]
        assert len(tunnel) >= 5 and all(f[IP].dst == n1.ip for f in tunnel)
        assert delta(before1, t1.counters()).get("rx_drop_unknown_peer", 0) == 0
        shown = tb.python(n0, "-m", "ipipfast", "show", "counters").stdout
        assert "tc egress: 5 IPIP packets not ipipfast's (pods') dropped" in shown, shown

        # Without the drop the attack is real: the masqueraded packet leaves
        # as the node's own, and the other node decapsulates it.
        idx = tb.ipr(n0).link_lookup(ifname=n0.interface)[0]
        tb.in_netns(n0, tc_drops.detach, idx)
        before1 = t1.counters()
        with Capture(tb, n0, tmp_path) as cap:
            send_ipip(tb, a, n1, b, count=3)
            moved = t1.wait_counters(before1, {"rx_packets": 3})
        leaked = from_pod(cap)
        assert len(leaked) == 3 and {(f[IP].src, f[IP].dst) for f in leaked} == {(n0.ip, n1.ip)}
        assert moved["rx_packets"] >= 3, moved
        # ...and delivers it: the target pod's kernel answers port unreachable
        # about it, back through the tunnel.
        assert answered(cap) and all(f[IP].src == n1.ip for f in answered(cap))

