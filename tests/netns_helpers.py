"""Helpers of the netns tests: frames on the underlay, injection, captures, a
route into the TUN that the datapath has not."""
from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from scapy.layers.inet import ICMP, IP
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw, raw

from ipipfast import tc_drops
from ipipfast_lab import wire
from ipipfast_lab.daemons import TunnelProcess
from ipipfast_lab.testbed import Node, Pod, Testbed

METRICS_LISTEN = "127.0.0.1:9464"  # a daemon's stats.listen, inside its node
_SCRAPE = """
import sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxy from the environment
print(opener.open("http://%s/metrics", timeout=5).read().decode(), end="")
""" % METRICS_LISTEN


@contextmanager
def route_into_tun_only(tb: Testbed, tunnel: TunnelProcess, cidr: str) -> Iterator[None]:
    """A kernel route into the TUN that the datapath's table does not have."""
    ipr = tb.ipr(tunnel.node)
    tun = ipr.link_lookup(ifname=tunnel.status()["tunnel"])[0]
    net, length = cidr.split("/")
    ipr.route("add", dst=net, dst_len=int(length), oif=tun)
    try:
        yield
    finally:
        ipr.route("del", dst=net, dst_len=int(length), oif=tun)


def node_mac(tb: Testbed, node: Node) -> bytes:
    return bytes.fromhex(tb.mac(node).replace(":", ""))


def ipip_frame(tb: Testbed, src_node: Node, dst_node: Node, inner: bytes, *, src: str | None = None,
               **outer) -> bytes:
    """An IPIP frame from src_node to dst_node on their link (its source
    address src_node's, or src), carrying inner."""
    return raw(Ether(src=node_mac(tb, src_node), dst=node_mac(tb, dst_node))
               / IP(src=src or src_node.ip, dst=dst_node.ip, proto=4, **outer) / Raw(inner))


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


class Capture(wire.Capture):
    """The lab's capture, its frames parsed by scapy as layer (IP on a TUN)."""

    def __init__(self, tb: Testbed, where: Node | Pod, tmp: Path, iface: str | None = None,
                 layer: type[Packet] = Ether) -> None:
        super().__init__(tb, where, tmp, iface)
        self.layer = layer

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self.frames = []
        for record in self.records:
            f = self.layer(record.data)
            f.time = record.time  # when the capture read it, so after it was sent
            self.frames.append(f)

    def ipip(self) -> list[Ether]:
        return [f for f in self.frames if IP in f and f[IP].proto == 4]

    def icmp_errors(self) -> list[Ether]:
        return [f for f in self.frames if IP in f and f[IP].proto == 1 and f[ICMP].type == 3]
