"""The node's underlay found from its address: one config for every node of
a DaemonSet, each node's address from `run --node-ip` (status.hostIP)."""
from __future__ import annotations

import logging
import os
import sys
from ipaddress import IPv4Interface
from pathlib import Path

import pytest
import yaml

from ipipfast.config import NodeConfig
from ipipfast.routes import Mode
from ipipfast.underlay import UnderlayError, find_underlay
from ipipfast_lab import traffic
from ipipfast_lab.daemons import TunnelProcess
from ipipfast_lab.testbed import Testbed

BARE = NodeConfig(IPv4Interface("198.18.1.10"), prefixlen_given=False)


@pytest.mark.parametrize("node, holders, expected", [
    (BARE, [("eth0", 24)], NodeConfig(IPv4Interface("198.18.1.10/24"), "eth0")),
    (NodeConfig(IPv4Interface("198.18.1.10/26")), [("eth0", 24)], NodeConfig(IPv4Interface("198.18.1.10/26"), "eth0")),
    (NodeConfig(IPv4Interface("198.18.1.10"), "bond0", prefixlen_given=False), [("bond0", 25), ("dummy0", 32)],
     NodeConfig(IPv4Interface("198.18.1.10/25"), "bond0")),
    (NodeConfig(IPv4Interface("198.18.1.10/24"), "eth1"), [], NodeConfig(IPv4Interface("198.18.1.10/24"), "eth1")),
], ids=["found-with-its-prefix", "the-config-prefix-wins", "the-given-interface-of-two", "given-and-not-there"])
def test_the_underlay_is_found(node: NodeConfig, holders: list[tuple[str, int]], expected: NodeConfig) -> None:
    assert find_underlay(node, holders, Mode.CROSS_SUBNET) == expected


@pytest.mark.parametrize("holders, message", [
    ([], "no interface holds node.ip 198.18.1.10: give the node's own address, or node.interface"),
    ([("eth0", 24), ("eth1", 24)], "node.ip 198.18.1.10 is on eth0, eth1: say which is the underlay with node.interface"),
], ids=["nowhere", "on-two"])
def test_an_underlay_that_cannot_be_told_is_refused(holders: list[tuple[str, int]], message: str) -> None:
    with pytest.raises(UnderlayError) as e:
        find_underlay(BARE, holders, Mode.ALWAYS)
    assert str(e.value) == message


@pytest.mark.parametrize("mode, warned", [(Mode.CROSS_SUBNET, True), (Mode.ALWAYS, False)])
def test_a_prefix_not_found_stays_32(caplog: pytest.LogCaptureFixture, mode: Mode, warned: bool) -> None:
    node = NodeConfig(IPv4Interface("198.18.1.10"), "eth1", prefixlen_given=False)
    with caplog.at_level(logging.WARNING):
        found = find_underlay(node, [("eth0", 24)], mode)
    assert found.ip == IPv4Interface("198.18.1.10/32")
    assert ("so it is /32 and CrossSubnet encapsulates to every peer" in caplog.text) == warned


@pytest.mark.netns
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces, TUN and AF_PACKET")
def test_one_config_for_every_node_with_node_ip(tmp_path: Path) -> None:
    """CrossSubnet with no node section: each node's interface and subnet
    come from the address --node-ip gives it. (The routes differ per node
    here, as file routes must; a DaemonSet's come from the kernel.)"""
    with Testbed(nodes=3, underlay="routed", subnets=[1, 1, 2]) as tb:
        n0, n1, n2 = tb.nodes
        shared = {"tunnel": {"name": f"{tb.prefix}t", "mode": "CrossSubnet"}}
        tunnels = [TunnelProcess(tb, n, {**shared, "routes": [{"cidr": o.pod_cidr, "via": o.ip}
                                                              for o in tb.nodes if o is not n]},
                                 args=["--node-ip", n.ip]) for n in tb.nodes]
        try:
            for t in tunnels:
                t.wait_ready()
            routes = {r["cidr"]: (r["node"], r["kind"]) for r in tunnels[0].request("routes")["routes"]}
            assert routes == {n1.pod_cidr: (n1.ip, "direct"), n2.pod_cidr: (n2.ip, "encapsulated")}
            for dst in (n1, n2):
                assert traffic.ping(tb, n0.pods[0], dst.pods[0].ip, count=3, interval=0.01)["received"] == 3
        finally:
            for t in tunnels:
                t.stop()
        config = tmp_path / "shared.yaml"
        config.write_text(yaml.safe_dump(shared))
        r = tb.run(n0, [sys.executable, "-m", "ipipfast", "down", "--config", str(config), "--node-ip", n0.ip])
        assert f"the tc ingress and egress drops on {n0.interface}" in r.stdout, r.stdout
        assert not tb.ipr(n0).link_lookup(ifname=f"{tb.prefix}t")
