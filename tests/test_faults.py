"""Faults a node meets unattended: a peer whose MAC changes (a VM that
migrated, a bond that failed over) and a SIGTERM in the middle of traffic."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from scapy.layers.inet import IP
from scapy.layers.l2 import Ether

from ipipfast_lab import traffic
from ipipfast_lab.daemons import running_tunnels, wait_until
from ipipfast_lab.testbed import Testbed
from netns_helpers import Capture

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces, TUN and AF_PACKET")]
NEW_MAC = "02:00:5e:10:00:01"  # locally administered


def test_traffic_follows_a_peers_new_mac(tmp_path: Path) -> None:
    with Testbed(nodes=2, pods_per_node=1) as tb, running_tunnels(tb) as (t0, _):
        n0, n1 = tb.nodes
        a, b = n0.pods[0], n1.pods[0]
        assert traffic.ping(tb, a, b.ip, count=3, interval=0.01)["received"] == 3
        # The peer's underlay takes a new address and announces it with a
        # gratuitous ARP (arp_notify), as a migrated VM or a bond does.
        tb.sysctl(n1, f"net.ipv4.conf.{n1.interface}.arp_notify", "1")
        ipr = tb.ipr(n1)
        ipr.link("set", index=ipr.link_lookup(ifname=n1.interface)[0], address=NEW_MAC)
        wait_until(lambda: t0.status()["next_hops"] == {n1.ip: NEW_MAC}, what="the daemon taking the new MAC")
        kernel = tb.ipr(n0).get_neighbours(dst=n1.ip)  # the oracle: the node's own neighbour table
        assert [n.get_attr("NDA_LLADDR") for n in kernel] == [NEW_MAC]
        with Capture(tb, n1, tmp_path) as cap:
            assert traffic.ping(tb, a, b.ip, count=5, interval=0.01)["received"] == 5
        frames = [f for f in cap.ipip() if f[IP].src == n0.ip]
        assert len(frames) >= 5 and {f[Ether].dst for f in frames} == {NEW_MAC}
        assert f"next hop of {n1.ip}: {NEW_MAC}" in t0.log()
