"""Helpers of the netns tests: frames on the underlay, injection."""
from __future__ import annotations

import socket
import sys
from pathlib import Path

from scapy.layers.inet import ICMP, IP
from scapy.layers.l2 import Ether
from scapy.packet import raw
from scapy.utils import rdpcap

from ipipfast import tc_drops
from ipipfast_lab import traffic
from ipipfast_lab.testbed import Node, Pod, Testbed

METRICS_LISTEN = "127.0.0.1:9464"  # a daemon's stats.listen, inside its node
_SCRAPE = """
import sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxy from the environment
print(opener.open("http://%s/metrics", timeout=5).read().decode(), end="")
""" % METRICS_LISTEN


def node_mac(tb: Testbed, node: Node) -> bytes:
    link = tb.ipr(node).get_links(ifname=node.interface)[0]
    return bytes.fromhex(link.get_attr("IFLA_ADDRESS").replace(":", ""))


def inject(tb: Testbed, node: Node, frames: list[bytes]) -> None:
    """Sends raw frames out of node's underlay interface, marked as its
    datapath's are: past the tc egress drop of a daemon running there."""
    def send() -> None:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, tc_drops.MARK)
            s.bind((node.interface, 0))
            for f in frames:
                s.send(f)
    tb.in_netns(node, send)


def scrape_metrics(tb: Testbed, node: Node) -> str:
    """The text of a GET /metrics of the daemon listening on METRICS_LISTEN in node, asked from inside it."""
    return tb.run(node, [sys.executable, "-c", _SCRAPE]).stdout


class Capture:
    """Frames on a node's underlay interface, or a pod's eth0, while the block
    runs: every frame the interface had passed when the block ends (the
    capture writes out what its socket holds before it exits)."""

    def __init__(self, tb: Testbed, where: Node | Pod, tmp: Path) -> None:
        self.tb, self.where, self.path = tb, where, tmp / f"{where.name}.pcap"
        self.iface = where.interface if isinstance(where, Node) else "eth0"  # a pod's only link

    def __enter__(self) -> Capture:
        self.proc = traffic.serve(self.tb, self.where, "capture", "--iface", self.iface, "--out", self.path)
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        traffic.collect(self.proc)
        self.frames = []
        for p in rdpcap(str(self.path)):
            f = Ether(raw(p))
            f.time = p.time  # when the capture read it, so after it was sent
            self.frames.append(f)

    def ipip(self) -> list[Ether]:
        return [f for f in self.frames if IP in f and f[IP].proto == 4]

    def icmp_errors(self) -> list[Ether]:
        return [f for f in self.frames if IP in f and f[IP].proto == 1 and f[ICMP].type == 3]
