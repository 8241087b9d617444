"""A real BIRD 2 (stock, Debian's bird2) on testbed nodes, programming the
routes into ipipfast's TUN as Calico's BIRD programs tunl0.

Calico's fork writes `<block> via <node> dev tunl0 proto bird onlink` through
its own `krt_tunnel` attribute, set in the kernel protocol's export filter.
Stock BIRD 2 says the same with three route attributes: `onlink = true`
(flags the next hop) and `ifname = "<tun>"` (an interface BIRD's device
protocol knows: the TUN must exist first), then `gw = bgp_next_hop`, last
because setting ifname clears the gateway. With the onlink flag, gw is taken
on that interface as it is; without it BIRD looks the address up on every
interface and finds it on the underlay: the route then lands silently as
`via <node> dev <underlay>`, the failure of Calico's fork without a tunl0
(projectcalico/bird#22). They go where krt_tunnel goes, the kernel
export filter: BIRD's table keeps the BGP route as learned, and a route once
installed that the kernel lost (its TUN went and came back) goes through the
filter again at the next kernel scan. A route the filter refused because the
TUN did not exist yet is not retried (until `birdc reload out kernel1`): the
TUN must exist before BIRD starts.

Like Calico's node-to-node mesh: iBGP in AS 64512 between every pair of nodes
(iBGP, Calico's default: by iBGP's rule a node passes on no route another node
told it, so each block is learned from its own node alone, next hop that node,
and a session shut down withdraws it instead of re-routing it through a third
node, as eBGP's re-advertising would), multihop with recursive next hops over
the underlay (so it also crosses the routed underlay's router), next hop self,
and each node's pod CIDR originated from a local blackhole (Calico's block),
which also goes into its kernel.

Each BIRD runs inside its node's namespace (started and killed by PID through
the Testbed), with its config, control socket and log in a per-testbed
directory; the session to node j is the protocol `n<j>` (birdc disable/enable).
"""
from __future__ import annotations

import ipaddress
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pyroute2.netlink.rtnl import rt_proto, rt_type
from pyroute2.netlink.rtnl.rtmsg import RTNH_F_ONLINK

from ipipfast.routes import Mode

from .daemons import NodeProcess, TunnelProcess
from .testbed import Node, Testbed

AS_NUMBER = 64512  # Calico's default AS for the node-to-node mesh
RTPROT_BIRD = rt_proto["bird"]  # 12, as Calico's BIRD routes show ("proto bird")
_MAIN_TABLE = 254


@dataclass(frozen=True)
class KernelRoute:
    """An IPv4 route of a node's main table, in the terms the tests compare."""
    cidr: str
    type: str = "unicast"  # or "blackhole", "unreachable", ...
    via: str | None = None
    dev: str | None = None
    onlink: bool = False


def kernel_routes(tb: Testbed, node: Node, proto: int = RTPROT_BIRD) -> set[KernelRoute]:
    """The routes of `proto` in the node's main table, read back over netlink."""
    ipr = tb.ipr(node)
    names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
    routes = set()
    for r in ipr.get_routes(family=socket.AF_INET, table=_MAIN_TABLE):
        if r["proto"] != proto:
            continue
        oif = r.get_attr("RTA_OIF")
        routes.add(KernelRoute(f"{r.get_attr('RTA_DST')}/{r['dst_len']}", rt_type[r["type"]],
                               r.get_attr("RTA_GATEWAY"), names.get(oif) if oif else None,
                               bool(r["flags"] & RTNH_F_ONLINK)))
    return routes


def wait_kernel_routes(tb: Testbed, node: Node, expected: set[KernelRoute], timeout: float = 30,
                       proto: int = RTPROT_BIRD) -> None:
    """Until the node's routes of `proto` (bird's, unless told) are exactly `expected`."""
    deadline = time.monotonic() + timeout
    while (got := kernel_routes(tb, node, proto)) != expected:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{node.name}: proto {proto} routes after {timeout}s: {sorted(got, key=str)}, "
                               f"expected {sorted(expected, key=str)}")
        time.sleep(0.05)


def protocol(peer: Node) -> str:
    """The name of the BGP session towards `peer`, on every other node."""
    return f"n{peer.index}"


def bird_config(tb: Testbed, node: Node, tun: str, mode: Mode | str = Mode.ALWAYS) -> str:
    """BIRD 2 config for `node`: iBGP to every other node; BGP routes into
    `tun` on-link (CrossSubnet: only from peers outside the node's subnet)."""
    mode = Mode(mode)
    if mode is Mode.NEVER:
        raise ValueError("mode Never has no tunnel to program: use Always or CrossSubnet")
    program = f'onlink = true; ifname = "{tun}"; gw = bgp_next_hop;'
    if mode is Mode.CROSS_SUBNET:
        subnet = ipaddress.ip_interface(f"{node.ip}/{node.prefixlen}").network
        # Peers in the node's subnet keep the route BIRD resolved: via them on the underlay.
        program = f"if bgp_next_hop !~ {subnet} then {{ {program} }}"
    peers = "\n".join(f"protocol bgp {protocol(peer)} from mesh {{ neighbor {peer.ip} as {AS_NUMBER}; }}"
                      for peer in tb.nodes if peer is not node)
    return f"""\
# BIRD 2 on {node.name}, written by ipipfast_lab.bird
router id {node.ip};
log stderr all;

protocol device {{}}

# The underlay's subnet: where the peers' next hops resolve (gateway recursive).
protocol direct {{
  ipv4;
  interface "{node.interface}";
}}

# This node's pod CIDR, originated from a blackhole as Calico's block.
protocol static pods {{
  ipv4;
  route {node.pod_cidr} blackhole;
}}

# Calico's krt_tunnel in stock BIRD: gw last (ifname clears it), on-link (else it lands on the underlay).
filter kernel_programming {{
  if proto = "pods" then accept;
  if source != RTS_BGP then reject;
  {program}
  accept;
}}

protocol kernel {{
  ipv4 {{ import none; export filter kernel_programming; }};
  scan time 2;  # as Calico: a scan puts back what the kernel lost (a TUN that went and came back)
}}

template bgp mesh {{
  local {node.ip} as {AS_NUMBER};
  multihop;
  # A session brought back up reconnects in about a second, not BIRD's 5 s / 120 s.
  connect delay time 1;
  connect retry time 1;
  error wait time 1, 2;
  ipv4 {{
    import all;
    export where proto = "pods";
    next hop self;
    gateway recursive;
  }};
}}

{peers}
"""


class BirdProcess(NodeProcess):
    """`bird -f` inside a node's namespace, its files under `directory`;
    stop() is SIGTERM, BIRD's graceful shutdown (a Cease to each peer, its
    kernel routes removed)."""

    def __init__(self, tb: Testbed, node: Node, tun: str, directory: Path,
                 mode: Mode | str = Mode.ALWAYS) -> None:
        if not tb.ipr(node).link_lookup(ifname=tun):
            # BIRD's `ifname = ...` refuses an interface it does not know
            # ("Invalid iface name"), and never retries that route.
            raise LookupError(f"{node.name} has no interface {tun!r}: start the tunnel before BIRD")
        self.tun = tun
        directory.mkdir()
        self.config_path = directory / "bird.conf"
        self.socket_path = directory / "bird.ctl"
        self.config_path.write_text(bird_config(tb, node, tun, mode))
        super().__init__(tb, node, ["bird", "-f", "-c", str(self.config_path), "-s", str(self.socket_path),
                                    "-P", str(directory / "bird.pid")], directory / "bird.log")

    def birdc(self, *command: str) -> str:
        """One birdc command on this BIRD's control socket; its output."""
        return self.tb.run(self.node, ["birdc", "-s", str(self.socket_path), *command], timeout=10).stdout

    def bgp_state(self, peer: Node) -> str:
        """The session's BGP state: Idle, Connect, Active, OpenSent, ..., Established, Down."""
        out = self.birdc("show", "protocols", "all", protocol(peer))
        for line in out.splitlines():
            key, _, value = line.strip().partition(":")
            if key == "BGP state":
                return value.strip()
        raise RuntimeError(f"no BGP state for {protocol(peer)} on {self.node.name}:\n{out}")

    def wait_established(self, peers: Iterable[Node] | None = None, timeout: float = 30) -> None:
        """Until the sessions to `peers` (default: every other node) are Established."""
        peers = [p for p in (self.tb.nodes if peers is None else peers) if p is not self.node]
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"BIRD on {self.node.name} exited {self.proc.returncode}:\n{self.log()}")
            if self.socket_path.exists():  # BIRD listens on it once it runs
                states = {protocol(p): self.bgp_state(p) for p in peers}
                if all(s == "Established" for s in states.values()):
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"BIRD on {self.node.name}: {states or 'no control socket'} after {timeout}s:"
                                   f"\n{self.log()}")
            time.sleep(0.05)

    def disable(self, peer: Node) -> None:
        """Shuts the session to `peer` down (BGP Cease): both sides withdraw."""
        self._switch("disable", peer)

    def enable(self, peer: Node) -> None:
        self._switch("enable", peer)

    def _switch(self, verb: str, peer: Node) -> None:
        out = self.birdc(verb, protocol(peer))
        if f"{protocol(peer)}: {verb}d" not in out:
            raise RuntimeError(f"birdc {verb} {protocol(peer)} on {self.node.name}: {out.strip()}")


@contextmanager
def running_birds(tb: Testbed, tunnels: list[TunnelProcess],
                  mode: Mode | str = Mode.ALWAYS) -> Iterator[list[BirdProcess]]:
    """A BIRD on the node of each of `tunnels` (ready, so their TUNs exist).
    The block starts once every session is Established; at its end, even on
    failure, the BIRDs stop and their directory goes."""
    directory = Path(tempfile.mkdtemp(prefix=f"{tb.prefix}-bird-"))
    birds: list[BirdProcess] = []
    try:
        for t in tunnels:
            birds.append(BirdProcess(tb, t.node, t.status()["tunnel"], directory / f"n{t.node.index}", mode))
        for b in birds:
            b.wait_established()
        yield birds
    finally:
        for b in birds:
            b.stop()
        shutil.rmtree(directory, ignore_errors=True)
