"""The netns testbed itself: topology, Calico-style pod wiring, cleanup."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from pyroute2 import IPRoute, netns

from ipipfast_lab import traffic
from ipipfast_lab.testbed import BLACKHOLE_METRIC, CONTROL_PLANE_IP, POD_GATEWAY, ROUTE_METRIC, NsRef, Testbed

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
        "node": {"ip": "198.18.0.11/24", "interface": n1.interface},  # the prefix: CrossSubnet needs it
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
    code = "from ipipfast_lab.testbed import Testbed; print(Testbed().setup().prefix)"
    prefix = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, timeout=30).stdout.strip()
    assert prefix.startswith("ipf") and leftovers(prefix) == []


# -- routed underlay -----------------------------------------------------------

# One ICMP echo with a chosen TTL (and DF without the cached path MTU: a second
# probe still reaches the hop that answered "fragmentation needed" the first
# time); prints the answer: the echo reply or an ICMP error quoting the echo.
PROBE = r"""
import json, os, select, socket, struct, sys, time
dst, ttl, size, df = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
def csum(b):
    t = sum(struct.unpack(f"!{len(b) // 2}H", b + b"\0" * (len(b) % 2)))
    t = (t & 0xFFFF) + (t >> 16)
    return ~(t + (t >> 16)) & 0xFFFF
ident, payload = os.getpid() & 0xFFFF, b"\xa5" * size
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
s.setsockopt(socket.IPPROTO_IP, 10, 3 if df else 0)  # IP_MTU_DISCOVER: IP_PMTUDISC_PROBE / _DONT
head = struct.pack("!BBHHH", 8, 0, 0, ident, 1)
s.sendto(head[:2] + struct.pack("!H", csum(head + payload)) + head[4:] + payload, (dst, 0))
deadline = time.monotonic() + 2
while select.select([s], [], [], max(0, deadline - time.monotonic()))[0]:
    ip = s.recv(65535)
    icmp = ip[(ip[0] & 0xF) * 4:]
    inner = icmp[8:]
    quoted = inner[(inner[0] & 0xF) * 4:] if icmp[0] != 0 and inner else b""
    if (icmp[0] == 0 and struct.unpack("!H", icmp[4:6])[0] == ident
            or quoted[:1] == b"\x08" and struct.unpack("!H", quoted[4:6])[0] == ident):
        print(json.dumps({"type": icmp[0], "code": icmp[1], "src": socket.inet_ntoa(ip[12:16]), "ttl": ip[8],
                          "mtu": struct.unpack("!H", icmp[6:8])[0] if icmp[:2] == b"\x03\x04" else None}))
        break
else:
    print("null")
"""


def probe(tb: Testbed, ns: NsRef, dst: str, ttl: int = 64, size: int = 56, df: bool = False) -> dict | None:
    out = tb.python(ns, "-c", PROBE, dst, str(ttl), str(size), "1" if df else "0", timeout=10).stdout
    return json.loads(out)


def forwarded(tb: Testbed) -> int:
    """Packets the router has forwarded (Ip: ForwDatagrams)."""
    head, values = [line.split() for line in tb.run(tb.router, ["cat", "/proc/net/snmp"]).stdout.splitlines()
                    if line.startswith("Ip:")]
    return int(values[head.index("ForwDatagrams")])


def gateways(tb: Testbed, ns: NsRef) -> dict[str, tuple[str, int]]:
    """dst/len -> (gateway, metric) of the unicast routes with a gateway."""
    return {f"{r.get('dst')}/{r['dst_len']}": (r.get("gateway"), r.get("priority")) for r in tb.ipr(ns).get_routes()
            if r.get("gateway") and r["dst_len"] and r["type"] == 1}


def test_control_plane_host() -> None:
    with Testbed(nodes=2, control_plane=True) as bed:
        cp = bed.control_plane
        assert cp == f"{bed.prefix}-cp" and sorted(leftovers(bed.prefix)) == sorted(bed.namespaces)
        addrs = [a.get_attr("IFA_ADDRESS") for a in bed.ipr(cp).get_addr(label=f"{bed.prefix}cp")]
        assert addrs == [CONTROL_PLANE_IP]
        for node in bed.nodes:  # on the nodes' own subnet, through the bridge
            assert traffic.ping(bed, node, CONTROL_PLANE_IP, count=3)["received"] == 3
        assert traffic.ping(bed, bed.nodes[0], bed.nodes[1].ip, count=3)["received"] == 3
        bed.control_plane_link(False)
        assert traffic.ping(bed, bed.nodes[0], CONTROL_PLANE_IP, count=3, timeout=0.3)["received"] == 0
        bed.control_plane_link(True)
        assert traffic.ping(bed, bed.nodes[0], CONTROL_PLANE_IP, count=3)["received"] == 3
    assert leftovers(bed.prefix) == [] and bed.control_plane is None


@pytest.fixture(scope="module")
def routed() -> Iterator[Testbed]:
    with Testbed(nodes=2, underlay="routed", router_mtu=1400, pod_mtu=1500) as bed:
        yield bed


def test_bad_underlay_arguments() -> None:
    for kw in ({"underlay": "l3"}, {"router_mtu": 1400}, {"subnets": [1, 2]},
               {"underlay": "routed", "router_mtu": 1600}, {"underlay": "routed", "subnets": [1]},
               {"underlay": "routed", "subnets": [1, 256]}, {"underlay": "routed", "control_plane": True}):
        with pytest.raises(ValueError):
            Testbed(**kw)


def test_routed_topology(routed: Testbed) -> None:
    n0, n1 = routed.nodes
    assert [(n.ip, n.prefixlen, n.gateway) for n in routed.nodes] == [
        ("198.18.1.10", 24, "198.18.1.1"), ("198.18.2.10", 24, "198.18.2.1")]
    assert routed.router == f"{routed.prefix}-rt" and routed.router in routed.namespaces
    assert routed.router_links == {1: f"{routed.prefix}r1", 2: f"{routed.prefix}r2"}
    sysctl = lambda key: routed.run(routed.router, ["cat", f"/proc/sys/net/ipv4/{key}"]).stdout.strip()  # noqa: E731
    assert (sysctl("ip_forward"), sysctl("icmp_ratelimit")) == ("1", "0")
    # Unchanged for the daemon: tunnel to the other node's address.
    assert routed.node_config(n0)["routes"] == [{"cidr": "198.19.1.0/24", "via": "198.18.2.10"}]
    assert gateways(routed, n0) == {}  # only the default route has a gateway
    assert [r.get("gateway") for r in routed.ipr(n0).get_routes(dst_len=0, type=1)] == ["198.18.1.1"]
    blackholes = [(r.get("dst"), r.get("priority")) for r in routed.ipr(n1).get_routes(type="blackhole")]
    assert blackholes == [("198.19.0.0", BLACKHOLE_METRIC)]
    assert traffic.ping(routed, n0, n1.ip, count=5)["received"] == 5
    assert probe(routed, n1, n0.ip)["ttl"] == 63  # the reply crossed one router
    # The pod gateway still works with the node's default route via the router.
    assert traffic.ping(routed, n0.pods[0], n0.ip, count=2)["received"] == 2


def test_routed_plain_routes_via_the_router(routed: Testbed) -> None:
    (n0, _), src, dst = routed.nodes, routed.nodes[0].pods[0], routed.nodes[1].pods[0]
    assert traffic.ping(routed, src, dst.ip, count=2, timeout=0.3)["received"] == 0
    routed.add_plain_routes()
    try:
        routed.add_plain_routes()  # idempotent
        assert gateways(routed, n0) == {"198.19.1.0/24": ("198.18.1.1", ROUTE_METRIC)}
        assert gateways(routed, routed.router) == {"198.19.0.0/24": ("198.18.1.10", ROUTE_METRIC),
                                                   "198.19.1.0/24": ("198.18.2.10", ROUTE_METRIC)}
        before = forwarded(routed)
        assert traffic.ping(routed, src, dst.ip, count=5)["received"] == 5
        assert forwarded(routed) - before == 10
        # 1500-byte pods, a 1400-byte hop: TCP gets through by path-MTU discovery.
        assert traffic.tcp_transfer(routed, src, dst, 2_000_000)["match"]
    finally:
        routed.remove_plain_routes()
    assert gateways(routed, n0) == gateways(routed, routed.router) == {}
    assert traffic.ping(routed, src, dst.ip, count=2, timeout=0.3)["received"] == 0


def test_routed_icmp_errors(routed: Testbed) -> None:
    (n0, n1), rt0 = routed.nodes, routed.nodes[0].gateway
    # n1's pod towards n0's: no earlier test cached a path MTU in this direction.
    src, dst = n1.pods[0], n0.pods[0]
    routed.add_plain_routes()
    try:
        assert traffic.ping(routed, src, dst.ip, count=1, size=1372, df=True)["received"] == 1
        result = traffic.ping(routed, src, dst.ip, count=1, size=1472, df=True)
        assert (result["icmp_errors"], result["send_errors"], result["received"]) == ({"3/4": 1}, {}, 0)
        # The pod's kernel took the next-hop MTU from the error...
        [cached] = routed.ipr(src).route("get", dst=dst.ip)
        assert dict(cached.get("metrics").get("attrs"))["RTAX_MTU"] == 1400
        # ...which the router, n1's gateway, sent with MTU 1400.
        assert probe(routed, src, dst.ip, size=1472, df=True) == {
            "type": 3, "code": 4, "src": n1.gateway, "ttl": 63, "mtu": 1400}
        assert probe(routed, n0, n1.ip, ttl=1) == {"type": 11, "code": 0, "src": rt0, "ttl": 64, "mtu": None}
        routed.router_unreachable("198.18.250.0/24")
        try:  # every packet answered: no rate limit
            result = traffic.ping(routed, n0.pods[0], "198.18.250.9", count=20, interval=0.002, timeout=0.5)
            assert result["icmp_errors"] == {"3/1": 20}
            assert probe(routed, n0, "198.18.250.9")["src"] == rt0
        finally:
            routed.router_unreachable("198.18.250.0/24", remove=True)
        assert traffic.ping(routed, n0, "198.18.250.9", count=1)["icmp_errors"] == {"3/0": 1}  # no route now
    finally:
        routed.remove_plain_routes()


def test_routed_shared_subnet_wire_profile() -> None:
    with Testbed(nodes=3, underlay="routed", subnets=[1, 1, 2], profile="wire") as bed:
        (n0, n1, n2), p = bed.nodes, bed.prefix
        assert [(n.ip, n.gateway) for n in bed.nodes] == [
            ("198.18.1.10", "198.18.1.1"), ("198.18.1.11", "198.18.1.1"), ("198.18.2.10", "198.18.2.1")]
        # Subnet 1 is a bridge in the router namespace; subnet 2 a plain veth.
        rt = bed.ipr(bed.router)
        [bridge] = rt.get_links(ifname=f"{p}r1")
        ports = sorted(link.get("ifname") for link in rt.get_links() if link.get("master") == bridge["index"])
        assert ports == [f"{p}b0", f"{p}b1"]
        assert probe(bed, n0, n1.ip)["ttl"] == 64  # direct, on the shared subnet
        assert probe(bed, n0, n2.ip)["ttl"] == 63  # through the router
        bed.add_plain_routes()
        assert gateways(bed, n0) == {"198.19.1.0/24": (n1.ip, ROUTE_METRIC),  # same subnet: direct
                                     "198.19.2.0/24": ("198.18.1.1", ROUTE_METRIC)}  # via the router
        before = forwarded(bed)
        assert traffic.ping(bed, n0.pods[0], n1.pods[0].ip, count=5)["received"] == 5
        assert forwarded(bed) == before  # the router stayed out of it
        for src, dst in ((n0, n2), (n2, n1)):
            assert traffic.ping(bed, src.pods[0], dst.pods[0].ip, count=5)["received"] == 5
        assert forwarded(bed) - before == 20
        for ns, links in ((n1, [n1.interface]), (bed.router, [f"{p}r1", f"{p}b0", f"{p}b1", f"{p}r2"])):
            for link in links:
                offloads = bed.run(ns, ["ethtool", "-k", link]).stdout
                for feature in ("tcp-segmentation-offload", "generic-segmentation-offload", "generic-receive-offload"):
                    assert f"{feature}: off" in offloads, (link, feature)
    assert leftovers(bed.prefix) == []
