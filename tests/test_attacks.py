"""Attacks on a running node, with real frames injected on the underlay from
another namespace: each is dropped and counted by reason, and captures show
that nothing of it got through. What the kernel's tunl0 does with the same
frames is in test_interop.py."""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from ipaddress import IPv4Network
from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import Dot1Q, Ether
from scapy.packet import Raw, raw

from ipipfast import tc_drops
from ipipfast_lab import traffic
from ipipfast_lab.daemons import TunnelProcess, delta, flat_counters, running_tunnels, wait_until
from ipipfast_lab.testbed import Node, Pod, Testbed
from netns_helpers import Capture, inject, ipip_frame, node_mac, route_into_tun_only

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces, TUN and AF_PACKET")]


@pytest.fixture(scope="module")
def bed() -> Iterator[tuple[Testbed, list[TunnelProcess]]]:
    """Three nodes on one bridge, so that a frame can name a node that
    neither sent nor receives it."""
    with Testbed(nodes=3, pods_per_node=1) as tb, running_tunnels(tb) as tunnels:
        yield tb, tunnels


def echo(src: str, dst: str, marker: bytes) -> bytes:
    return raw(IP(src=src, dst=dst) / ICMP(id=0x4141, seq=1) / Raw(marker))


def marked(frames: list, marker: bytes) -> list:
    return [f for f in frames if marker in raw(f)]


def tun_capture(tb: Testbed, tunnel: TunnelProcess, tmp: Path) -> Capture:
    """What the datapath writes to the node's TUN (and what the node routes into it)."""
    return Capture(tb, tunnel.node, tmp, iface=tunnel.status()["tunnel"], layer=IP)


def test_frames_for_another_host_are_dropped(bed, tmp_path):
    """The receive ring's taps see frames that the node's kernel would not
    take as its own (ip_rcv drops another host's, and one on a VLAN the node
    does not have): a peer's IPIP to our address, but to another MAC, to a
    broadcast or multicast MAC, or on VLAN 5, is dropped as other_host. A
    priority tag (VLAN 0) is the host's, as for the kernel."""
    tb, (t0, _, _) = bed
    n0, n1, _ = tb.nodes
    pod, far = n0.pods[0], n1.pods[0]
    ours, theirs = node_mac(tb, n0).hex(":"), node_mac(tb, n1).hex(":")

    def ip(marker: bytes) -> Raw:
        return Raw(ipip_frame(tb, n1, n0, echo(far.ip, pod.ip, marker))[14:])
    bad = {
        b"another host": raw(Ether(src=theirs, dst="02:00:5e:00:53:01", type=0x0800) / ip(b"another host")),
        b"broadcast": raw(Ether(src=theirs, dst="ff:ff:ff:ff:ff:ff", type=0x0800) / ip(b"broadcast")),
        b"multicast": raw(Ether(src=theirs, dst="01:00:5e:00:00:01", type=0x0800) / ip(b"multicast")),
        b"vlan 5": raw(Ether(src=theirs, dst=ours) / Dot1Q(vlan=5, type=0x0800) / ip(b"vlan 5")),
    }
    tagged = raw(Ether(src=theirs, dst=ours) / Dot1Q(vlan=0, prio=5, type=0x0800) / ip(b"vlan 0"))
    before = t0.counters()
    with Capture(tb, pod, tmp_path) as cap:
        inject(tb, n1, [*bad.values(), tagged])
        d = t0.wait_counters(before, {"rx_drop_other_host": 4, "rx_packets": 1, "tx_packets": 1})
    assert d["rx_drop_other_host"] == 4 and d["rx_packets"] == 1, d
    assert d["ring_seen"] == d["ring_taken"] == 5, d
    for marker in bad:
        assert not marked(cap.frames, marker), marker
    assert [f[ICMP].type for f in marked(cap.frames, b"vlan 0")] == [8, 0]  # the pod got it and answered


def test_nested_ipip_and_inner_packets_to_node_addresses_are_dropped(bed, tmp_path):
    """A peer's IPIP whose inner packet is IPIP again, or is addressed to a
    node's underlay address: tunl0 would take the nested one apart again
    (or forward it as the node's own IPIP), deliver one to its own address
    to the node's stack, and forward one to another node's address out of
    the underlay as if the node had sent it. No Calico peer sends these
    (its pods' IPIP is dropped, and a pod reaches a node's address without
    the tunnel): each is dropped by reason, none reaches the TUN or another
    node. A plain echo to the pod goes last, so that all were taken before it."""
    tb, (t0, _, _) = bed
    n0, n1, n2 = tb.nodes
    pod, far = n0.pods[0], n1.pods[0]
    cases = {
        "rx_drop_inner_ipip": [
            raw(IP(src=far.ip, dst=n0.ip, proto=4) / Raw(echo(far.ip, pod.ip, b"nested to this node"))),
            raw(IP(src=far.ip, dst=n2.ip, proto=4) / Raw(echo(far.ip, n2.pods[0].ip, b"nested to n2"))),
        ],
        "rx_drop_inner_to_local": [raw(IP(src=far.ip, dst=n0.ip) / UDP(sport=9, dport=9) / Raw(b"to this node"))],
        "rx_drop_inner_to_peer": [
            raw(IP(src=far.ip, dst=n2.ip) / UDP(sport=9, dport=9) / Raw(b"to n2")),
            raw(IP(src=far.ip, dst=n1.ip) / UDP(sport=9, dport=9) / Raw(b"to the sender")),
        ],
    }
    markers = [b"nested to this node", b"nested to n2", b"to this node", b"to n2", b"to the sender"]
    before = t0.counters()
    with tun_capture(tb, t0, tmp_path) as tun, Capture(tb, n2, tmp_path) as other:
        inject(tb, n1, [ipip_frame(tb, n1, n0, p) for ps in cases.values() for p in ps]
               + [ipip_frame(tb, n1, n0, echo(far.ip, pod.ip, b"last"))])
        d = t0.wait_counters(before, {**{k: len(v) for k, v in cases.items()}, "rx_packets": 1})
    for counter, packets in cases.items():
        assert d.get(counter) == len(packets), (counter, d)
    assert d["rx_packets"] == 1 and d["ring_taken"] == 6, d
    assert marked(tun.frames, b"last"), "the echo after them was not written to the TUN"
    for marker in markers:
        assert not marked(tun.frames, marker) and not marked(other.frames, marker), marker


def test_ipip_from_a_peer_whose_mac_is_unresolved_is_dropped(bed, tmp_path):
    """A peer whose next-hop MAC the node has not resolved (here: one that
    does not answer ARP) has nothing to check its frames' source against:
    they are dropped (no_neigh), as what the node would send it is."""
    tb, (t0, _, _) = bed
    n0, n1, _ = tb.nodes
    absent = "198.18.0.50"
    config = tb.node_config(n0)
    t0.reload({**config, "routes": [*config["routes"], {"cidr": "198.19.50.0/24", "via": absent}]})
    try:
        assert t0.status()["next_hops"][absent] is None
        before = t0.counters()
        with Capture(tb, n0.pods[0], tmp_path) as cap:
            inject(tb, n1, [ipip_frame(tb, n1, n0, echo("198.19.50.2", n0.pods[0].ip, b"unresolved"), src=absent)])
            d = t0.wait_counters(before, {"rx_drop_no_neigh": 1})
        assert d == {"rx_drop_no_neigh": 1, "ring_seen": 1, "ring_taken": 1}, d
        assert not marked(cap.frames, b"unresolved")
    finally:
        t0.reload(config)


SPOOF = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)  # IP_HDRINCL: any source address
s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, int(sys.argv[2]))  # past this node's tc egress drop
s.sendto(bytes.fromhex(sys.argv[1]), (socket.inet_ntoa(bytes.fromhex(sys.argv[1])[16:20]), 0))
"""


def send_spoofed(tb: Testbed, node: Node, packet: bytes) -> None:
    """Sends an IPv4 packet as built (its source address whatever it says)
    from node, routed by its destination."""
    tb.python(node, "-c", SPOOF, packet.hex(), str(tc_drops.MARK))


def spoofed(tb: Testbed, victim: Node, on_link: Node, routed: Node, pod: Pod) -> None:
    """IPIP to victim claiming the address of on_link (a node on victim's
    link) sent from routed's link, and claiming routed's sent from
    on_link's: each an echo to victim's pod, as from the claimed node's pod."""
    send_spoofed(tb, routed, raw(IP(src=on_link.ip, dst=victim.ip, proto=4)
                                 / Raw(echo(on_link.pods[0].ip, pod.ip, b"as the on-link node"))))
    inject(tb, on_link, [ipip_frame(tb, on_link, victim, echo(routed.pods[0].ip, pod.ip, b"as the routed node"),
                                    src=routed.ip)])


def test_a_peers_address_from_another_link_is_dropped(tmp_path):
    """The L2 reverse-path check: n0 and n1 share a link, n2 is behind the
    router. IPIP claiming to be from n1 that arrives from the router's MAC
    (sent from n2's link), or claiming to be from n2 that arrives from n1's
    MAC, is dropped (source_mac) while the real nodes' traffic passes;
    without the check (check_source_mac: false) both reach the pod, as
    tunl0 would deliver them."""
    markers = (b"as the on-link node", b"as the routed node")
    with Testbed(nodes=3, pods_per_node=1, underlay="routed", subnets=[1, 1, 2]) as tb, \
            running_tunnels(tb) as (t0, _, _):
        n0, n1, n2 = tb.nodes
        pod = n0.pods[0]
        for other in (n1, n2):
            r = traffic.ping(tb, other.pods[0], pod.ip, count=3, interval=0.01)
            assert r["received"] == 3, (other.name, r)
        before = t0.counters()
        with Capture(tb, pod, tmp_path) as cap:
            spoofed(tb, n0, n1, n2, pod)
            d = t0.wait_counters(before, {"rx_drop_source_mac": 2})
        assert d == {"rx_drop_source_mac": 2, "ring_seen": 2, "ring_taken": 2}, d
        for marker in markers:
            assert not marked(cap.frames, marker), marker

        t0.stop()
        off = TunnelProcess(tb, n0, tb.node_config(n0, check_source_mac=False))
        try:
            off.wait_ready()
            wait_until(lambda: all(off.status()["next_hops"].values()), what="n0's next hops")
            before = off.counters()
            with Capture(tb, pod, tmp_path) as cap:
                spoofed(tb, n0, n1, n2, pod)
                d = off.wait_counters(before, {"rx_packets": 2})
        finally:
            off.stop()
        assert d.get("rx_drop_source_mac", 0) == 0 and d["rx_packets"] == 2, d
        for marker in markers:
            assert [f[ICMP].type for f in marked(cap.frames, marker)] == [8, 0], marker  # delivered, answered


FLOOD_SOURCES = IPv4Network("198.19.64.0/18")  # 4096 sources for each flood
# Paced UDP from 4096 sources (argv: destination, seconds, packets a second,
# TTL, total length, DF): every packet another flow, so both TUN queues get
# them, and the per-destination limit never holds an error back.
FLOOD = """
import socket, struct, sys, time
dst, seconds, rate = socket.inet_aton(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
ttl, size, df = int(sys.argv[4]), int(sys.argv[5]), sys.argv[6] == "df"
first = int.from_bytes(socket.inet_aton(sys.argv[7]), "big")
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
s.setsockopt(socket.IPPROTO_IP, 10, 3)  # IP_MTU_DISCOVER: IP_PMTUDISC_PROBE, sent as built
body = bytes(size - 28)
start, sent = time.monotonic(), 0
while (now := time.monotonic()) < start + seconds:
    while sent < (now - start) * rate:
        src = (first + sent % 4096).to_bytes(4, "big")
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, size, 0, 0x4000 if df else 0, ttl, 17, 0, src, dst)
        s.sendto(ip + struct.pack("!HHHH", 1024 + sent % 50000, 9, size - 20, 0) + body, (sys.argv[1], 0))
        sent += 1
    time.sleep(0.005)
"""


def icmp_errors_from(frames: list, node: Node) -> list:
    """The ICMP errors node sent, among captured frames (not inside IPIP)."""
    return [f for f in frames if IP in f and f[IP].src == node.ip and f[IP].proto == 1 and ICMP in f
            and f[ICMP].type in (3, 4, 5, 11, 12)]


def test_no_input_makes_the_node_send_icmp_errors_beyond_its_budget(tmp_path):
    """ICMP amplification: the node's errors share one budget, 1000 a second
    with a burst of 50, as the kernel's icmp_global_allow keeps one per
    network namespace, whoever sends them. Three floods at once, each 2000
    packets a second from 4096 sources for 2 s, drive every path that makes
    one: to an address the table has no route for (net unreachable, from
    the encap loops of both workers), DF packets larger than the path MTU
    that the router's "fragmentation needed" taught the node (from the encap
    loops; the router's first ones relayed), and packets that leave with TTL
    1 (the router's "time exceeded" about each outer packet, relayed by the
    control thread). Every error the node sends, captured at the pod (where
    the floods' sources are routed) and on the underlay, is within the
    budget over the time they took; so is the datapath's own count."""
    with Testbed(nodes=2, pods_per_node=1, underlay="routed", router_mtu=1400) as tb, \
            running_tunnels(tb, workers=2) as (t0, _):
        n0, n1 = tb.nodes
        pod, far = n0.pods[0], n1.pods[0]
        assert len(t0.status()["counters"]["workers"]) == 2
        ipr = tb.ipr(n0)
        ipr.route("add", dst=str(FLOOD_SOURCES), gateway=pod.ip, oif=ipr.link_lookup(ifname=pod.host_veth)[0])
        floods = [("198.19.9.5", 64, 28, "-"), (far.ip, 64, 1400, "df"), (far.ip, 2, 28, "-")]
        with route_into_tun_only(tb, t0, "198.19.9.0/24"):
            before = t0.status()["counters"]
            with Capture(tb, pod, tmp_path) as at_pod, Capture(tb, n0, tmp_path) as on_underlay:
                start = time.time()  # no error can leave before the floods start
                procs = [tb.popen(pod, [sys.executable, "-c", FLOOD, dst, "2", "2000", str(ttl), str(size), df,
                                        str(FLOOD_SOURCES[4096 * i])])
                         for i, (dst, ttl, size, df) in enumerate(floods)]
                for p in procs:
                    assert p.wait(timeout=60) == 0
            after = t0.status()["counters"]
            counted = time.time()
    d = delta(flat_counters(before), flat_counters(after))
    errors = icmp_errors_from(at_pod.frames, n0) + icmp_errors_from(on_underlay.frames, n0)
    kinds = {(f[ICMP].type, f[ICMP].code) for f in errors}
    assert {(3, 0), (3, 4), (11, 0)} <= kinds, kinds  # every path made some
    assert d["icmp_relayed"] > 0 and d["icmp_ratelimited"] > 0, d  # the relay took part; the budget was spent
    for w0, w1 in zip(before["workers"], after["workers"]):  # both workers' encap loops sent errors
        assert w1["tx"]["drops"]["no_route"] > w0["tx"]["drops"]["no_route"], (before, after)
    seconds = float(max(f.time for f in errors)) - start  # each was captured after it was sent
    assert len(errors) <= 50 + 1000 * seconds + 1, (len(errors), seconds, d)
    assert d["icmp_sent"] <= 50 + 1000 * (counted - start) + 1, (d, counted - start)
