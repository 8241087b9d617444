"""Faults a node meets unattended: a peer whose MAC changes (a VM that
migrated, a bond that failed over), a SIGTERM in the middle of traffic, and
signals the kernel hands to a packet loop's thread rather than the main one."""
from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
from pathlib import Path

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from ipipfast_lab import traffic
from ipipfast_lab.daemons import running_tunnels, wait_until
from ipipfast_lab.testbed import Testbed
from netns_helpers import Capture

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces, TUN and AF_PACKET")]
NEW_MAC = "02:00:5e:10:00:01"  # locally administered


def test_traffic_follows_a_peers_new_mac(tmp_path: Path) -> None:
    with Testbed(nodes=2, pods_per_node=1) as tb, running_tunnels(tb) as (t0, t1):
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
        # ...and the peer's own frames leave from its new MAC, which n0 checks them against.
        replies = [f for f in cap.ipip() if f[IP].src == n1.ip]
        assert len(replies) >= 5 and {f[Ether].src for f in replies} == {NEW_MAC}
        assert f"{n1.interface}'s MAC: {NEW_MAC}" in t1.log()


FLOOD = """
import socket, sys, time
dst, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(count):
    try:
        s.sendto(b"x" * 64, (dst, port))
    except OSError:
        pass
    if i % 20 == 19:
        time.sleep(0.001)  # about 18,000 datagrams a second
"""
FLOOD_PORT = 7100


def _qdisc(tb: Testbed, node) -> dict:
    return json.loads(tb.run(node, ["tc", "-s", "-j", "qdisc", "show", "dev", node.interface, "root"]).stdout)[0]


@pytest.mark.parametrize("underlay", [
    "as fast as the ring",
    "slower than the ring",
])
def test_sigterm_sends_the_in_flight_batch(tmp_path: Path, underlay: str) -> None:
    """A SIGTERM under a flood: every packet the daemon read from the TUN (the
    TUN's own count) is on the wire (captured at the peer) or counted as a
    drop, and none was dropped for the shutdown (send_failed)."""
    with Testbed(nodes=2, pods_per_node=1) as tb, running_tunnels(tb) as (t0, t1):
        n0, n1 = tb.nodes
        a, b = n0.pods[0], n1.pods[0]
        if underlay == "slower than the ring":  # 4 Mbit/s, 4,000 frames a second: the ring stays full
            tb.run(n0, ["tc", "qdisc", "replace", "dev", n0.interface, "root", "tbf", "rate", "4mbit",
                        "burst", "20kb", "limit", "8mb"])
        before = t0.counters()
        with Capture(tb, n1, tmp_path) as cap:
            flood = tb.popen(a, [sys.executable, "-c", FLOOD, b.ip, str(FLOOD_PORT), "30000"])
            t0.wait_counters(before, {"tx_packets": 3000}, timeout=30)
            assert t0.stop() == 0
            flood.wait(timeout=60)
            if underlay == "slower than the ring":
                wait_until(lambda: _qdisc(tb, n0)["backlog"] == 0, what="the qdisc sending what it holds")
        tun = f"{tb.prefix}t0"
        read = int(tb.run(n0, ["cat", f"/sys/class/net/{tun}/statistics/tx_packets"]).stdout)
        final = t0.counters()
        wire = [f for f in cap.ipip() if f[IP].src == n0.ip and UDP in f[IP].payload
                and f[IP].payload[UDP].dport == FLOOD_PORT]
        drops = {k: v for k, v in final.items() if k.startswith("tx_drop_") and k != "tx_drop_queue_full" and v}
        assert final["tx_gso"] == 0  # one frame per packet read
        if underlay == "slower than the ring":
            assert _qdisc(tb, n0)["drops"] == 0
        assert final["tx_packets"] == len(wire), (final, len(wire))
        assert read == final["tx_packets"] + sum(drops.values()), (read, final["tx_packets"], drops)
        assert drops.get("tx_drop_send_failed", 0) == 0, drops


SYS_TGKILL = 234  # x86_64


def _thread(pid: int, name: str) -> int:
    return next(int(tid) for tid in os.listdir(f"/proc/{pid}/task")
                if Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip() == name)


def _tgkill(pid: int, tid: int, sig: int) -> None:
    assert ctypes.CDLL(None, use_errno=True).syscall(SYS_TGKILL, pid, tid, sig) == 0, os.strerror(ctypes.get_errno())


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="tgkill's syscall number is x86_64's")
def test_a_signal_that_lands_on_a_packet_loop_is_acted_on() -> None:
    """The kernel hands a process's signal to whichever of its threads it
    likes; a quiet daemon's main thread sleeps until its next timer (up to a
    minute) unless woken. A SIGHUP and then a SIGTERM, each sent to a packet
    loop's thread only: the reload is counted and the daemon stops, with
    nothing else to wake it."""
    with Testbed(nodes=2, pods_per_node=1) as tb, running_tunnels(tb) as (t0, _):
        pid = t0.proc.pid
        _tgkill(pid, _thread(pid, "ipf-encap0"), signal.SIGHUP)
        t0.wait_for(lambda s: s["reloads"]["unchanged"] == 1)
        _tgkill(pid, _thread(pid, "ipf-decap0"), signal.SIGTERM)
        assert t0.proc.wait(timeout=15) == 0
