"""Frames on the wire: a capture on a testbed interface for the length of a
with block, and the pcap file it writes read back by hand (the demo runs
without scapy; the tests parse the same frames with scapy as their oracle)."""
from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from . import traffic
from .testbed import Node, Pod, Testbed

_PCAP_HEADER = 24
_RECORD = struct.Struct("<IIII")  # seconds, microseconds, captured length, length
_ETH_IPV4 = b"\x08\x00"
IPPROTO_IPIP = 4


def read_pcap(path: Path) -> list[tuple[float, bytes]]:
    """(time, frame) of each record of a pcap file as `traffic capture` writes it."""
    data = path.read_bytes()
    out, at = [], _PCAP_HEADER
    while at + _RECORD.size <= len(data):
        sec, usec, n, _ = _RECORD.unpack_from(data, at)
        at += _RECORD.size
        out.append((sec + usec / 1e6, data[at:at + n]))
        at += n
    return out


@dataclass(frozen=True)
class Ipv4:
    """An IPv4 header's addresses and protocol; for IPIP, the inner header's too."""
    src: str
    dst: str
    proto: int
    inner: Ipv4 | None = None


def ipv4(packet: bytes) -> Ipv4 | None:
    """The IPv4 header at the start of packet (and the one it carries, for IPIP), or None."""
    if len(packet) < 20 or packet[0] >> 4 != 4:
        return None
    ihl = (packet[0] & 0xF) * 4
    inner = ipv4(packet[ihl:]) if packet[9] == IPPROTO_IPIP else None
    return Ipv4(socket.inet_ntoa(packet[12:16]), socket.inet_ntoa(packet[16:20]), packet[9], inner)


@dataclass(frozen=True)
class Frame:
    time: float
    data: bytes

    @property
    def dst_mac(self) -> str:
        return self.data[:6].hex(":")

    @property
    def ip(self) -> Ipv4 | None:
        return ipv4(self.data[14:]) if self.data[12:14] == _ETH_IPV4 else None


class Capture:
    """Frames on a node's underlay interface, or a pod's eth0, while the block
    runs: every frame the interface had passed when the block ends (the
    capture writes out what its socket holds before it exits). iface:
    another interface of the namespace (a TUN's frames start with IP)."""

    def __init__(self, tb: Testbed, where: Node | Pod, directory: Path, iface: str | None = None) -> None:
        self.iface = iface or (where.interface if isinstance(where, Node) else "eth0")  # a pod's only link
        self.tb, self.where, self.path = tb, where, directory / f"{where.name}-{self.iface}.pcap"

    def __enter__(self) -> Capture:
        self.proc = traffic.serve(self.tb, self.where, "capture", "--iface", self.iface, "--out", self.path)
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        traffic.collect(self.proc)
        self.records = [Frame(t, data) for t, data in read_pcap(self.path)]
