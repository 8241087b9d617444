"""MTUs that change while the daemon runs: the underlay's (the largest outer
packet, followed by the datapath), and the TUN's (the inner MTU, which felix
sets on tunl0 and ipipfast takes as it is), and the tunnel address felix puts
on the TUN, which no start, reload or restart of the daemon removes."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from scapy.layers.inet import ICMP, IP, IPerror

from ipipfast_lab import traffic
from ipipfast_lab.daemons import TunnelProcess, running_tunnels, wait_until
from ipipfast_lab.testbed import Node, Testbed
from netns_helpers import Capture

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces, TUN and AF_PACKET")]

FULL = 1480 - 28  # ICMP payload of a pod-MTU packet: 1500 bytes outer
LOWER = 1400


def _set_mtu(tb: Testbed, node: Node, ifname: str, mtu: int) -> None:
    tb.ipr(node).link("set", index=tb.ipr(node).link_lookup(ifname=ifname)[0], mtu=mtu)


def _mtus(t: TunnelProcess, **want: int) -> dict:
    """The daemon's status once its mtu section says what `want` does."""
    return t.wait_for(lambda s: all(s["mtu"][k] == v for k, v in want.items()))


def test_the_underlay_mtu_is_followed_while_running(tmp_path: Path) -> None:
    with Testbed(nodes=2, pods_per_node=2) as tb, running_tunnels(tb) as (t0, _):
        n0, n1 = tb.nodes
        a, a2, b = n0.pods[0], n0.pods[1], n1.pods[0]
        assert _mtus(t0)["mtu"] == {"tun": 1480, "underlay": 1500, "outer": 1500}
        assert traffic.ping(tb, a, b.ip, count=2, interval=0.01, size=FULL, df=True)["received"] == 2

        _set_mtu(tb, n0, n0.interface, LOWER)
        _mtus(t0, underlay=LOWER, outer=LOWER)
        # The TUN still takes 1480 bytes (its MTU is felix's to set): a full
        # packet with DF is answered with the MTU that fits in the tunnel now.
        before = t0.counters()
        with Capture(tb, a, tmp_path) as cap:
            r = traffic.ping(tb, a, b.ip, count=1, size=FULL, df=True)
        assert r["received"] == 0 and r["icmp_errors"] == {"3/4": 1}, r
        [err] = [f for f in cap.icmp_errors() if f[ICMP].code == 4]
        assert (err[IP].src, err[IP].dst, err[ICMP].nexthopmtu) == (n0.ip, a.ip, LOWER - 20)
        assert (err[IPerror].src, err[IPerror].dst, err[IPerror].len) == (a.ip, b.ip, 1480)
        # Without DF it cannot leave whole either: counted, not sent to be dropped by the device.
        assert traffic.ping(tb, a2, b.ip, count=2, interval=0.01, size=FULL)["received"] == 0
        d = t0.wait_counters(before, {"tx_drop_too_big": 3})
        assert (d.get("tx_drop_too_big"), d.get("icmp_sent"), d.get("tx_packets", 0)) == (3, 1, 0), d
        # What fits still flows.
        fits = LOWER - 20 - 28
        assert traffic.ping(tb, a2, b.ip, count=2, interval=0.01, size=fits, df=True)["received"] == 2

        _set_mtu(tb, n0, n0.interface, 1500)
        _mtus(t0, underlay=1500, outer=1500)
        # a2 learned no path MTU (its packets had no DF): full packets pass again, with DF or without.
        assert traffic.ping(tb, a2, b.ip, count=2, interval=0.01, size=FULL, df=True)["received"] == 2
        assert traffic.ping(tb, a2, b.ip, count=2, interval=0.01, size=FULL)["received"] == 2

        # A raise past what the rings' slots hold (sized for 1500 at start) stops there, and says so.
        _set_mtu(tb, n0, n0.interface, 9000)
        outer = t0.wait_for(lambda s: s["mtu"]["underlay"] == 9000)["mtu"]["outer"]
        assert 1500 < outer < 9000
        wait_until(lambda: f"sends outer packets up to {outer} bytes only" in t0.log(), what="the clamp's log line")
        assert traffic.ping(tb, a2, b.ip, count=2, interval=0.01, size=FULL, df=True)["received"] == 2


def _tun(tb: Testbed, node: Node) -> dict:
    """The TUN's MTU and IPv4 addresses, as the kernel has them."""
    ipr = tb.ipr(node)
    index = ipr.link_lookup(ifname=f"{tb.prefix}t{node.index}")[0]
    return {"mtu": ipr.get_links(index)[0].get_attr("IFLA_MTU"),
            "addresses": sorted(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"
                                for a in ipr.get_addr(family=2, index=index))}


def test_the_tun_mtu_and_address_are_left_as_others_set_them() -> None:
    with Testbed(nodes=2) as tb:
        n0, n1 = tb.nodes
        a, b = n0.pods[0], n1.pods[0]
        config = tb.node_config(n0)
        t1 = TunnelProcess(tb, n1, tb.node_config(n1))
        t0 = TunnelProcess(tb, n0, config)
        try:
            t1.wait_ready()
            t0.wait_ready()
            assert t0.stop() == 0
            # As felix does to tunl0: the node's tunnel address, as its only /32.
            address = f"198.19.{n0.index}.1/32"
            index = tb.ipr(n0).link_lookup(ifname=f"{tb.prefix}t0")[0]
            tb.ipr(n0).addr("add", index=index, address=address.split("/")[0], prefixlen=32)
            felix = {"mtu": 1480, "addresses": [address]}
            assert _tun(tb, n0) == felix

            t0 = TunnelProcess(tb, n0, config)  # attaches to the device as it is
            t0.wait_ready()
            assert _tun(tb, n0) == felix
            tb.ipr(n0).link("set", index=index, mtu=LOWER)  # felix's new MTU, while running
            felix["mtu"] = LOWER
            assert _mtus(t0, tun=LOWER)["mtu"] == {"tun": LOWER, "underlay": 1500, "outer": 1500}
            assert f"{tb.prefix}t0: MTU 1480 -> {LOWER}" in t0.log()

            assert t0.reload(yaml.safe_dump(config) + "# edited\n")["reloads"]["applied"] == 1
            assert _tun(tb, n0) == felix
            assert traffic.ping(tb, a, b.ip, count=3, interval=0.01)["received"] == 3

            assert t0.stop() == 0
            t0 = TunnelProcess(tb, n0, config)
            t0.wait_ready()
            assert _tun(tb, n0) == felix and t0.status()["mtu"]["tun"] == LOWER
            assert traffic.ping(tb, a, b.ip, count=3, interval=0.01)["received"] == 3
        finally:
            t0.stop()
            t1.stop()
