"""The kernel's side of the tunnel, through netlink (pyroute2): links,
next hops and their MACs for the AF_PACKET socket. (Routes, by the
hundred thousand, go through rtnl.py.)"""
from __future__ import annotations

import logging
import os
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
# A single get (not a dump) goes without NLM_F_ACK. pyroute2 0.9 asks for the
# ACK, returns at the reply and leaves the ACK behind in a queue that nobody
# reads: about 1.5 kB per call for the life of the socket.
_GET_LINK = (RTM_GETLINK, NLM_F_REQUEST)
_GET_ROUTE = (RTM_GETROUTE, NLM_F_REQUEST)


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

    def setup_tun(self, name: str, mtu: int) -> Link:
        """Sets the TUN's MTU and queue, keeps IPv6 off it (the datapath
        carries IPv4 only: router solicitations would only be counted as
        drops) and brings it up."""
        link = self.link(name)
        disable_v6 = f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6"
        if os.path.exists(disable_v6):
            with open(disable_v6, "w") as f:
                f.write("1")
        # A TUN queues 500 packets (an Ethernet device 1000): a burst that
        # arrives while the encap loop waits for a CPU is dropped beyond it.
        self.ipr.link("set", index=link.index, mtu=mtu, txqlen=TUN_TXQUEUELEN, state="up")
        return self.link(name)

    def nexthop(self, peer: IPv4Address) -> NextHop:
        """The underlay next hop the kernel would use to reach peer."""
        msg = self.ipr.route(_GET_ROUTE, dst=str(peer))[0]
        gateway = msg.get_attr("RTA_GATEWAY")
        return NextHop(peer, IPv4Address(gateway) if gateway else peer, msg.get_attr("RTA_OIF"))

    def neighbour_mac(self, ip: IPv4Address, ifindex: int) -> bytes | None:
        """The resolved MAC of ip on ifindex, or None."""
        for msg in self.ipr.get_neighbours(ifindex=ifindex, dst=str(ip)):
            mac = msg.get_attr("NDA_LLADDR")
            if mac and msg["state"] & NUD_VALID:
                return bytes.fromhex(mac.replace(":", ""))
        return None

    def solicit(self, ip: IPv4Address, ifindex: int) -> None:
        """Makes the kernel resolve (or re-confirm) ip's MAC, as a packet to
        it would: our frames bypass the neighbour table, so nothing else
        keeps the entry fresh."""
        try:
            self.ipr.neigh("replace", dst=str(ip), ifindex=ifindex, flags=NTF_USE, state=0)
        except NetlinkError as e:
            log.debug("neighbour solicit %s: %s", ip, e)
