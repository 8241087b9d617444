"""Network-namespace testbed with the topology Calico's IPIP mode builds.

Nodes are namespaces on a shared underlay (198.18.0.0/24); pods are namespaces
hanging off their node by a `cali*` veth, Calico style (pod /32, gateway
169.254.1.1 answered by proxy ARP). Every namespace the testbed makes is named
after a per-run prefix and removed at teardown, whatever happened before.
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import os
import re
import secrets
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pyroute2 import IPRoute, netns
from pyroute2.ethtool import Ethtool
from pyroute2.netns import NETNS_RUN_DIR

POD_GATEWAY = "169.254.1.1"
UNDERLAY_GATEWAY = "198.18.0.1"
UNDERLAY_PREFIXLEN = 24
ROUTE_METRIC = 100
BLACKHOLE_METRIC = 4000

_CLONE_NEWNS = 0x00020000
_CLONE_NEWNET = 0x40000000
_MS_REC = 0x4000
_MS_SLAVE = 1 << 19
_MNT_DETACH = 2
_RTNH_F_ONLINK = 4
_SCOPE_LINK = 253
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def _enter_netns(fd: int) -> None:
    """Join a netns in a fresh child; also remount /sys like `ip netns exec`,
    so /sys/class/net and tools reading it see the namespace's interfaces."""
    _libc_check(_libc.setns(fd, _CLONE_NEWNET), "setns")
    _libc_check(_libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    # Keep our /sys mount private so the host's /sys is left alone.
    _libc_check(_libc.mount(b"none", b"/", None, _MS_REC | _MS_SLAVE, None), "mount --make-rslave /")
    _libc.umount2(b"/sys", _MNT_DETACH)  # fails only if nothing was mounted there: fine
    _libc_check(_libc.mount(b"sysfs", b"/sys", b"sysfs", 0, None), "mount sysfs")


def _child_env(env: dict[str, str] | None) -> dict[str, str]:
    """Let `python -m ipipfast...` work in the child from any cwd."""
    if env is not None:
        return env
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    return env


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
    ) -> None:
        if not 2 <= nodes <= 200 or not 1 <= pods_per_node <= 200:
            raise ValueError("need 2..200 nodes and 1..200 pods per node")
        if profile not in ("veth", "wire"):
            raise ValueError(f"profile must be 'veth' or 'wire', not {profile!r}")
        self.prefix = prefix or "ipf" + secrets.token_hex(3)[:5]
        # `{prefix}b{index}` must fit IFNAMSIZ (15 chars).
        if not re.fullmatch(r"[a-z][a-z0-9]{1,9}", self.prefix):
            raise ValueError(f"prefix {self.prefix!r}: 2..10 chars of [a-z0-9], starting with a letter")
        self.n_nodes, self.pods_per_node, self.profile = nodes, pods_per_node, profile
        self.pod_mtu, self.underlay_mtu, self.gso_max_size = pod_mtu, underlay_mtu, gso_max_size
        self.nodes: list[Node] = []
        self.namespaces: list[str] = []  # creation order
        self._ipr: dict[str, IPRoute] = {}
        self._procs: list[subprocess.Popen] = []
        self._plain: list[tuple[int, int]] = []  # (node, remote node) indices
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
        self._plain.clear()

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
        p = self.prefix
        bridged = self.n_nodes > 2
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
            name = self._netns(f"{p}-n{i}", {"net.ipv4.ip_forward": "1"})
            node = Node(name=name, index=i, ip=f"198.18.0.{10 + i}", prefixlen=UNDERLAY_PREFIXLEN,
                        interface=f"{p}u{i}", pod_cidr=f"198.19.{i}.0/24", gateway=UNDERLAY_GATEWAY)
            self.nodes.append(node)
            if bridged:
                self._veth(ul, f"{p}b{i}", name, node.interface, self.underlay_mtu)
                ipr = self.ipr(ul)
                ipr.link("set", index=ipr.link_lookup(ifname=f"{p}b{i}")[0], master=br, state="up")
            elif i == 1:
                self._veth(self.nodes[0].name, self.nodes[0].interface, name, node.interface, self.underlay_mtu)

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
        """Route every remote pod CIDR via its node on the underlay (metric 100,
        beating the blackholes): the "no tunnel" baseline."""
        for node in self.nodes:
            ipr = self.ipr(node.name)
            oif = ipr.link_lookup(ifname=node.interface)[0]
            for other in self.nodes:
                if other is not node and (node.index, other.index) not in self._plain:
                    ipr.route("add", dst=other.pod_cidr, gateway=other.ip, oif=oif, priority=ROUTE_METRIC)
                    self._plain.append((node.index, other.index))

    def remove_plain_routes(self) -> None:
        while self._plain:
            node, other = (self.nodes[i] for i in self._plain.pop())
            self.ipr(node).route("del", dst=other.pod_cidr, gateway=other.ip, priority=ROUTE_METRIC)

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

    def node_config(self, node: Node, *, name: str | None = None, mode: str = "Always", **tunnel: Any) -> dict:
        """The ipipfast daemon config for `node`: tunnel to every other node."""
        return {
            "node": {"ip": node.ip, "interface": node.interface},
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

    def popen(self, ns: NsRef, argv: list[str], **kw: Any) -> subprocess.Popen:
        """Start argv inside `ns`; it is killed (by PID) at teardown."""
        fd = os.open(os.path.join(NETNS_RUN_DIR, _ns_name(ns)), os.O_RDONLY | os.O_CLOEXEC)
        try:
            proc = subprocess.Popen(argv, preexec_fn=lambda: _enter_netns(fd),
                                    env=_child_env(kw.pop("env", None)), **kw)
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
        """Run `python <args>` (e.g. "-m", "ipipfast.traffic", "ping", ...) inside `ns`."""
        return self.run(ns, [sys.executable, *args], **kw)
