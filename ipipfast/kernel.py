"""The kernel's side of the tunnel, through netlink (pyroute2): links,
the next hops' MACs for the AF_PACKET socket, and the neighbour and link
changes that move them. (Routes, by the hundred thousand, and the lookups
of the next hops themselves go through rtnl.py.)"""
from __future__ import annotations

import errno
import logging
import os
import select
import socket
import threading
from dataclasses import dataclass
from ipaddress import IPv4Address

from pyroute2 import IPRoute
from pyroute2.ethtool import Ethtool
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTM_GETLINK

from . import rtnl
from .rtnl import NLM_F_REQUEST
from .wake_pipe import WakePipe

log = logging.getLogger(__name__)

TUN_TXQUEUELEN = 1000
NTF_USE = 0x01      # neighbour flag: ask the kernel to resolve it now
RTMGRP_NEIGH = 0x4  # the multicast group of neighbour changes
EVENTS_RCVBUF = 1 << 20  # a burst of neighbour changes (a whole subnet's ARP) fits
# A single get (not a dump) goes without NLM_F_ACK. pyroute2 0.9 asks for the
# ACK, returns at the reply and leaves the ACK behind in a queue that nobody
# reads: about 1.5 kB per call for the life of the socket.
_GET_LINK = (RTM_GETLINK, NLM_F_REQUEST)


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
    is on-link, else the gateway of the kernel's route to it (peer_hops)."""
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

    @staticmethod
    def link(name: str) -> Link:
        msg = rtnl.link(name)
        if msg is None:
            raise LookupError(f"no interface named {name!r}")
        return Link(msg.index, name, msg.mac if len(msg.mac) == 6 else bytes(6), msg.mtu)

    def holders(self, ip: IPv4Address) -> list[tuple[str, int]]:
        """(interface, prefix length) of each IPv4 address ip on this node."""
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in self.ipr.get_links()}
        return [(names[m["index"]], m["prefixlen"]) for m in self.ipr.get_addr(family=socket.AF_INET)
                if m.get_attr("IFA_LOCAL") == str(ip) and m["index"] in names]

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
            try:
                with open(disable_v6, "w") as f:
                    f.write("1")
            except OSError as e:  # a container's /proc/sys is read-only
                log.warning("IPv6 stays on %s (%s: %s): what the kernel sends into it, such as router "
                            "solicitations, is counted as dropped (not_ipv4)", name, disable_v6, e.strerror)
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

    @staticmethod
    def neighbour_macs(ifindex: int) -> dict[IPv4Address, bytes]:
        """The resolved MAC of every IPv4 neighbour on ifindex: one dump of
        the table (rtnl), for all next hops at once. pyroute2 (0.9) took
        1.2 ms of the GIL per next hop, every second."""
        return {IPv4Address(ip): mac for ip, mac in rtnl.neighbours(ifindex).items()}

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


@dataclass(frozen=True)
class LinkAddress:
    """A link's MAC as a change announced it (RTM_NEWLINK)."""
    ifindex: int
    mac: bytes


class EventsLost(Exception):
    """The kernel dropped notifications we were too slow to read: read the
    neighbour table (and our link) again."""


class NeighbourEvents:
    """The kernel's RTM_NEWNEIGH and RTM_NEWLINK notifications, on a netlink
    socket of its own (a plain one: pyroute2 would keep memory per message):
    a neighbour learned, re-confirmed, or changed, as a peer's gratuitous ARP
    after it moved changes it; and a link's MAC, as ours when it moves."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, EVENTS_RCVBUF)
        self.sock.bind((0, RTMGRP_NEIGH | rtnl.RTMGRP_LINK))

    def __enter__(self) -> NeighbourEvents:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def read(self, timeout: float | None = None, stop: WakePipe | None = None) -> list[Neighbour | LinkAddress]:
        """The IPv4 neighbours and link MACs announced within timeout seconds
        (None: until some are), or until stop is set: none if nothing came;
        EventsLost if the kernel dropped some."""
        if self.sock not in select.select([self.sock, *([stop] if stop else [])], [], [], timeout)[0]:
            return []
        out: list[Neighbour | LinkAddress] = []
        while True:
            try:
                data = self.sock.recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return out
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    raise EventsLost() from None
                raise
            out += _events(data)


def _events(data: bytes) -> list[Neighbour | LinkAddress]:
    """The IPv4 neighbours and the link MACs announced in one netlink datagram."""
    out: list[Neighbour | LinkAddress] = []
    for m in rtnl.decode(data):
        if isinstance(m, rtnl.NeighMsg) and m.new:
            out.append(Neighbour(IPv4Address(m.ip), m.ifindex, m.mac))
        elif isinstance(m, rtnl.LinkMsg) and m.new and len(m.mac) == 6:
            out.append(LinkAddress(m.index, m.mac))
    return out
