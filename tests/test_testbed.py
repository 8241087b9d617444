"""The netns testbed itself: topology, Calico-style pod wiring, cleanup."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from pyroute2 import IPRoute, netns

from ipipfast import traffic
from ipipfast.testbed import BLACKHOLE_METRIC, POD_GATEWAY, Testbed

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces")]


def leftovers(prefix: str) -> list[str]:
    """Namespaces, and links in the root namespace, still carrying `prefix`."""
    with IPRoute() as ipr:
        links = [link.get("ifname") for link in ipr.get_links()]
    return [n for n in netns.listnetns() + links if n.startswith(prefix)]


@pytest.fixture(scope="module")
def tb() -> Iterator[Testbed]:
    with Testbed(nodes=2, pods_per_node=2) as bed:
        yield bed


def test_teardown_removes_everything_even_on_error() -> None:
    bed = Testbed()
    with pytest.raises(RuntimeError, match="boom"):
        with bed:
            assert sorted(leftovers(bed.prefix)) == sorted(bed.namespaces) and len(bed.namespaces) == 4
            sleeper = bed.popen(bed.nodes[0], [sys.executable, "-c", "import time; time.sleep(60)"])
            raise RuntimeError("boom")
    assert leftovers(bed.prefix) == []
    assert sleeper.poll() is not None
    bed.teardown()  # idempotent


def test_topology_and_node_config(tb: Testbed) -> None:
    n0, n1 = tb.nodes
    assert [n.ip for n in tb.nodes] == ["198.18.0.10", "198.18.0.11"]
    assert [p.ip for p in tb.pods] == ["198.19.0.2", "198.19.0.3", "198.19.1.2", "198.19.1.3"]
    assert all(p.host_veth.startswith("cali") and len(p.host_veth) <= 15 for p in tb.pods)
    assert tb.node_config(n1, mtu=1440) == {
        "node": {"ip": "198.18.0.11", "interface": n1.interface},
        "tunnel": {"name": f"{tb.prefix}t1", "mode": "Always", "mtu": 1440},
        "routes": [{"cidr": "198.19.0.0/24", "via": "198.18.0.10"}],
    }
    blackholes = [(r.get("dst"), r.get("priority")) for r in tb.ipr(n0).get_routes(type="blackhole")]
    assert blackholes == [("198.19.1.0", BLACKHOLE_METRIC)]
    host_veth = n0.pods[0].host_veth
    sysctl = lambda key: tb.run(n0, ["cat", f"/proc/sys/net/ipv4/{key}"]).stdout.strip()  # noqa: E731
    assert (sysctl("ip_forward"), sysctl(f"conf/{host_veth}/proxy_arp")) == ("1", "1")
    [eth0] = tb.ipr(n0.pods[0]).get_links(ifname="eth0")
    assert eth0.get("mtu") == 1480


def test_same_node_pods_ping(tb: Testbed) -> None:
    a, b = tb.nodes[0].pods
    result = traffic.ping(tb, a, b.ip, count=5)
    assert result["received"] == 5 and result["corrupt"] == 0


def test_pod_gateway_answered_by_proxy_arp(tb: Testbed) -> None:
    node, pod = tb.nodes[1], tb.nodes[1].pods[0]
    assert traffic.ping(tb, pod, node.ip, count=3)["received"] == 3  # routed via 169.254.1.1
    [neigh] = tb.ipr(pod).get_neighbours(dst=POD_GATEWAY)
    [host] = tb.ipr(node).get_links(ifname=pod.host_veth)
    assert neigh.get("lladdr") == host.get("address")


def test_cross_node_is_blackholed_without_routes(tb: Testbed) -> None:
    result = traffic.ping(tb, tb.nodes[0].pods[0], tb.nodes[1].pods[0].ip, count=3, timeout=0.3)
    assert result["sent"] == 3 and result["received"] == 0


def test_cross_node_with_plain_routes(tb: Testbed) -> None:
    src, dst = tb.nodes[0].pods[0], tb.nodes[1].pods[1]
    tb.add_plain_routes()
    try:
        assert traffic.ping(tb, src, dst.ip, count=5)["received"] == 5
        transfer = traffic.tcp_transfer(tb, src, dst, 20_000_000)
        assert transfer["match"] and transfer["received"]["bytes"] == 20_000_000
        udp = traffic.udp_roundtrip(tb, dst, src, count=10, size=1400)
        assert (udp["received"], udp["corrupt"], udp["echoed"]) == (10, 0, 10)
    finally:
        tb.remove_plain_routes()
    assert traffic.ping(tb, src, dst.ip, count=2, timeout=0.3)["received"] == 0


def test_three_nodes_on_a_bridge_wire_profile() -> None:
    with Testbed(nodes=3, profile="wire", pod_mtu=1400, gso_max_size=32768) as bed:
        n0, n1, n2 = bed.nodes
        bed.add_plain_routes()
        for src, dst in ((n0, n2), (n2, n1), (n1, n0)):
            assert traffic.ping(bed, src.pods[0], dst.pods[0].ip, count=3)["received"] == 3
        assert traffic.tcp_transfer(bed, n0.pods[0], n2.pods[0], 5_000_000)["match"]
        offloads = bed.run(n1, ["ethtool", "-k", n1.interface]).stdout
        for feature in ("tcp-segmentation-offload", "generic-segmentation-offload", "generic-receive-offload"):
            assert f"{feature}: off" in offloads
        [host] = bed.ipr(n0).get_links(ifname=n0.pods[0].host_veth)
        [eth0] = bed.ipr(n0.pods[0]).get_links(ifname="eth0")
        assert {link.get(k) for link in (host, eth0) for k in ("mtu", "gso_max_size")} == {1400, 32768}
    assert leftovers(bed.prefix) == []


def test_two_testbeds_do_not_collide() -> None:
    with Testbed() as one, Testbed() as two:
        assert one.prefix != two.prefix
        assert not set(one.namespaces) & set(two.namespaces)
        for bed in (one, two):
            bed.add_plain_routes()
            assert traffic.ping(bed, bed.nodes[0].pods[0], bed.nodes[1].pods[0].ip, count=3)["received"] == 3
    assert leftovers(one.prefix) == leftovers(two.prefix) == []


def test_atexit_tears_down_a_forgotten_testbed() -> None:
    code = "from ipipfast.testbed import Testbed; print(Testbed().setup().prefix)"
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    prefix = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            check=True, timeout=30).stdout.strip()
    assert prefix.startswith("ipf") and leftovers(prefix) == []
