"""ICMP errors about our outer packets: path MTU per peer, and relay of the
errors to the inner sender (RFC 2003 section 4), which the kernel's tunl0
does not do: it only learns the MTU and drops the rest."""
from __future__ import annotations

import logging
import os
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass
from ipaddress import IPv4Address

from .logs import Limited
from .wake_pipe import WakePipe

log = logging.getLogger(__name__)
events = Limited(log)  # ICMP errors arrive at the rate the path sends them

IP_RECVERR = 11
SO_EE_ORIGIN_ICMP = 2
PMTU_EXPIRES = 600.0     # seconds, as the kernel's net.ipv4.route.mtu_expires
MIN_PMTU = 552           # net.ipv4.route.min_pmtu: smaller advertisements are clamped
DEST_UNREACH, TIME_EXCEEDED = 3, 11
FRAG_NEEDED = 4
# Unreachable codes relayed to the inner sender, and as what (RFC 2003 4.1):
# protocol unreachable means the peer does not speak IPIP, a host problem to
# the sender; port unreachable and source route failed are not relayed.
RELAY_UNREACH = {0: 0, 1: 1, 2: 1, 6: 6, 7: 7, 11: 11, 12: 12, 13: 13}


@dataclass(frozen=True)
class Decision:
    peer: IPv4Address | None = None   # the tunnel peer the error is about
    pmtu: int | None = None           # a new path MTU toward it
    relay: tuple[bytes, int, int, int] | None = None  # (inner quote, type, code, info)


def decide(node: IPv4Address, icmp_type: int, code: int, info: int, quote: bytes) -> Decision:
    """What to do about an ICMP error whose quote starts with our outer header."""
    if len(quote) < 20 or quote[0] >> 4 != 4 or quote[9] != 4:
        return Decision()
    ihl = (quote[0] & 0x0F) * 4
    if IPv4Address(quote[12:16]) != node:
        return Decision()
    peer = IPv4Address(quote[16:20])
    inner = quote[ihl:]
    pmtu = None
    if icmp_type == DEST_UNREACH and code == FRAG_NEEDED:
        if info < 68:
            return Decision(peer)  # an RFC 1191 router too old to say: nothing to learn
        pmtu = max(info, MIN_PMTU)
        relay = (DEST_UNREACH, FRAG_NEEDED, pmtu - 20)
    elif icmp_type == DEST_UNREACH and code in RELAY_UNREACH:
        relay = (DEST_UNREACH, RELAY_UNREACH[code], 0)
    elif icmp_type == TIME_EXCEEDED and code == 0:
        relay = (TIME_EXCEEDED, 0, 0)
    else:
        return Decision(peer)
    # The sender can match an error only with its own header and 8 bytes.
    if len(inner) < 20 or inner[0] >> 4 != 4 or len(inner) < (inner[0] & 0x0F) * 4 + 8:
        return Decision(peer, pmtu)
    if relay[1] == FRAG_NEEDED and not inner[6] & 0x40:
        return Decision(peer, pmtu)  # the inner may be fragmented: nobody to tell
    return Decision(peer, pmtu, (bytes(inner), *relay))


class IcmpErrors:
    """Reads the datapath's ICMP error queue and applies the decisions."""

    def __init__(self, datapath, node: IPv4Address) -> None:
        self.datapath, self.node = datapath, node
        self.sock = socket.socket(fileno=os.dup(datapath.sink_fileno()))
        self._pmtu: dict[IPv4Address, tuple[int, float]] = {}
        self.lock = threading.Lock()

    def pmtu(self, peer: IPv4Address) -> int:
        """The path MTU learned toward peer, 0 when none (or expired)."""
        with self.lock:
            mtu, expires = self._pmtu.get(peer, (0, 0.0))
            return mtu if expires > time.monotonic() else 0

    def learned(self) -> dict[IPv4Address, int]:
        """Every path MTU learned and not expired, by peer."""
        now = time.monotonic()
        with self.lock:
            return {p: mtu for p, (mtu, expires) in self._pmtu.items() if expires > now}

    def pmtus(self) -> dict[str, int]:
        return {str(p): m for p, m in self.learned().items()}

    def handle(self, icmp_type: int, code: int, info: int, quote: bytes) -> Decision:
        d = decide(self.node, icmp_type, code, info, quote)
        if d.pmtu is not None and d.peer is not None:
            with self.lock:
                self._pmtu[d.peer] = (d.pmtu, time.monotonic() + PMTU_EXPIRES)
            self.datapath.set_peer_pmtu(str(d.peer), d.pmtu)
            events.log(logging.INFO, "pmtu", "path MTU toward %s: %d", d.peer, d.pmtu)
        if d.relay is not None and self.datapath.send_icmp_error(*d.relay):
            events.log(logging.INFO, "relay", "relayed ICMP %d/%d about a packet to %s to its sender %s",
                       d.relay[1], d.relay[2], IPv4Address(d.relay[0][16:20]), IPv4Address(d.relay[0][12:16]))
        return d

    def _expire(self) -> None:
        now = time.monotonic()
        with self.lock:
            gone = [p for p, (_, expires) in self._pmtu.items() if expires <= now]
            for p in gone:
                del self._pmtu[p]
        for p in gone:
            self.datapath.set_peer_pmtu(str(p), 0)
            events.log(logging.INFO, "pmtu-expiry", "path MTU toward %s expired", p)

    def run(self, stop: WakePipe) -> None:
        """Handles the errors as they come, and each path MTU as it expires,
        until stop is set; asleep in between."""
        poller = select.poll()
        poller.register(self.sock, select.POLLERR)
        poller.register(stop, select.POLLIN)
        try:
            while True:
                ready = {fd for fd, _ in poller.poll(self._next_expiry())}
                if stop.fileno() in ready:
                    return
                if ready:
                    self._drain()
                self._expire()
        finally:
            self.sock.close()

    def _next_expiry(self) -> int | None:
        """Milliseconds until the first learned path MTU expires; None: none is learned."""
        with self.lock:
            first = min((expires for _, expires in self._pmtu.values()), default=None)
        return None if first is None else max(0, int((first - time.monotonic()) * 1000) + 1)

    def _drain(self) -> None:
        while True:
            try:
                data, anc, _, _ = self.sock.recvmsg(2048, 512, socket.MSG_ERRQUEUE | socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            for level, kind, cmsg in anc:
                if level == socket.IPPROTO_IP and kind == IP_RECVERR and len(cmsg) >= 16:
                    _errno, origin, icmp_type, code, _pad, info, _data = struct.unpack_from("=IBBBBII", cmsg)
                    if origin == SO_EE_ORIGIN_ICMP:
                        self.handle(icmp_type, code, info, data)
