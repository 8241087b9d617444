"""Helpers of the netns tests: frames on the underlay, injection, captures, a
route into the TUN that the datapath has not."""
from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from scapy.layers.inet import ICMP, IP
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw, raw
from scapy.utils import rdpcap

from ipipfast import tc_drops
from ipipfast_lab import traffic
from ipipfast_lab.daemons import TunnelProcess
from ipipfast_lab.testbed import Node, Pod, Testbed


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
    link = tb.ipr(node).get_links(ifname=node.interface)[0]
    return bytes.fromhex(link.get_attr("IFLA_ADDRESS").replace(":", ""))


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


class Capture:
    """Frames on a node's underlay interface, or a pod's eth0, while the block
    runs: every frame the interface had passed when the block ends (the
    capture writes out what its socket holds before it exits). iface: another
    interface of the namespace; layer: what its frames start with (IP on a
    TUN)."""

    def __init__(self, tb: Testbed, where: Node | Pod, tmp: Path, iface: str | None = None,
                 layer: type[Packet] = Ether) -> None:
        self.iface = iface or (where.interface if isinstance(where, Node) else "eth0")  # a pod's only link
        self.tb, self.where, self.path, self.layer = tb, where, tmp / f"{where.name}-{self.iface}.pcap", layer

    def __enter__(self) -> Capture:
        self.proc = traffic.serve(self.tb, self.where, "capture", "--iface", self.iface, "--out", self.path)
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        traffic.collect(self.proc)
        self.frames = []
        for p in rdpcap(str(self.path)):
            f = self.layer(raw(p))
            f.time = p.time  # when the capture read it, so after it was sent
            self.frames.append(f)

    def ipip(self) -> list[Ether]:
        return [f for f in self.frames if IP in f and f[IP].proto == 4]

    def icmp_errors(self) -> list[Ether]:
        return [f for f in self.frames if IP in f and f[IP].proto == 1 and f[ICMP].type == 3]
