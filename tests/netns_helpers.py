"""Helpers of the netns tests: frames on the underlay, injection."""
from __future__ import annotations

import socket

from scapy.layers.inet import ICMP, IP
from scapy.layers.l2 import Ether

from ipipfast import tc_drops
from ipipfast_lab import wire
from ipipfast_lab.testbed import Node, Testbed


def node_mac(tb: Testbed, node: Node) -> bytes:
    return bytes.fromhex(tb.mac(node).replace(":", ""))


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


class Capture(wire.Capture):
    """The lab's capture, its frames parsed by scapy."""

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self.frames = []
        for record in self.records:
            f = Ether(record.data)
            f.time = record.time  # when the capture read it, so after it was sent
            self.frames.append(f)

    def ipip(self) -> list[Ether]:
        return [f for f in self.frames if IP in f and f[IP].proto == 4]

    def icmp_errors(self) -> list[Ether]:
        return [f for f in self.frames if IP in f and f[IP].proto == 1 and f[ICMP].type == 3]
