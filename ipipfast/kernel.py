"""The kernel's side of the tunnel, through netlink (pyroute2): links,
routes into the TUN, next hops and their MACs for the AF_PACKET socket,
and the neighbour changes that move them. (Routes, by the hundred
thousand, go through rtnl.py.)"""
from __future__ import annotations

import errno
import logging
import os
import select
import socket
import struct
import threading
from dataclasses import dataclass
from ipaddress import IPv4Address

from pyroute2 import IPRoute
from pyroute2.ethtool import Ethtool
from pyroute2.netlink import NLM_F_REQUEST
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTM_GETLINK, RTM_GETROUTE

log = logging.getLogger(__name__)

TUN_TXQUEUELEN = 1000
NTF_USE = 0x01      # neighbour flag: ask the kernel to resolve it now
NUD_VALID = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80  # REACHABLE STALE DELAY PROBE PERMANENT NOARP
RTMGRP_NEIGH = 0x4  # the multicast group of neighbour changes
RTM_NEWNEIGH, RTM_GETNEIGH = 28, 30
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_DUMP = 0x300
NDA_DST, NDA_LLADDR = 1, 2
EVENTS_RCVBUF = 1 << 20  # a burst of neighbour changes (a whole subnet's ARP) fits
# A single get (not a dump) goes without NLM_F_ACK. pyroute2 0.9 asks for the
# ACK, returns at the reply and leaves the ACK behind in a queue that nobody
# reads: about 1.5 kB per call for the life of the socket.
_GET_LINK = (RTM_GETLINK, NLM_F_REQUEST)
_GET_ROUTE = (RTM_GETROUTE, NLM_F_REQUEST)


def ipip_module_loaded(sys_module: str = "/sys/module") -> bool:
    """Whether the kernel's ipip module is loaded (it then owns protocol 4
    and the name tunl0 in every namespace)."""
    return os.path.exists(os.path.join(sys_module, "ipip"))


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    mac: bytes
    mtu: int


@dataclass(frozen=True)
class NextHop:
    """Where frames for a peer go on the underlay: the peer itself when it
    is on-link, else the gateway that the kernel's routing table names."""
    peer: IPv4Address
    ip: IPv4Address
    ifindex: int


class Kernel:
    """Netlink in the current network namespace, from any thread. pyroute2
    (0.9) wants a socket per thread: one used from a thread other than the
    one that opened it keeps about 0.5 kB per call. So each thread that asks
    gets its own, and closes it with close_thread() when it is done."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: set[IPRoute] = set()

    @property
    def ipr(self) -> IPRoute:
        ipr = getattr(self._local, "ipr", None)
        if ipr is None:
            ipr = self._local.ipr = IPRoute()
            with self._lock:
                self._open.add(ipr)
        return ipr

    def close_thread(self) -> None:
        """Closes the calling thread's socket, if it opened one."""
        ipr = getattr(self._local, "ipr", None)
        if ipr is not None:
            del self._local.ipr
            with self._lock:
                self._open.discard(ipr)
            ipr.close()

    def close(self) -> None:
        self.close_thread()
        with self._lock:
            rest, self._open = self._open, set()
        for ipr in rest:  # of threads that ended without closing theirs
            ipr.close()

    def link(self, name: str) -> Link:
        found = self.ipr.link_lookup(ifname=name)
        if not found:
            raise LookupError(f"no interface named {name!r}")
        msg = self.ipr.link(_GET_LINK, index=found[0])[0]
        mac = msg.get_attr("IFLA_ADDRESS") or "00:00:00:00:00:00"
        return Link(msg["index"], name, bytes.fromhex(mac.replace(":", "")), msg.get_attr("IFLA_MTU"))

    @staticmethod
    def tx_dropped(name: str) -> int:
        """What the device dropped on transmit: for a TUN, packets that found
        its queue full because its reader fell behind. Read from this network
        namespace's /proc/net/dev, not netlink: asked every half second, a
        pyroute2 (0.9) socket kept some 2 kB per call that it never gave back."""
        with open("/proc/net/dev") as f:
            for line in f:
                dev, colon, fields = line.partition(":")
                if colon and dev.strip() == name:
                    return int(fields.split()[11])  # 8 receive columns, then TX bytes packets errs drop
        raise LookupError(f"no interface named {name!r}")

    @staticmethod
    def completes_any_checksum(name: str) -> bool:
        """Whether the device completes an L4 checksum wherever a frame says
        it lies (NETIF_F_HW_CSUM, ethtool's tx-checksum-ip-generic), as veth
        and virtio do. A device that only knows TCP/UDP right after the IP
        header (tx-checksum-ipv4) may look for it behind the outer header."""
        with Ethtool() as ethtool:
            feature = ethtool.get_features(name).features.get("tx-checksum-ip-generic")
        return bool(feature and feature.enable)

    def setup_tun(self, name: str, mtu: int | None) -> Link:
        """Sets the TUN's MTU (None: keeps it) and queue, keeps IPv6 off it
        (the datapath carries IPv4 only: router solicitations would only be
        counted as drops) and brings it up."""
        link = self.link(name)
        disable_v6 = f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6"
        if os.path.exists(disable_v6):
            with open(disable_v6, "w") as f:
                f.write("1")
        # A TUN queues 500 packets (an Ethernet device 1000): a burst that
        # arrives while the encap loop waits for a CPU is dropped beyond it.
        self.ipr.link("set", index=link.index, txqlen=TUN_TXQUEUELEN, state="up", **({"mtu": mtu} if mtu else {}))
        return self.link(name)

    def remove_link(self, index: int) -> None:
        self.ipr.link("del", index=index)

    def tun_attached(self, name: str) -> bool:
        """Whether a process holds a queue of the TUN: the kernel turns its
        carrier on with the first queue attached and off with the last."""
        msg = self.ipr.link(_GET_LINK, index=self.link(name).index)[0]
        return bool(msg.get_attr("IFLA_CARRIER"))

    def nexthop(self, peer: IPv4Address) -> NextHop:
        """The underlay next hop the kernel would use to reach peer."""
        msg = self.ipr.route(_GET_ROUTE, dst=str(peer))[0]
        gateway = msg.get_attr("RTA_GATEWAY")
        return NextHop(peer, IPv4Address(gateway) if gateway else peer, msg.get_attr("RTA_OIF"))

    @staticmethod
    def neighbour_macs(ifindex: int) -> dict[IPv4Address, bytes]:
        """The resolved MACs of ifindex's IPv4 neighbours: one dump of the
        neighbour table, on a plain socket parsed by hand (a thousand peers'
        next hops cost one call, where a pyroute2 get per peer dumps the
        table each time)."""
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE) as s:
            s.bind((0, 0))
            ndmsg = struct.pack("=B3xiHBB", socket.AF_INET, 0, 0, 0, 0)
            s.send(struct.pack("=IHHII", 16 + len(ndmsg), RTM_GETNEIGH, NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + ndmsg)
            out: dict[IPv4Address, bytes] = {}
            while True:
                data = s.recv(1 << 16)
                out.update((n.ip, n.mac) for n in _neighbours(data) if n.ifindex == ifindex and n.mac)
                if _done(data):
                    return out

    def solicit(self, ip: IPv4Address, ifindex: int) -> None:
        """Makes the kernel resolve (or re-confirm) ip's MAC, as a packet to
        it would: our frames bypass the neighbour table, so nothing else
        keeps the entry fresh."""
        try:
            self.ipr.neigh("replace", dst=str(ip), ifindex=ifindex, flags=NTF_USE, state=0)
        except NetlinkError as e:
            log.debug("neighbour solicit %s: %s", ip, e)


@dataclass(frozen=True)
class Neighbour:
    """An IPv4 neighbour as a change announced it."""
    ip: IPv4Address
    ifindex: int
    mac: bytes | None  # None unless the entry holds a usable one (NUD_VALID)


class EventsLost(Exception):
    """The kernel dropped notifications we were too slow to read: read the
    neighbour table again."""


class NeighbourEvents:
    """The kernel's RTM_NEWNEIGH notifications, on a netlink socket of its
    own (a plain one: pyroute2 would keep memory per message): a neighbour
    learned, re-confirmed, or changed, as a peer's gratuitous ARP after it
    moved changes it."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, EVENTS_RCVBUF)
        self.sock.bind((0, RTMGRP_NEIGH))

    def __enter__(self) -> NeighbourEvents:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def read(self, timeout: float) -> list[Neighbour]:
        """The IPv4 neighbours announced within timeout seconds (none if
        nothing came); EventsLost if the kernel dropped some."""
        if not select.select([self.sock], [], [], timeout)[0]:
            return []
        out: list[Neighbour] = []
        while True:
            try:
                data = self.sock.recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return out
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    raise EventsLost() from None
                raise
            out += _neighbours(data)


def _neighbours(data: bytes) -> list[Neighbour]:
    """The RTM_NEWNEIGH messages (AF_INET) of one netlink datagram."""
    out = []
    at = 0
    while at + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, at)
        if length < 16:
            break
        if kind == RTM_NEWNEIGH and length >= 28:
            family, ifindex, state = struct.unpack_from("=B3xiH", data, at + 16)
            attrs = _attrs(data[at + 28:at + length])
            if family == socket.AF_INET and len(attrs.get(NDA_DST, b"")) == 4:
                mac = attrs.get(NDA_LLADDR)
                out.append(Neighbour(IPv4Address(attrs[NDA_DST]), ifindex,
                                     mac if mac and state & NUD_VALID else None))
        at += (length + 3) & ~3
    return out


def _done(data: bytes) -> bool:
    """Whether a dump's datagram ends it (NLMSG_DONE, or an error)."""
    at = 0
    while at + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, at)
        if kind in (NLMSG_DONE, NLMSG_ERROR):
            return True
        if length < 16:
            break
        at += (length + 3) & ~3
    return False


def _attrs(data: bytes) -> dict[int, bytes]:
    out = {}
    at = 0
    while at + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, at)
        if length < 4:
            break
        out[kind & 0x3FFF] = data[at + 4:at + length]  # without NLA_F_NESTED / NET_BYTEORDER
        at += (length + 3) & ~3
    return out
