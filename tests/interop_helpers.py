"""The lab for tests/test_interop.py: one ipipfast node and the kernel VM on one
L2 segment, plus captures, raw senders and the RFC 6040 model.

Topology (every namespace belongs to one Testbed run and dies with it)::

    pod n0p0 198.19.0.2 --cali-- node n0 198.18.0.10 (ipipfast, TUN)
                                      | veth (n0.interface)
                 switch ns "<prefix>-sw": bridge, 198.18.0.1 (router / injector)
                                      | TAP
                 kernel VM 198.18.0.11 (tunl0), pod0 (dummy) 198.19.1.2

The Testbed is built with two nodes because it needs two; node n1's underlay
end is moved into the switch namespace and enslaved to the bridge, so n1 (and
its pod) is left isolated and unused.  n0 keeps the Testbed's blackhole for
198.19.1.0/24 (n1's pod CIDR, which is also the VM's): a dead tunnel drops
VM-bound pod traffic instead of routing it in the clear.
"""

from __future__ import annotations

import dataclasses
import secrets
import select
import shutil
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pyroute2 import netns

import kernelvm
from kernelvm import KernelVM

from ipipfast_lab.testbed import BLACKHOLE_METRIC, Node, Pod, Testbed
from ipipfast_lab.traffic import inet_checksum
from ipipfast_lab.daemons import TunnelProcess, wait_until

GATEWAY = "198.18.0.1"        # the switch namespace's bridge: router and injector
IPF_NODE = "198.18.0.10"      # Testbed node n0
VM_NODE = "198.18.0.11"
IPF_POD_CIDR = "198.19.0.0/24"
IPF_POD = "198.19.0.2"
VM_POD_CIDR = "198.19.1.0/24"
VM_POD = "198.19.1.2"         # pod0 (dummy) in the VM
VM_OTHER = "198.19.1.77"      # not local anywhere: source of packets injected at the VM
PREFIXLEN = 24

ETH_P_ALL = 0x0003
IPPROTO_IPIP = 4
IP_MTU_DISCOVER, IP_PMTUDISC_PROBE = 10, 3

# ECN codepoints (RFC 3168)
NOT_ECT, ECT1, ECT0, CE = 0, 1, 2, 3
ECN_NAMES = {NOT_ECT: "Not-ECT", ECT1: "ECT(1)", ECT0: "ECT(0)", CE: "CE"}


# ---------------------------------------------------------------- RFC 6040 model (as Linux applies it)


def ecn_encap(outer_tos: int, inner_tos: int) -> int:
    """INET_ECN_encapsulate (include/net/inet_ecn.h): the outer DSCP bits with the
    inner ECN field, except that CE becomes ECT(0)."""
    ecn = inner_tos & 3
    return (outer_tos & ~3 & 0xFF) | (ECT0 if ecn == CE else ecn)


def ecn_decap(outer: int, inner: int) -> int | None:
    """RFC 6040 section 4.2 as INET_ECN_decapsulate applies it: the inner ECN
    after decapsulation, or None where the packet is dropped (CE outer on a
    Not-ECT inner).  ECT outer on a Not-ECT inner passes (the kernel only logs)."""
    outer, inner = outer & 3, inner & 3
    if inner == NOT_ECT:
        return None if outer == CE else NOT_ECT
    if outer == CE:
        return CE
    if outer == ECT1 and inner == ECT0:
        return ECT1
    return inner


# ---------------------------------------------------------------- checksums, headers


@dataclasses.dataclass(frozen=True)
class Outer:
    """The outer IPv4 header of one IPIP frame, field by field."""

    version: int
    ihl: int
    tos: int
    total_length: int
    ident: int
    df: bool
    mf: bool
    frag_offset: int
    ttl: int
    proto: int
    checksum_ok: bool
    src: str
    dst: str
    inner: bytes  # the whole inner packet

    @property
    def ecn(self) -> int:
        return self.tos & 3

    @property
    def inner_tos(self) -> int:
        return self.inner[1]

    @property
    def inner_ttl(self) -> int:
        return self.inner[8]

    @property
    def inner_len(self) -> int:
        return struct.unpack("!H", self.inner[2:4])[0]


def parse_ipip(frame: bytes) -> Outer | None:
    """The outer header of an Ethernet frame carrying IPv4 protocol 4, else None."""
    if len(frame) < 14 + 40 or frame[12:14] != b"\x08\x00":
        return None
    ip = frame[14:]
    ihl = (ip[0] & 0x0F) * 4
    if ip[9] != IPPROTO_IPIP or len(ip) < ihl + 20:
        return None
    tot, ident, frag = struct.unpack("!HHH", ip[2:8])
    return Outer(
        version=ip[0] >> 4, ihl=ip[0] & 0x0F, tos=ip[1], total_length=tot, ident=ident,
        df=bool(frag & 0x4000), mf=bool(frag & 0x2000), frag_offset=frag & 0x1FFF, ttl=ip[8],
        proto=ip[9], checksum_ok=inet_checksum(ip[:ihl]) == 0,
        src=socket.inet_ntoa(ip[12:16]), dst=socket.inet_ntoa(ip[16:20]), inner=bytes(ip[ihl:tot]))


def ipv4(frame: bytes) -> bytes | None:
    """The IPv4 packet in an Ethernet frame, else None."""
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        return None
    return frame[14:]


# ---------------------------------------------------------------- capture and send


class Sniffer:
    """Every frame on one interface of a namespace, both directions, from the
    moment it is created.  wait_for() scans what was seen so far and then
    keeps reading; nothing is thrown away, so several expectations can be
    checked in any order."""

    def __init__(self, ns: str, ifname: str) -> None:
        self.sock = kernelvm.netns_socket(ns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind((ifname, 0))
        self.frames: list[tuple[int, bytes]] = []  # (sll_pkttype, frame)

    def _read(self, timeout: float) -> bool:
        r, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
        if not r:
            return False
        while True:
            try:
                data, addr = self.sock.recvfrom(65535, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return True
            self.frames.append((addr[2], data))

    def wait_for(self, pred: Callable[[bytes], bool], timeout: float = 5.0, count: int = 1) -> list[bytes]:
        """The first `count` frames satisfying pred (fewer if the time runs out)."""
        deadline = time.monotonic() + timeout
        while True:
            hits = [f for _, f in self.frames if pred(f)]
            if len(hits) >= count:
                return hits[:count]
            left = deadline - time.monotonic()
            if left <= 0:
                return hits
            self._read(left)

    def settle(self, seconds: float = 0.3) -> None:
        """Read whatever arrives for a little while."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self._read(left)

    def all(self, pred: Callable[[bytes], bool]) -> list[bytes]:
        return [f for _, f in self.frames if pred(f)]

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Sniffer:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def send_ip(ns: str, packet: bytes) -> None:
    """Send a complete IPv4 packet (our header, IP_HDRINCL) from namespace ns,
    routed by its destination.  The kernel fills in the total length and the
    header checksum, and an ID only where ours is 0.  IP_PMTUDISC_PROBE: the
    packet leaves as built even when the namespace has learnt a smaller path
    MTU (from an earlier test's frag-needed)."""
    dst = socket.inet_ntoa(packet[16:20])
    s = kernelvm.netns_socket(ns, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    try:
        s.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_PROBE)
        s.sendto(packet, (dst, 0))
    finally:
        s.close()


def send_frame(ns: str, ifname: str, frame: bytes) -> None:
    """Send an Ethernet frame as built out of ifname in namespace ns (a
    bridge port: to the one device behind it, whatever its MACs say)."""
    s = kernelvm.netns_socket(ns, socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        s.bind((ifname, 0))
        s.send(frame)
    finally:
        s.close()


def icmp_socket(ns: str) -> socket.socket:
    """A raw ICMP socket in ns (sees every ICMP message the namespace receives)."""
    s = kernelvm.netns_socket(ns, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    s.setblocking(False)
    return s


def recv_icmp(s: socket.socket, pred: Callable[[bytes], bool], timeout: float) -> bytes | None:
    """The first IPv4 packet (with header) on raw ICMP socket s satisfying pred."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([s], [], [], left)[0]:
            break
        while True:
            try:
                pkt = s.recv(65535)
            except BlockingIOError:
                break
            if pred(pkt):
                return pkt
    return None


def unique_id() -> int:
    return secrets.randbelow(0xFFFE) + 1


# ---------------------------------------------------------------- the VM


def vm_run(vm: KernelVM, cmd: str, timeout: float = 60) -> str:
    """vm.run for idempotent commands, tried twice: under heavy host CPU
    contention (load 9 on 2 cores) one command has been seen to get no answer
    within the 45 s the channel waits, while the next one ran normally."""
    try:
        return vm.run(cmd, timeout=timeout)
    except TimeoutError:
        return vm.run(cmd, timeout=timeout)


def vm_ipext(vm: KernelVM) -> dict[str, int]:
    """IpExt counters of the VM (/proc/net/netstat): InNoECTPkts, InECT0Pkts, ..."""
    out = vm_run(vm, "cat /proc/net/netstat")
    lines = [line.split() for line in out.splitlines() if line.startswith("IpExt:")]
    names, values = lines[0][1:], lines[1][1:]
    return dict(zip(names, map(int, values)))


IPEXT_ECN = {NOT_ECT: "InNoECTPkts", ECT1: "InECT1Pkts", ECT0: "InECT0Pkts", CE: "InCEPkts"}


def vm_dev_stats(vm: KernelVM, dev: str) -> dict[str, int]:
    out = vm_run(vm, f"cd /sys/class/net/{dev}/statistics && for f in *; do echo $f $(cat $f); done")
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


# ---------------------------------------------------------------- the lab


@dataclasses.dataclass
class Lab:
    tb: Testbed
    node: Node
    pod: Pod
    sw: str          # switch namespace
    br: str          # bridge in sw, GATEWAY
    tap: str         # the VM's NIC, a port of br
    uplink: str      # n0's underlay peer, a port of br
    vm: KernelVM
    node_mac: str
    daemon: TunnelProcess | None = None
    tunnel_opts: dict[str, Any] = dataclasses.field(default_factory=dict)
    _vm_state: tuple | None = None  # the last vm_tunnel() options, None when unknown

    def start_daemon(self, **tunnel: Any) -> TunnelProcess:
        """(Re)start ipipfast on n0 with these tunnel options (restart only when
        they differ from the running daemon's)."""
        if self.daemon is not None and self.daemon.proc.poll() is None and tunnel == self.tunnel_opts:
            return self.daemon
        self.stop_daemon()
        # --remove-device: the next start may ask for other TUN settings (workers=2), which
        # a persistent device from this one would refuse.
        d = TunnelProcess(self.tb, self.node, self.tb.node_config(self.node, **tunnel), args=["--remove-device"])
        try:
            d.wait_ready()
            wait_until(lambda: d.status()["next_hops"].get(VM_NODE) == self.vm.mac, 10,
                       "ipipfast resolving the VM's MAC")
        except BaseException:
            d.stop()
            raise
        self.daemon, self.tunnel_opts = d, tunnel
        return d

    def stop_daemon(self) -> None:
        """Stop ipipfast; its directory (config, status, log) is removed when it
        exited cleanly and kept for a post-mortem otherwise."""
        if self.daemon is not None:
            d, self.daemon = self.daemon, None
            if d.stop() == 0:
                shutil.rmtree(d.dir, ignore_errors=True)

    def counters(self) -> dict[str, int]:
        assert self.daemon is not None
        return self.daemon.counters()

    def vm_tunnel(self, *, ttl: int = 0, tos: int | str = 0, pmtudisc: bool = False) -> None:
        """Set the options of the VM's tunl0 (ioctl SIOCCHGTUNNEL on the fallback
        device) and forget cached PMTUs; nothing to do when they are already set
        and nothing was learnt since.  ttl 0 is "inherit": iproute2's `ip tunnel
        change ... ttl inherit` leaves the old TTL in place."""
        state = (ttl, str(tos), pmtudisc)
        if state == self._vm_state:
            return
        self._vm_state = None
        disc = "pmtudisc" if pmtudisc else "nopmtudisc"
        vm_run(self.vm, f"ip tunnel change tunl0 mode ipip ttl {ttl} tos {tos} {disc} && ip route flush cache")
        self._vm_state = state

    def vm_dirty(self) -> None:
        """The VM may have learnt something (a PMTU): the next vm_tunnel() flushes."""
        self._vm_state = None

    def uplink_sniffer(self) -> Sniffer:
        """Frames to and from the ipipfast node."""
        return Sniffer(self.sw, self.uplink)

    def tap_sniffer(self) -> Sniffer:
        """Frames to and from the VM."""
        return Sniffer(self.sw, self.tap)

    def pod_sniffer(self) -> Sniffer:
        return Sniffer(self.pod.name, "eth0")


def _setup_vm(vm: KernelVM) -> None:
    # Only IPv4 in 198.18.0.0/15 on the segment (the TAP is still down).
    vm_run(vm, "for k in all default eth0; do sysctl -qw net.ipv6.conf.$k.disable_ipv6=1 || exit 1; done")
    vm.setup_ipip(pod_ip=VM_POD)
    # Calico puts the tunnel address on tunl0 for source selection; a route src does the same.
    vm_run(vm, f"ip route replace {IPF_POD_CIDR} via {IPF_NODE} dev tunl0 onlink src {VM_POD}")


@contextmanager
def open_lab(artifacts: kernelvm.Artifacts) -> Iterator[Lab]:
    tb = Testbed(nodes=2, pods_per_node=1, profile="wire")
    vm: KernelVM | None = None
    lab: Lab | None = None
    with tb:
        try:
            n0, n1 = tb.nodes
            p = tb.prefix
            sw, br, tap, uplink = f"{p}-sw", f"{p}br", f"{p}tap", n1.interface
            tb.namespaces.append(sw)  # removed at teardown (also swept by prefix)
            netns.create(sw)
            tb.sysctls(sw, {"net.ipv6.conf.all.disable_ipv6": "1", "net.ipv6.conf.default.disable_ipv6": "1",
                            "net.ipv4.conf.all.rp_filter": "0", "net.ipv4.conf.default.rp_filter": "0",
                            "net.ipv4.ip_forward": "0"})
            # n1's end of n0's underlay veth becomes a bridge port in the switch namespace.
            ipr1 = tb.ipr(n1)
            ipr1.link("set", index=ipr1.link_lookup(ifname=uplink)[0], net_ns_fd=sw)
            ipr = tb.ipr(sw)
            ipr.link("set", index=1, state="up")
            ipr.link("add", ifname=br, kind="bridge")
            bri = ipr.link_lookup(ifname=br)[0]
            upi = ipr.link_lookup(ifname=uplink)[0]
            ipr.link("set", index=upi, master=bri, state="up")
            kernelvm.create_tap(sw, tap)
            tapi = ipr.link_lookup(ifname=tap)[0]
            # Down until the VM's IPv6 is off: nothing but IPv4 ever crosses the bridge.
            ipr.link("set", index=tapi, master=bri, state="down")
            ipr.addr("add", index=bri, address=GATEWAY, prefixlen=PREFIXLEN)
            ipr.link("set", index=bri, state="up")
            # What the switch namespace sends to a pod CIDR goes through the *other*
            # node's tunnel: n0's pods through the VM's tunl0, the VM's through ipipfast.
            ipr.route("add", dst=IPF_POD_CIDR, gateway=VM_NODE)
            ipr.route("add", dst=VM_POD_CIDR, gateway=IPF_NODE)

            vm = KernelVM(sw, tap, VM_NODE, PREFIXLEN, artifacts=artifacts, name="ipfinterop").start()
            _setup_vm(vm)
            ipr.link("set", index=tapi, state="up")

            # The Testbed's blackhole for n1's pod CIDR is the VM's; add it if that ever changes.
            routes = tb.ipr(n0).get_routes(type="blackhole")
            if not any(r.get_attr("RTA_DST") == VM_POD_CIDR.split("/")[0] and r["dst_len"] == 24 for r in routes):
                tb.ipr(n0).route("add", type="blackhole", dst=VM_POD_CIDR, priority=BLACKHOLE_METRIC)
            link = tb.ipr(n0).get_links(ifname=n0.interface)[0]
            lab = Lab(tb=tb, node=n0, pod=n0.pods[0], sw=sw, br=br, tap=tap, uplink=uplink, vm=vm,
                      node_mac=link.get_attr("IFLA_ADDRESS"))
            lab.start_daemon()
            yield lab
        finally:
            if lab is not None:
                lab.stop_daemon()
            if vm is not None:
                vm.close()


def describe(frames: list[bytes]) -> str:
    """A short description of the last frames, for assertion messages."""
    out = []
    for f in frames[-20:]:
        o = parse_ipip(f)
        ip = ipv4(f)
        if o is not None:
            out.append(f"IPIP {o.src}->{o.dst} tos {o.tos:#x} ttl {o.ttl} len {o.total_length} "
                       f"[{socket.inet_ntoa(o.inner[12:16])}->{socket.inet_ntoa(o.inner[16:20])} "
                       f"proto {o.inner[9]} tos {o.inner_tos:#x}]")
        elif ip is not None:
            out.append(f"{socket.inet_ntoa(ip[12:16])}->{socket.inet_ntoa(ip[16:20])} proto {ip[9]} len {len(ip)}")
        else:
            out.append(f"ethertype {f[12:14].hex()}")
    return "; ".join(out) or "no frames"
