"""Network-namespace testbed with the topology Calico's IPIP mode builds.

Nodes are namespaces on an underlay; pods are namespaces hanging off their node
by a `cali*` veth, Calico style (pod /32, gateway 169.254.1.1 answered by proxy
ARP). Every namespace the testbed makes is named after a per-run prefix and
removed at teardown, whatever happened before.

Two underlays:

- "l2" (default): one shared subnet, 198.18.0.0/24, node i at 198.18.0.(10+i):
  a veth pair for two nodes, a bridge in `{prefix}-ul` for more. With
  `control_plane`, a host namespace `{prefix}-cp` at 198.18.0.2 sits on the
  bridge too (then always there, even for two nodes): where a datastore such
  as etcd runs; `control_plane_link(False)` cuts it off (a silent partition).
- "routed": every underlay subnet 198.18.X.0/24 sits behind a router namespace
  `{prefix}-rt` (ip_forward=1) that owns 198.18.X.1, the default gateway of the
  nodes in it. By default node i is alone in subnet X = i+1; `subnets` picks X
  per node, so nodes can share one (Calico CrossSubnet). Nodes of a subnet get
  198.18.X.10, .11, ... in node order. The router's interface on subnet X
  (`router_links[X]`) is the veth end facing the node, or a bridge in the router
  namespace when several nodes share X (they then reach each other directly,
  never through the router). `router_mtu` is the router's forwarding MTU toward
  every subnet (a route MTU, so its interfaces still take full-size frames in):
  a larger DF packet gets ICMP "fragmentation needed" (3/4) with that next-hop
  MTU. The router sends its ICMP errors unthrottled (icmp_ratelimit=0,
  icmp_ratemask=0): fragmentation needed, TTL exceeded (11/0) for packets that
  reach it with TTL 1, host unreachable (3/1) for destinations made
  unreachable by `router_unreachable(cidr)`. (Only net unreachable, 3/0, for
  addresses it has no route to, stays throttled by the kernel: 5 per sender,
  then 1/s.) `add_plain_routes()` also teaches the router every pod CIDR;
  without them it knows none. `move_node()` moves a node into another subnet
  (a new address, the same interface).

Processes started in a namespace see a private /run/ipipfast (`run_dir`),
so two nodes' daemons never meet in the one filesystem they share.
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import ipaddress
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute, netns
from pyroute2.ethtool import Ethtool
from pyroute2.netns import NETNS_RUN_DIR

from ipipfast.control import RUN_DIR

POD_GATEWAY = "169.254.1.1"
UNDERLAY_GATEWAY = "198.18.0.1"
CONTROL_PLANE_IP = "198.18.0.2"
UNDERLAY_PREFIXLEN = 24
UNDERLAYS = ("l2", "routed")
ROUTE_METRIC = 100
BLACKHOLE_METRIC = 4000

_CLONE_NEWNS = 0x00020000
_CLONE_NEWNET = 0x40000000
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_SLAVE = 1 << 19
_MNT_DETACH = 2
_RTNH_F_ONLINK = 4
_SCOPE_LINK = 253
_PROTO_KERNEL = 2
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass
class Pod:
    name: str  # namespace
    ip: str
    node: int  # index of its Node
    host_veth: str  # the `cali*` end, inside the node namespace


@dataclass
class Node:
    name: str  # namespace
    index: int
    ip: str
    prefixlen: int
    interface: str  # underlay interface inside the node namespace
    pod_cidr: str
    gateway: str  # next hop of the node's default route on the underlay
    pods: list[Pod] = field(default_factory=list)


NsRef = str | Node | Pod


def _ns_name(ns: NsRef) -> str:
    return ns if isinstance(ns, str) else ns.name


def _libc_check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _enter_netns(fd: int, run_dir: bytes) -> None:
    """Join a netns in a fresh child; also remount /sys like `ip netns exec`,
    so /sys/class/net and tools reading it see the namespace's interfaces,
    and put run_dir on /run/ipipfast."""
    _libc_check(_libc.setns(fd, _CLONE_NEWNET), "setns")
    _libc_check(_libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    # Keep our mounts private so the host's /sys and /run are left alone.
    _libc_check(_libc.mount(b"none", b"/", None, _MS_REC | _MS_SLAVE, None), "mount --make-rslave /")
    _libc.umount2(b"/sys", _MNT_DETACH)  # fails only if nothing was mounted there: fine
    _libc_check(_libc.mount(b"sysfs", b"/sys", b"sysfs", 0, None), "mount sysfs")
    _libc_check(_libc.mount(run_dir, bytes(RUN_DIR), None, _MS_BIND, None), f"bind-mount {RUN_DIR}")


def _write_sysctls(values: dict[str, str]) -> None:
    for key, value in values.items():
        with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
            f.write(value)


def _offloads_off(ifnames: list[str]) -> None:
    """TSO/GSO/GRO off like a plain physical NIC. pyroute2's Ethtool has no
    netns support, so this runs in a child that joined the namespace."""
    with Ethtool() as eth:
        for ifname in ifnames:
            feats = eth.get_features(ifname)
            for name, feat in feats.features.items():
                # Every TSO flavour (6.18 added tx-tcp-accecn-segmentation), GSO, GRO.
                tso = name.startswith("tx-tcp") and name.endswith("-segmentation")
                if tso or name in ("tx-generic-segmentation", "rx-gro"):
                    feat.enable = False
            eth.set_features(ifname, feats)


class NetnsCommandError(subprocess.CalledProcessError):
    """A CalledProcessError whose message also names the namespace and stderr."""

    def __init__(self, ns: str, returncode: int, cmd: list[str], output: Any, stderr: Any) -> None:
        super().__init__(returncode, cmd, output, stderr)
        self.ns = ns

    def __str__(self) -> str:
        return f"{super().__str__()} (netns {self.ns}): {self.stderr!r}"


class Testbed:
    """N nodes, each with `pods_per_node` pods; use as a context manager."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(
        self,
        nodes: int = 2,
        pods_per_node: int = 1,
        profile: str = "veth",
        pod_mtu: int = 1480,
        underlay_mtu: int = 1500,
        prefix: str | None = None,
        gso_max_size: int | None = None,
        underlay: str = "l2",
        router_mtu: int | None = None,
        subnets: list[int] | None = None,
        control_plane: bool = False,
    ) -> None:
        if not 2 <= nodes <= 200 or not 1 <= pods_per_node <= 200:
            raise ValueError("need 2..200 nodes and 1..200 pods per node")
        if profile not in ("veth", "wire"):
            raise ValueError(f"profile must be 'veth' or 'wire', not {profile!r}")
        if underlay not in UNDERLAYS:
            raise ValueError(f"underlay must be 'l2' or 'routed', not {underlay!r}")
        if underlay != "routed" and (router_mtu is not None or subnets is not None):
            raise ValueError("router_mtu and subnets need underlay='routed'")
        if control_plane and underlay != "l2":
            raise ValueError("control_plane needs underlay='l2'")
        if router_mtu is not None and not 576 <= router_mtu <= underlay_mtu:
            raise ValueError(f"router_mtu must be 576..underlay_mtu ({underlay_mtu}), not {router_mtu}")
        if subnets is not None and (len(subnets) != nodes or not all(0 <= x <= 255 for x in subnets)):
            raise ValueError(f"subnets needs one number 0..255 (198.18.X.0/24) per node, not {subnets!r}")
        self.prefix = prefix or "ipf" + secrets.token_hex(3)[:5]
        # `{prefix}b{index}` must fit IFNAMSIZ (15 chars).
        if not re.fullmatch(r"[a-z][a-z0-9]{1,9}", self.prefix):
            raise ValueError(f"prefix {self.prefix!r}: 2..10 chars of [a-z0-9], starting with a letter")
        self.n_nodes, self.pods_per_node, self.profile = nodes, pods_per_node, profile
        self.pod_mtu, self.underlay_mtu, self.gso_max_size = pod_mtu, underlay_mtu, gso_max_size
        self.underlay, self.router_mtu = underlay, router_mtu
        self.subnets = list(subnets) if subnets is not None else [i + 1 for i in range(nodes)]
        # Routed underlay: the router namespace and its interface on each subnet X.
        self.router: str | None = None
        self.router_links: dict[int, str] = {}
        self.want_control_plane = control_plane
        self.control_plane: str | None = None  # its namespace, once built
        self.nodes: list[Node] = []
        self.namespaces: list[str] = []  # creation order
        self._ipr: dict[str, IPRoute] = {}
        self._procs: list[subprocess.Popen] = []
        self._plain: list[tuple[int, int, str]] = []  # (node, remote node) indices, gateway
        self._router_plain: list[int] = []  # nodes whose pod CIDR the router routes
        self._run_root: Path | None = None  # holds each namespace's run_dir
        self._owner = os.getpid()

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self) -> Testbed:
        return self.setup()

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def setup(self) -> Testbed:
        atexit.register(self.teardown)
        try:
            self._build()
        except BaseException:
            self.teardown()
            raise
        return self

    def teardown(self) -> None:
        """Kill our processes, close our sockets, delete our namespaces (links
        inside them go with them). Idempotent; a no-op in forked children."""
        if os.getpid() != self._owner:
            return
        atexit.unregister(self.teardown)
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=3)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._procs.clear()
        for ipr in self._ipr.values():
            ipr.close()  # an open netlink socket would keep its netns alive
        self._ipr.clear()
        # Also sweep names a failed setup made but did not record.
        ours = [n for n in netns.listnetns() if n.startswith(self.prefix + "-")]
        for name in reversed(self.namespaces + [n for n in ours if n not in self.namespaces]):
            if os.path.exists(os.path.join(NETNS_RUN_DIR, name)):
                netns.remove(name)
        self.namespaces.clear()
        self.control_plane = None
        self._plain.clear()
        self._router_plain.clear()
        if self._run_root is not None:
            shutil.rmtree(self._run_root, ignore_errors=True)
            self._run_root = None

    # -- building ----------------------------------------------------------

    def _netns(self, name: str, sysctls: dict[str, str]) -> str:
        self.namespaces.append(name)
        netns.create(name)
        # Before any link exists, so new interfaces inherit the defaults:
        # no IPv6 (every address must stay in 198.18.0.0/15), no rp_filter
        # (a new netns copies the host's IPv4 conf/all and conf/default).
        self.sysctls(name, {
            "net.ipv6.conf.all.disable_ipv6": "1",
            "net.ipv6.conf.default.disable_ipv6": "1",
            "net.ipv4.conf.all.rp_filter": "0",
            "net.ipv4.conf.default.rp_filter": "0",
            **sysctls,
        })
        self.ipr(name).link("set", index=1, state="up")  # lo
        return name

    def _build(self) -> None:
        if self.underlay == "routed":
            self._build_routed()
        else:
            self._build_l2()
        for node in self.nodes:
            ipr = self.ipr(node.name)
            idx = ipr.link_lookup(ifname=node.interface)[0]
            ipr.addr("add", index=idx, address=node.ip, prefixlen=node.prefixlen)
            ipr.link("set", index=idx, state="up")
            # Without a default route proxy ARP has no route for 169.254.1.1 and stays silent.
            ipr.route("add", dst="0.0.0.0/0", gateway=node.gateway, oif=idx, flags=_RTNH_F_ONLINK)
            # Like Calico: a dead tunnel must drop remote pod traffic, not leak it.
            for other in self.nodes:
                if other is not node:
                    ipr.route("add", type="blackhole", dst=other.pod_cidr, priority=BLACKHOLE_METRIC)
            for j in range(self.pods_per_node):
                self._pod(node, j)
            if self.profile == "wire":
                self.in_netns(node.name, _offloads_off, [node.interface])

    def _node(self, i: int, ip: str, gateway: str) -> Node:
        name = self._netns(f"{self.prefix}-n{i}", {"net.ipv4.ip_forward": "1"})
        node = Node(name=name, index=i, ip=ip, prefixlen=UNDERLAY_PREFIXLEN, interface=f"{self.prefix}u{i}",
                    pod_cidr=f"198.19.{i}.0/24", gateway=gateway)
        self.nodes.append(node)
        return node

    def _build_routed(self) -> None:
        p = self.prefix
        self.nodes = []
        self.router = rt = self._netns(f"{p}-rt", {
            "net.ipv4.ip_forward": "1",
            # Every ICMP error, unthrottled: the per-destination token bucket
            # off, and no type subject to the per-netns global limit.
            "net.ipv4.icmp_ratelimit": "0",
            "net.ipv4.icmp_ratemask": "0",
        })
        ipr = self.ipr(rt)
        members: dict[int, list[int]] = {}
        for i, x in enumerate(self.subnets):
            members.setdefault(x, []).append(i)
        ports = []  # router-side links, for the wire profile
        for x, idxs in members.items():
            link = self.router_links[x] = f"{p}r{x}"
            if len(idxs) > 1:
                ipr.link("add", ifname=link, kind="bridge", mtu=self.underlay_mtu)
            for rank, i in enumerate(idxs):
                node = self._node(i, f"198.18.{x}.{10 + rank}", f"198.18.{x}.1")
                if len(idxs) == 1:
                    self._veth(rt, link, node.name, node.interface, self.underlay_mtu)
                else:
                    self._veth(rt, f"{p}b{i}", node.name, node.interface, self.underlay_mtu)
                    port, bridge = (ipr.link_lookup(ifname=n)[0] for n in (f"{p}b{i}", link))
                    ipr.link("set", index=port, master=bridge, state="up")
                    ports.append(f"{p}b{i}")
            ports.append(link)
            idx = ipr.link_lookup(ifname=link)[0]
            ipr.addr("add", index=idx, address=f"198.18.{x}.1", prefixlen=UNDERLAY_PREFIXLEN)
            ipr.link("set", index=idx, state="up")
            if self.router_mtu is not None:
                # The connected route again, now with the router's egress MTU:
                # forwarding honours a route MTU over the device's.
                ipr.route("replace", dst=f"198.18.{x}.0/{UNDERLAY_PREFIXLEN}", oif=idx, scope=_SCOPE_LINK,
                          proto=_PROTO_KERNEL, prefsrc=f"198.18.{x}.1", metrics={"mtu": self.router_mtu})
        self.nodes.sort(key=lambda n: n.index)
        if self.profile == "wire":
            self.in_netns(rt, _offloads_off, ports)
        # Where router_unreachable() points: a link with nobody on it (a bridge
        # without ports), whose ARP gives up after one 10 ms probe.
        nx = f"{p}nx"
        ipr.link("add", ifname=nx, kind="bridge", mtu=self.underlay_mtu)
        ipr.link("set", index=ipr.link_lookup(ifname=nx)[0], state="up")
        self.sysctls(rt, {f"net.ipv4.neigh.{nx}.{key}": value for key, value in (
            ("mcast_solicit", "1"), ("ucast_solicit", "0"), ("app_solicit", "0"), ("retrans_time_ms", "10"))})

    def _build_l2(self) -> None:
        p = self.prefix
        bridged = self.n_nodes > 2 or self.want_control_plane
        self.nodes = []
        if bridged:
            ul = self._netns(f"{p}-ul", {"net.ipv4.ip_forward": "0"})
            ipr = self.ipr(ul)
            ipr.link("add", ifname=f"{p}br", kind="bridge", mtu=self.underlay_mtu)
            br = ipr.link_lookup(ifname=f"{p}br")[0]
            # The nodes' default gateway lives here so proxy ARP has a real next hop.
            ipr.addr("add", index=br, address=UNDERLAY_GATEWAY, prefixlen=UNDERLAY_PREFIXLEN)
            ipr.link("set", index=br, state="up")

        for i in range(self.n_nodes):
            node = self._node(i, f"198.18.0.{10 + i}", UNDERLAY_GATEWAY)
            if bridged:
                self._veth(ul, f"{p}b{i}", node.name, node.interface, self.underlay_mtu)
                ipr = self.ipr(ul)
                ipr.link("set", index=ipr.link_lookup(ifname=f"{p}b{i}")[0], master=br, state="up")
            elif i == 1:
                self._veth(self.nodes[0].name, self.nodes[0].interface, node.name, node.interface, self.underlay_mtu)

        if self.want_control_plane:
            self.control_plane = cp = self._netns(f"{p}-cp", {"net.ipv4.ip_forward": "0"})
            self._veth(ul, f"{p}bcp", cp, f"{p}cp", self.underlay_mtu)
            ipr = self.ipr(ul)
            ipr.link("set", index=ipr.link_lookup(ifname=f"{p}bcp")[0], master=br, state="up")
            ipr = self.ipr(cp)
            idx = ipr.link_lookup(ifname=f"{p}cp")[0]
            ipr.addr("add", index=idx, address=CONTROL_PLANE_IP, prefixlen=UNDERLAY_PREFIXLEN)
            ipr.link("set", index=idx, state="up")

        if bridged and self.profile == "wire":
            self.in_netns(ul, _offloads_off, [f"{p}b{i}" for i in range(self.n_nodes)])

    def _veth(self, ns_a: str, if_a: str, ns_b: str, if_b: str, mtu: int, **extra: Any) -> None:
        self.ipr(ns_a).link("add", ifname=if_a, kind="veth", mtu=mtu, **extra,
                            peer={"ifname": if_b, "net_ns_fd": ns_b, "mtu": mtu, **extra})

    def _pod(self, node: Node, j: int) -> None:
        # Calico names host ends `cali` + 11 hex chars of a hash of the workload.
        host_veth = "cali" + hashlib.sha1(f"{self.prefix}/{node.index}/{j}".encode()).hexdigest()[:11]
        pod = Pod(name=f"{node.name}p{j}", ip=f"198.19.{node.index}.{2 + j}", node=node.index, host_veth=host_veth)
        self._netns(pod.name, {"net.ipv4.ip_forward": "0"})
        node.pods.append(pod)
        gso = {"gso_max_size": self.gso_max_size} if self.gso_max_size else {}
        self._veth(node.name, host_veth, pod.name, "eth0", self.pod_mtu, **gso)

        ipr = self.ipr(pod.name)
        eth0 = ipr.link_lookup(ifname="eth0")[0]
        ipr.addr("add", index=eth0, address=pod.ip, prefixlen=32)
        ipr.link("set", index=eth0, state="up")
        ipr.route("add", dst=f"{POD_GATEWAY}/32", oif=eth0, scope=_SCOPE_LINK)
        ipr.route("add", dst="0.0.0.0/0", gateway=POD_GATEWAY, oif=eth0)

        # As Calico does: proxy_delay=0, else the kernel holds each proxy ARP
        # reply for a random time up to 0.8 s.
        self.sysctls(node.name, {f"net.ipv4.conf.{host_veth}.proxy_arp": "1",
                                 f"net.ipv4.neigh.{host_veth}.proxy_delay": "0"})
        ipr = self.ipr(node.name)
        host = ipr.link_lookup(ifname=host_veth)[0]
        ipr.link("set", index=host, state="up")
        ipr.route("add", dst=f"{pod.ip}/32", oif=host, scope=_SCOPE_LINK)

    # -- plain routing baseline ----------------------------------------------

    def add_plain_routes(self) -> None:
        """The "no tunnel" baseline: every remote pod CIDR routed at metric 100,
        beating the blackholes. On the l2 underlay, via its node. On the routed
        one, as Calico's BGP mode across subnets (nodes peering with their
        top-of-rack router): the router learns every pod CIDR via its node, and
        a node routes a remote pod CIDR via its node when they share a subnet,
        else via its own router address (the route the router re-advertises)."""
        for node in self.nodes:
            ipr = self.ipr(node.name)
            oif = ipr.link_lookup(ifname=node.interface)[0]
            done = {other for n, other, _ in self._plain if n == node.index}
            for other in self.nodes:
                if other is not node and other.index not in done:
                    gateway = other.ip if self._same_subnet(node, other) else node.gateway
                    ipr.route("add", dst=other.pod_cidr, gateway=gateway, oif=oif, priority=ROUTE_METRIC)
                    self._plain.append((node.index, other.index, gateway))
        if self.router is not None:
            ipr = self.ipr(self.router)
            mtu = {"metrics": {"mtu": self.router_mtu}} if self.router_mtu is not None else {}
            for node in self.nodes:
                if node.index not in self._router_plain:
                    ipr.route("add", dst=node.pod_cidr, gateway=node.ip, priority=ROUTE_METRIC, **mtu)
                    self._router_plain.append(node.index)

    def remove_plain_routes(self) -> None:
        while self._plain:
            i, j, gateway = self._plain.pop()
            self.ipr(self.nodes[i]).route("del", dst=self.nodes[j].pod_cidr, gateway=gateway, priority=ROUTE_METRIC)
        while self._router_plain:
            node = self.nodes[self._router_plain.pop()]
            self.ipr(self.router).route("del", dst=node.pod_cidr, gateway=node.ip, priority=ROUTE_METRIC)

    def _same_subnet(self, a: Node, b: Node) -> bool:
        net = lambda n: ipaddress.ip_interface(f"{n.ip}/{n.prefixlen}").network  # noqa: E731
        return net(a) == net(b)

    # -- routed underlay -------------------------------------------------------

    def router_unreachable(self, cidr: str, remove: bool = False) -> None:
        """Make the router answer packets to `cidr` (inside 198.18.0.0/15) with
        ICMP host unreachable (3/1), one per packet, about 10 ms late, the way
        a router does for a dead host on an attached link: `cidr` is routed onto
        a link where nobody answers ARP. (An `unreachable` route would throttle:
        the kernel sends those errors at 5 per sender then 1/s, by host-wide
        sysctls a netns cannot change.) remove=True takes the route away again:
        then the router's default-less table answers net unreachable (3/0)."""
        if self.router is None:
            raise RuntimeError("router_unreachable needs underlay='routed'")
        net = ipaddress.ip_network(cidr)
        if not net.subnet_of(ipaddress.ip_network("198.18.0.0/15")):
            raise ValueError(f"{cidr}: the testbed only uses 198.18.0.0/15")
        ipr = self.ipr(self.router)
        nx = ipr.link_lookup(ifname=f"{self.prefix}nx")[0]
        ipr.route("del" if remove else "add", dst=str(net), oif=nx, scope=_SCOPE_LINK)

    def move_node(self, node: Node, subnet: int) -> None:
        """Moves a node that is alone in its subnet into `subnet`, which
        other nodes share, as a node that changes racks does: the router's end
        of its link leaves its old subnet for that subnet's bridge, and the
        node takes the next address there (198.18.X.(10 + nodes already in
        X)) and its gateway. Its interface stays (sockets bound to it too);
        a daemon configured with the old address needs a restart."""
        if self.router is None:
            raise RuntimeError("move_node needs underlay='routed'")
        old = self.subnets[node.index]
        if self.subnets.count(old) != 1 or self.subnets.count(subnet) < 2:
            raise ValueError(f"move_node moves a node alone in its subnet into one that two or more share, "
                             f"not {node.name} from 198.18.{old}.0/24 ({self.subnets.count(old)} nodes) "
                             f"to 198.18.{subnet}.0/24 ({self.subnets.count(subnet)})")
        rt = self.ipr(self.router)
        port, bridge = (rt.link_lookup(ifname=self.router_links[x])[0] for x in (old, subnet))
        rt.addr("del", index=port, address=f"198.18.{old}.1", prefixlen=UNDERLAY_PREFIXLEN)
        rt.link("set", index=port, master=bridge)
        del self.router_links[old]
        ip, gateway = f"198.18.{subnet}.{10 + self.subnets.count(subnet)}", f"198.18.{subnet}.1"
        ipr = self.ipr(node)
        idx = ipr.link_lookup(ifname=node.interface)[0]
        ipr.addr("del", index=idx, address=node.ip, prefixlen=node.prefixlen)
        ipr.addr("add", index=idx, address=ip, prefixlen=UNDERLAY_PREFIXLEN)
        ipr.route("replace", dst="0.0.0.0/0", gateway=gateway, oif=idx, flags=_RTNH_F_ONLINK)
        node.ip, node.gateway = ip, gateway
        self.subnets[node.index] = subnet

    # -- control plane -----------------------------------------------------------

    def control_plane_link(self, up: bool) -> None:
        """Connects (up) or cuts off the control-plane host at its bridge port:
        its packets are dropped there, nobody is told (no RST, no ICMP)."""
        if self.control_plane is None:
            raise RuntimeError("control_plane_link needs Testbed(control_plane=True)")
        ipr = self.ipr(f"{self.prefix}-ul")
        ipr.link("set", index=ipr.link_lookup(ifname=f"{self.prefix}bcp")[0], state="up" if up else "down")

    def underlay_link(self, node: Node, up: bool) -> None:
        """Takes a node's underlay interface down, or up again as a network
        manager brings a link back: with its default route, which IPv4
        flushed with the link (its address and subnet route come back by
        themselves)."""
        ipr = self.ipr(node)
        idx = ipr.link_lookup(ifname=node.interface)[0]
        ipr.link("set", index=idx, state="up" if up else "down")
        if up:
            ipr.route("replace", dst="0.0.0.0/0", gateway=node.gateway, oif=idx, flags=_RTNH_F_ONLINK)

    # -- helpers ---------------------------------------------------------------

    @property
    def pods(self) -> list[Pod]:
        return [pod for node in self.nodes for pod in node.pods]

    def ipr(self, ns: NsRef) -> IPRoute:
        """A cached rtnetlink handle inside `ns` (closed at teardown)."""
        name = _ns_name(ns)
        if name not in self._ipr:
            self._ipr[name] = IPRoute(netns=name, flags=0, groups=0)  # flags=0: never create a netns
        return self._ipr[name]

    def mac(self, ns: NsRef, ifname: str | None = None) -> str:
        """The MAC of ifname in ns (a node's: its underlay interface), as aa:bb:...."""
        if ifname is None:
            if not isinstance(ns, Node):
                raise ValueError("mac() needs the interface's name outside a node")
            ifname = ns.interface
        return self.ipr(ns).get_links(ifname=ifname)[0].get_attr("IFLA_ADDRESS")

    def node_config(self, node: Node, *, name: str | None = None, mode: str = "Always", **tunnel: Any) -> dict:
        """The ipipfast daemon config for `node`: tunnel to every other node."""
        return {
            "node": {"ip": f"{node.ip}/{node.prefixlen}", "interface": node.interface},
            "tunnel": {"name": name or f"{self.prefix}t{node.index}", "mode": mode, **tunnel},
            "routes": [{"cidr": o.pod_cidr, "via": o.ip} for o in self.nodes if o is not node],
        }

    def in_netns(self, ns: NsRef, fn: Callable[..., None], *args: Any) -> None:
        """Call fn(*args) in a forked child that joined `ns`: /proc/sys/net and
        new sockets follow the task's netns, and our own process stays put."""
        fd = os.open(os.path.join(NETNS_RUN_DIR, _ns_name(ns)), os.O_RDONLY | os.O_CLOEXEC)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                os.close(r)
                _libc_check(_libc.setns(fd, _CLONE_NEWNET), "setns")
                fn(*args)
                status = 0
            except BaseException as e:
                os.write(w, f"{type(e).__name__}: {e}".encode())
            finally:
                os._exit(status)  # never run the parent's atexit hooks here
        os.close(fd)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            err = f.read().decode(errors="replace")
        _, status = os.waitpid(pid, 0)
        if status != 0:
            raise RuntimeError(f"in netns {_ns_name(ns)}: {err or f'child status {status}'}")

    def sysctls(self, ns: NsRef, values: dict[str, str]) -> None:
        self.in_netns(ns, _write_sysctls, values)

    def sysctl(self, ns: NsRef, key: str, value: str) -> None:
        """Write /proc/sys/<key with dots as slashes> inside `ns`."""
        self.sysctls(ns, {key: value})

    def run_dir(self, ns: NsRef) -> Path:
        """The directory that processes in `ns` see as /run/ipipfast (a
        daemon's control socket is there), removed at teardown."""
        if self._run_root is None:
            RUN_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)  # the mount point
            self._run_root = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-run-"))
        path = self._run_root / _ns_name(ns)
        path.mkdir(mode=0o700, exist_ok=True)
        return path

    def popen(self, ns: NsRef, argv: list[str], **kw: Any) -> subprocess.Popen:
        """Start argv inside `ns`; it is killed (by PID) at teardown."""
        run_dir = bytes(self.run_dir(ns))
        fd = os.open(os.path.join(NETNS_RUN_DIR, _ns_name(ns)), os.O_RDONLY | os.O_CLOEXEC)
        try:
            proc = subprocess.Popen(argv, preexec_fn=lambda: _enter_netns(fd, run_dir), **kw)
        finally:
            os.close(fd)
        self._procs = [p for p in self._procs if p.poll() is None] + [proc]
        return proc

    def run(self, ns: NsRef, argv: list[str], timeout: float = 60, check: bool = True,
            **kw: Any) -> subprocess.CompletedProcess:
        """Run argv inside `ns` to completion; output captured as text by default."""
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        kw.setdefault("text", True)
        with self.popen(ns, argv, **kw) as proc:
            try:
                out, err = proc.communicate(timeout=timeout)
            except BaseException:
                proc.kill()
                proc.wait()
                raise
        if check and proc.returncode != 0:
            raise NetnsCommandError(_ns_name(ns), proc.returncode, argv, out, err)
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

    def python(self, ns: NsRef, *args: str, **kw: Any) -> subprocess.CompletedProcess:
        """Run `python <args>` (e.g. "-m", "ipipfast_lab.traffic", "ping", ...) inside `ns`."""
        return self.run(ns, [sys.executable, *args], **kw)
