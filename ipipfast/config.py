"""The YAML config; every error names its line.

The routes list is read from the parser's events, one route at a time, into
a compact RouteSet (yaml_events.py says why); the other sections are small
and are checked on their node trees. Dicts (the testbed's configs) go
through the same checks: they are turned into a node tree first, whose nodes
have no line, so their errors carry line None.
"""

from __future__ import annotations

import difflib
import hashlib
import ipaddress
import os
from array import array
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, fields
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from os import PathLike
from typing import Any
from urllib.parse import urlsplit

import yaml
from yaml.representer import RepresenterError, SafeRepresenter

from .routes import (DuplicateRouteError, Mode, RouteSet, cidr_text, check_unicast, fast_address, fast_network,
                     key_of, parse_address, parse_network, route_problem)
from . import route_lines
from .yaml_events import Events

_NULL_TAG = "tag:yaml.org,2002:null"
_MAP_TAG = "tag:yaml.org,2002:map"
_STR_TAG = "tag:yaml.org,2002:str"
_STREAMED = "!ipipfast/streamed-routes"  # stands in the root mapping for the routes read from the events
_UNSET = object()
ETCD_TTL = (5, 86_400)  # flannel's leases last 24 h; under 5 s a keep-alive every ttl/3 has no room to retry
# Integer tunnel keys: (lowest, highest, the value meaning None). 68 is IPv4's minimum
# MTU, and the outer packet (inner + 20) must fit in 65535.
_TUNNEL_INTS: dict[str, tuple[int, int, object]] = {
    "mtu": (68, 65515, None),
    "ttl": (1, 255, "inherit"),
    "tos": (0, 255, "inherit"),
    "workers": (1, 64, _UNSET),
    "batch": (1, 1024, _UNSET),
    "busy_poll": (0, 100_000, _UNSET),
    "busy_poll_budget": (1, 100, _UNSET),
    "coalesce_us": (0, 10_000, _UNSET),
    "ring_frames": (64, 65_536, _UNSET),
}


class ConfigError(ValueError):
    """A config problem at `source`, line `line` (1-based; None when unknown, e.g. for dicts)."""

    def __init__(self, source: str, line: int | None, reason: str) -> None:
        super().__init__(source, line, reason)
        self.source, self.line, self.reason = source, line, reason

    def __str__(self) -> str:
        where = self.source if self.line is None else f"{self.source}:{self.line}"
        return f"{where}: {self.reason}"


@dataclass(frozen=True)
class NodeConfig:
    # A bare address is /32 until the daemon finds it on an interface (underlay.py),
    # whose prefix length CrossSubnet then uses.
    ip: IPv4Interface
    interface: str | None = None  # None: the interface that holds ip
    pod_cidrs: tuple[IPv4Network, ...] = ()  # this node's pod blocks, registered in etcd
    prefixlen_given: bool = True  # False for a bare address


@dataclass(frozen=True)
class TunnelConfig:
    name: str = "ipipfast0"
    mode: Mode = Mode.ALWAYS
    mtu: int | None = None  # None: underlay MTU - 20, resolved by the daemon
    ttl: int | None = None  # None: inherit from the inner packet
    tos: int | None = 0  # None: inherit from the inner packet
    # Outer DF. Off by default like tunl0's nopmtudisc, but a fixed ttl forces it on
    # (the kernel does the same, and iproute2 refuses "ttl N nopmtudisc").
    pmtudisc: bool = False
    ignore_df: bool = False  # fragment the outer packet even if the inner has DF; needs pmtudisc off
    workers: int = 1
    batch: int = 64
    offload: bool = True  # TUN GSO/checksum offloads: segment and coalesce in userspace
    busy_poll: int = 0  # microseconds a loop spins for work before it sleeps: latency for CPU
    busy_poll_budget: int = 100  # percent of one CPU that each loop may spend spinning
    # Microseconds the decap loop naps under load before it looks at its ring again, instead
    # of sleeping until woken (as a NIC's rx-usecs): fewer wake-ups under load; 0: off.
    coalesce_us: int = 100
    # Frames in each worker's receive ring (a NIC's rx ring size, ethtool -G), rounded up to a
    # power of two: room for bursts while the decap loop waits for a CPU.
    ring_frames: int = 4096
    # A peer's IPIP must come from the MAC of its next hop (the peer on-link, its gateway when
    # routed): an L2 reverse-path check against its address spoofed from another link. Off for
    # underlays where a routed peer's frames come back through another router than the one we
    # send through (ECMP, a VRRP pair forwarding from their own MACs).
    check_source_mac: bool = True


@dataclass(frozen=True)
class KernelConfig:
    # Forward by the routes others write into the TUN (BIRD, felix, static):
    # on by default, as a route into tunl0 simply works.
    learn: bool = True
    # Seconds between full re-reads of the kernel's routes (felix's
    # routeRefreshInterval); 0: only at start and after a loss.
    resync: int = 90


PEER_SERIES = (0, 10_000)


@dataclass(frozen=True)
class StatsConfig:
    listen: tuple[str, int] | None = None  # (host, port); "" is every address, port 0 any free port
    # stats.peer_series: how many peers get their own ipipfast_peer_*_total
    # series (0..10000). A peer is placed at the first scrape that finds it
    # has carried traffic: while fewer than peer_series peers have a series
    # it gets one (the largest by bytes first, when several appear in one
    # scrape), otherwise it is summed in peer="other"; either way it stays
    # there until the daemon restarts. So the series are at most
    # peer_series + 1 per family, none flaps, and no counter goes down (a
    # peer that moved out of "other" would take its count with it). Read
    # at start; a reload does not change it.
    peer_series: int = 100


@dataclass(frozen=True)
class EtcdTLS:
    ca: str | None = None  # None: the system's CAs verify the server
    cert: str | None = None  # client certificate and its key, both or neither
    key: str | None = None


@dataclass(frozen=True)
class EtcdEndpoint:
    scheme: str  # http or https
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


@dataclass(frozen=True)
class EtcdConfig:
    """Where the node leases live, in flannel's schema (see ipipfast.etcd)."""

    endpoints: tuple[EtcdEndpoint, ...]
    prefix: str = "/coreos.com/network"
    ttl: int = 30  # seconds of this node's lease; kept alive every ttl/3
    tls: EtcdTLS | None = None


@dataclass(frozen=True)
class Config:
    node: NodeConfig
    tunnel: TunnelConfig = TunnelConfig()
    kernel: KernelConfig = KernelConfig()
    stats: StatsConfig = StatsConfig()
    routes: RouteSet = field(default_factory=RouteSet)  # detail: the line of each route's cidr
    etcd: EtcdConfig | None = None


def read_config_text(path: str | PathLike[str]) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(str(path), None, f"cannot read config: {e}") from None


def digest(text: str) -> bytes:
    """Tells a re-read of the same file from an edit without parsing it."""
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def load_config(path: str | PathLike[str], tunnel: Mapping[str, Any] | None = None,
                node_ip: str | None = None) -> Config:
    """The config in the file at path; `tunnel` overrides keys of its tunnel
    section (the command line's options), checked by the same rules after
    the file itself is; node_ip (--node-ip) stands for node.ip."""
    return parse_config(read_config_text(path), str(path), tunnel, node_ip)


def parse_config(text: str, source: str = "<config>", tunnel: Mapping[str, Any] | None = None,
                 node_ip: str | None = None) -> Config:
    cut = route_lines.cut(text)
    overrides = _Overrides(tunnel or {}, node_ip)
    if cut is not None:
        try:
            return _parse(cut.remainder, source, overrides, cut)
        except (ConfigError, _NotTheRoutes):
            pass  # the whole text through YAML: it decides, and has the words for any error
    return _parse(text, source, overrides, None)


@dataclass(frozen=True)
class _Overrides:
    """What the command line says over the file."""
    tunnel: Mapping[str, Any]
    node_ip: str | None


class _NotTheRoutes(Exception):
    """The lines read as routes were not the top-level routes key's value."""


def _parse(text: str, source: str, overrides: _Overrides, cut: route_lines.Cut | None) -> Config:
    events = Events(text)
    try:
        return _read(events, _Reader(source), overrides, cut)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        context = f" ({e.context})" if e.context else ""
        raise ConfigError(source, mark.line + 1 if mark else None, f"invalid YAML: {e.problem}{context}") from None
    except yaml.reader.ReaderError as e:  # a character YAML forbids; it gives an offset, not a mark
        line = text.count("\n", 0, e.position) + 1
        raise ConfigError(source, line, f"invalid YAML: character U+{e.character:04X}: {e.reason}") from None
    finally:
        events.close()


def _read(events: Events, reader: _Reader, overrides: _Overrides, cut: route_lines.Cut | None) -> Config:
    first = events.root()
    if first is None:
        if not overrides.node_ip:
            raise ConfigError(reader.source, None, "the config is empty; it needs at least node.ip")
        return reader.config(yaml.MappingNode(_MAP_TAG, []), None, overrides)
    routes: _Routes | None = None
    if isinstance(first, yaml.MappingStartEvent) and first.anchor is None and first.tag is None:
        root = yaml.MappingNode(_MAP_TAG, [], first.start_mark, None, flow_style=first.flow_style)
        while not isinstance(event := events.next(), yaml.MappingEndEvent):
            key = events.compose(event)
            start = events.next()
            if isinstance(key, yaml.ScalarNode) and key.value == "routes" and key.tag == _STR_TAG:
                routes = reader.stream_routes(events, start)
                if cut is not None:
                    if first.flow_style or key.start_mark.line + 1 != cut.line or len(routes.keys):
                        raise _NotTheRoutes()
                    routes = _Routes(cut.keys, cut.vias, cut.lines, cut.via_lines)
                value: yaml.Node = yaml.ScalarNode(_STREAMED, "", start.start_mark, start.end_mark)
            else:
                value = events.compose(start)
            root.value.append((key, value))
    else:
        root = events.compose(first)
    if cut is not None and routes is None:
        raise _NotTheRoutes()
    events.end()
    return reader.config(root, routes, overrides)


class _Representer(SafeRepresenter):
    """Turns a dict into YAML nodes, also accepting the objects a Python caller may hold."""


def _represent_as_str(representer: SafeRepresenter, data: object) -> yaml.Node:
    return representer.represent_str(str(data))


_Representer.add_multi_representer(str, SafeRepresenter.represent_str)  # e.g. Mode members
_Representer.add_representer(tuple, SafeRepresenter.represent_list)
_Representer.add_multi_representer(IPv4Address, _represent_as_str)  # IPv4Interface too: a subclass
_Representer.add_multi_representer(IPv4Network, _represent_as_str)


def config_from_dict(d: Mapping[str, Any], source: str = "<dict>") -> Config:
    """Same schema and checks as the YAML; errors have line None."""
    try:
        root = _Representer().represent_data(dict(d))
    except RepresenterError as e:  # args: (message, offending object)
        raise ConfigError(source, None, f"{e.args[0]}: {e.args[-1]!r}") from None
    return _Reader(source).config(root, None, _Overrides({}, None))


def _line(node: yaml.Node) -> int | None:
    return node.start_mark.line + 1 if node.start_mark is not None else None


def _is_null(node: yaml.Node | None) -> bool:
    return node is None or (isinstance(node, yaml.ScalarNode) and node.tag == _NULL_TAG)


def _show(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, str):
        return f"string {value!r}"
    return f"{type(value).__name__} {value!r}"


def _ifname_problem(name: str) -> str | None:
    """Why Linux would refuse `name` as an interface name (dev_valid_name), or None."""
    if not 1 <= len(name.encode()) <= 15:
        return "must be 1 to 15 bytes long (IFNAMSIZ)"
    if name in (".", ".."):
        return "must not be '.' or '..'"
    if any(c in "/:%\0" or c.isspace() for c in name):
        return "must not contain '/', ':', '%' or whitespace"  # '%' would be a kernel name template
    return None


class _Reader:
    """Walks the node tree; each check raises ConfigError at the offending node's line."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.constructor = yaml.constructor.SafeConstructor()

    def error(self, node: yaml.Node, reason: str) -> ConfigError:
        return ConfigError(self.source, _line(node), reason)

    # -- generic shapes ------------------------------------------------------

    def mapping(
        self, node: yaml.Node | None, path: str, allowed: Collection[str], required: Collection[str] = ()
    ) -> dict[str, yaml.Node]:
        """Key -> value node; an absent or null optional section is empty."""
        if _is_null(node) and not required:
            return {}
        assert node is not None  # a required section is looked up with [], never missing here
        what, where = (path, f"in {path}") if path else ("the config", "at the top level")
        if not isinstance(node, yaml.MappingNode):
            raise self.error(node, f"{what}: expected a mapping, got {self.describe(node, what)}")
        out: dict[str, yaml.Node] = {}
        key_nodes: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            key = self.scalar(key_node, what, "a key")
            if not isinstance(key, str):
                raise self.error(key_node, f"keys must be strings, got {_show(key)} {where}")
            if key in key_nodes:
                raise self.error(key_node, f"duplicate key {key!r} {where} (first on line {_line(key_nodes[key])})")
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"expected one of: {', '.join(allowed)}"
                raise self.error(key_node, f"unknown key {key!r} {where}; {hint}")
            key_nodes[key], out[key] = key_node, value_node
        for key in required:
            if key not in out:
                raise self.error(node, f"missing required key {key!r} {where}")
        return out

    def describe(self, node: yaml.Node, path: str) -> str:
        if isinstance(node, yaml.MappingNode):
            return "a mapping"
        if isinstance(node, yaml.SequenceNode):
            return "a list"
        return _show(self.scalar(node, path, "a value"))

    def scalar(self, node: yaml.Node, path: str, expected: str) -> object:
        if not isinstance(node, yaml.ScalarNode):
            raise self.error(node, f"{path}: expected {expected}, got {self.describe(node, path)}")
        try:
            return self.constructor.construct_object(node)
        except (yaml.YAMLError, ValueError) as e:  # e.g. an explicit "!!int abc" or "!unknown"
            reason = e.problem if isinstance(e, yaml.MarkedYAMLError) and e.problem else e
            raise self.error(node, f"{path}: {reason}") from None

    def string(self, node: yaml.Node, path: str) -> str:
        value = self.scalar(node, path, "a string")
        if not isinstance(value, str):
            raise self.error(node, f"{path}: expected a string, got {_show(value)}")
        return value

    def integer(self, node: yaml.Node, path: str, lo: int, hi: int, none_if: object = _UNSET) -> int | None:
        """An int in lo..hi, or None where the value equals `none_if` (null, 'inherit')."""
        value = self.scalar(node, path, "an integer")
        if none_if is not _UNSET and value == none_if and type(value) is type(none_if):
            return None
        alternative = "" if none_if is _UNSET else f" or {_show(none_if).removeprefix('string ')}"
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(node, f"{path}: expected an integer {lo}..{hi}{alternative}, got {_show(value)}")
        if not lo <= value <= hi:
            raise self.error(node, f"{path}: {value} is out of range {lo}..{hi}")
        return value

    def boolean(self, node: yaml.Node, path: str) -> bool:
        value = self.scalar(node, path, "true or false")
        if not isinstance(value, bool):
            raise self.error(node, f"{path}: expected true or false, got {_show(value)}")
        return value

    def ifname(self, node: yaml.Node, path: str) -> str:
        name = self.string(node, path)
        problem = _ifname_problem(name)
        if problem:
            raise self.error(node, f"{path}: interface name {name!r} {problem}")
        return name

    # -- sections ------------------------------------------------------------

    def config(self, root: yaml.Node, streamed: _Routes | None, overrides: _Overrides) -> Config:
        top = self.mapping(root, "", ("node", "tunnel", "kernel", "stats", "routes", "etcd"),
                           required=() if overrides.node_ip else ("node",))
        tunnel = self.tunnel(top.get("tunnel"))
        if overrides.tunnel:
            tunnel = self.overridden(top.get("tunnel"), overrides.tunnel)
        node = self.node(top.get("node"), overrides.node_ip)
        section = top.get("routes")
        if section is not None and section.tag == _STREAMED:
            assert streamed is not None
            routes = streamed
        else:
            routes = self.routes_node(section)
        return Config(
            node=node,
            tunnel=tunnel,
            kernel=self.kernel(top.get("kernel")),
            stats=self.stats(top.get("stats")),
            routes=routes.finish(self, node),
            etcd=self.etcd(top.get("etcd")),
        )

    def overridden(self, section: yaml.Node | None, overrides: Mapping[str, Any]) -> TunnelConfig:
        """The tunnel section with the command line's options over it, checked again as a whole."""
        d = {} if _is_null(section) else self.constructor.construct_object(section, deep=True)
        node = _Representer().represent_data({**d, **overrides})
        return _Reader(f"{self.source} with {' '.join(f'--{k}' for k in overrides)}").tunnel(node)

    def node(self, section: yaml.Node | None, node_ip: str | None) -> NodeConfig:
        m = self.mapping(section, "node", ("ip", "interface", "pod_cidrs"), required=() if node_ip else ("ip",))
        if node_ip is None:
            ip, given = self.node_ip(self.string(m["ip"], "node.ip"), m["ip"])
        else:
            ip, given = _Reader(f"{self.source} with --node-ip").node_ip(node_ip, None)
        interface = self.ifname(m["interface"], "node.interface") if "interface" in m else None
        return NodeConfig(ip=ip, interface=interface, pod_cidrs=self.pod_cidrs(m.get("pod_cidrs"), ip),
                          prefixlen_given=given)

    def node_ip(self, text: str, node: yaml.Node | None) -> tuple[IPv4Interface, bool]:
        """node.ip (or --node-ip, at node None), and whether it has a prefix length."""
        def error(reason: str) -> ConfigError:
            return ConfigError(self.source, None, reason) if node is None else self.error(node, reason)
        try:
            ip = IPv4Interface(text)
        except ValueError as e:
            raise error(f"node.ip: invalid IPv4 address {text!r}: {e}") from None
        try:
            check_unicast(ip.ip, "node.ip")
        except ValueError as e:
            raise error(str(e)) from None
        return ip, "/" in text

    def pod_cidrs(self, section: yaml.Node | None, ip: IPv4Interface) -> tuple[IPv4Network, ...]:
        cidrs: dict[IPv4Network, yaml.Node] = {}
        for i, item in enumerate(self.sequence(section, "node.pod_cidrs", "CIDRs")):
            p = f"node.pod_cidrs[{i}]"
            try:
                cidr = parse_network(self.string(item, p))
            except ValueError as e:
                raise self.error(item, f"{p}: {e}") from None
            if ip.ip in cidr:
                raise self.error(item, f"{p}: {cidr} holds this node's own address {ip.ip} (node.ip)")
            if cidr in cidrs:
                raise self.error(item, f"{p}: duplicate {cidr} (first on line {_line(cidrs[cidr])})")
            for other, other_node in cidrs.items():
                if cidr.overlaps(other):
                    raise self.error(item, f"{p}: {cidr} overlaps {other} (line {_line(other_node)})")
            cidrs[cidr] = item
        return tuple(cidrs)

    def sequence(self, node: yaml.Node | None, path: str, what: str) -> list[yaml.Node]:
        """The items of a list; an absent or null one is empty."""
        if _is_null(node):
            return []
        assert node is not None
        if not isinstance(node, yaml.SequenceNode):
            raise self.error(node, f"{path}: expected a list of {what}, got {self.describe(node, path)}")
        return list(node.value)

    def tunnel(self, section: yaml.Node | None) -> TunnelConfig:
        m = self.mapping(section, "tunnel", [f.name for f in fields(TunnelConfig)])
        p = "tunnel."
        kw: dict[str, Any] = {}
        if "name" in m:
            kw["name"] = self.ifname(m["name"], p + "name")
        if "mode" in m:
            kw["mode"] = self.mode(m["mode"])
        for key, (lo, hi, none_if) in _TUNNEL_INTS.items():
            if key in m:
                kw[key] = self.integer(m[key], p + key, lo, hi, none_if)
        for key in ("pmtudisc", "ignore_df", "offload", "check_source_mac"):
            if key in m:
                kw[key] = self.boolean(m[key], p + key)
        if kw.get("ttl") is not None:
            if kw.get("pmtudisc") is False:
                raise self.error(
                    m["pmtudisc"],
                    "tunnel.pmtudisc: false conflicts with a fixed ttl, which always sets DF as in the kernel;"
                    " use ttl: inherit or remove pmtudisc",
                )
            kw["pmtudisc"] = True
        if kw.get("ignore_df") and kw.get("pmtudisc"):
            why = "the fixed ttl" if "pmtudisc" not in m else "pmtudisc: true"
            raise self.error(m["ignore_df"], f"tunnel.ignore_df: true conflicts with outer DF set by {why}")
        return TunnelConfig(**kw)

    def mode(self, node: yaml.Node) -> Mode:
        text = self.string(node, "tunnel.mode")
        try:
            return Mode(text)
        except ValueError:
            names = [m.value for m in Mode]
            close = [n for n in names if n.lower() == text.lower()] or difflib.get_close_matches(text, names, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"expected one of: {', '.join(names)}"
            raise self.error(node, f"tunnel.mode: unknown mode {text!r}; {hint}") from None

    def stats(self, section: yaml.Node | None) -> StatsConfig:
        m = self.mapping(section, "stats", ("listen", "peer_series"))
        kw: dict[str, Any] = {}
        if "peer_series" in m:
            kw["peer_series"] = self.integer(m["peer_series"], "stats.peer_series", *PEER_SERIES)
        node = m.get("listen")
        if _is_null(node):
            return StatsConfig(**kw)
        assert node is not None
        return StatsConfig(listen=self.listen(node), **kw)

    def listen(self, node: yaml.Node) -> tuple[str, int]:
        value = self.scalar(node, "stats.listen", '"host:port"')
        host, sep, port = value.rpartition(":") if isinstance(value, str) else ("", "", "")
        if not sep or not (port.isascii() and port.isdigit()) or int(port) > 65535:
            raise self.error(node, f'stats.listen: expected "host:port" such as "127.0.0.1:9100", got {_show(value)}')
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
            try:
                ipaddress.IPv6Address(host)
            except ValueError as e:
                raise self.error(node, f"stats.listen: {e}") from None
        elif ":" in host:
            raise self.error(node, f"stats.listen: put an IPv6 host in brackets, e.g. [{host}]:{port}")
        return host, int(port)

    def kernel(self, section: yaml.Node | None) -> KernelConfig:
        m = self.mapping(section, "kernel", [f.name for f in fields(KernelConfig)])
        kw: dict[str, Any] = {}
        if "learn" in m:
            kw["learn"] = self.boolean(m["learn"], "kernel.learn")
        if "resync" in m:
            kw["resync"] = self.integer(m["resync"], "kernel.resync", 0, 86_400)
        return KernelConfig(**kw)

    # -- routes ----------------------------------------------------------------

    def routes_node(self, section: yaml.Node | None) -> _Routes:
        routes = _Routes()
        if _is_null(section):
            return routes
        assert section is not None
        if not isinstance(section, yaml.SequenceNode):
            raise self.error(section, f"routes: expected a list of {{cidr, via}}, got {self.describe(section, 'routes')}")
        for i, item in enumerate(section.value):
            self.route_node(item, i, routes)
        return routes

    def route_node(self, item: yaml.Node, i: int, routes: _Routes) -> None:
        """One route from its node tree, with every error at its line."""
        p = f"routes[{i}]"
        m = self.mapping(item, p, ("cidr", "via"), required=("cidr", "via"))
        cidr_text_, via_text = self.string(m["cidr"], p + ".cidr"), self.string(m["via"], p + ".via")
        try:
            cidr = parse_network(cidr_text_)
        except ValueError as e:
            raise self.error(m["cidr"], f"{p}.cidr: {e}") from None
        try:
            via = int(parse_address(via_text))
        except ValueError as e:
            raise self.error(m["via"], f"{p}.via: {e}") from None
        network, plen = int(cidr.network_address), cidr.prefixlen
        problem = route_problem(network, plen, via)
        if problem:
            raise self.error(m["via"], f"{p}: {problem}")
        routes.add(key_of(network, plen), via, _line(m["cidr"]) or 0, _line(m["via"]) or 0)

    def stream_routes(self, events: Events, start: yaml.Event) -> _Routes:
        """The routes list from the events: a route of the usual shape
        ({cidr: ..., via: ...}, plain strings) without composing it; any
        other (anchors, aliases, tags, errors) through route_node, so the
        two paths accept and refuse the same input with the same words."""
        if not isinstance(start, yaml.SequenceStartEvent) or start.anchor is not None or start.tag is not None:
            return self.routes_node(events.compose(start))
        routes = _Routes()
        i = 0
        while not isinstance(event := events.next(), yaml.SequenceEndEvent):
            taken = self._fast_route(events, event, routes)
            if taken is not None:
                events.push(taken[1:])
                self.route_node(events.compose(taken[0]), i, routes)
            i += 1
        return routes

    def _fast_route(self, events: Events, first: yaml.Event, routes: _Routes) -> list[yaml.Event] | None:
        """Adds the route that starts with `first` if it has the usual shape
        (a mapping of cidr and via to untagged scalars); else returns the
        events it read, for route_node. The hot loop of a large config: 100k
        routes are 600k events. No type check of the values: a scalar that
        fast_network or fast_address accepts has three dots, which no YAML
        1.1 type but str matches."""
        taken = [first]
        if type(first) is not yaml.MappingStartEvent or first.anchor is not None or first.tag is not None:
            return taken
        nxt = events.reader()
        pairs = {}
        for _ in range(2):
            key = nxt()
            taken.append(key)
            if type(key) is not yaml.ScalarEvent:
                return taken
            value = nxt()
            taken.append(value)
            if key.style or key.tag is not None or key.anchor is not None or type(value) is not yaml.ScalarEvent \
                    or value.tag is not None or value.anchor is not None:
                return taken
            pairs[key.value] = value
        end = nxt()
        taken.append(end)
        cidr, via = pairs.get("cidr"), pairs.get("via")
        if type(end) is not yaml.MappingEndEvent or cidr is None or via is None:
            return taken
        network = fast_network(cidr.value)
        addr = fast_address(via.value)
        if network is None or addr is None or route_problem(network[0], network[1], addr):
            return taken
        routes.add(key_of(*network), addr, cidr.start_mark.line + 1, via.start_mark.line + 1)
        return None

    def etcd(self, section: yaml.Node | None) -> EtcdConfig | None:
        if _is_null(section):
            return None
        assert section is not None
        m = self.mapping(section, "etcd", ("endpoints", "prefix", "ttl", "tls"), required=("endpoints",))
        endpoints = tuple(self.endpoint(item, f"etcd.endpoints[{i}]")
                          for i, item in enumerate(self.sequence(m["endpoints"], "etcd.endpoints", "URLs")))
        if not endpoints:
            raise self.error(m["endpoints"], "etcd.endpoints: name at least one, e.g. http://198.18.0.1:2379")
        kw: dict[str, Any] = {}
        if "prefix" in m:
            kw["prefix"] = self.etcd_prefix(m["prefix"])
        if "ttl" in m:
            kw["ttl"] = self.integer(m["ttl"], "etcd.ttl", *ETCD_TTL)
        if len({e.scheme for e in endpoints}) > 1:
            raise self.error(m["endpoints"], "etcd.endpoints: mixes http:// and https://; one cluster speaks one")
        tls = self.etcd_tls(m.get("tls"))
        if tls is not None and endpoints[0].scheme != "https":
            raise self.error(m["tls"], "etcd.tls: needs https:// endpoints; these are http://")
        return EtcdConfig(endpoints=endpoints, tls=tls, **kw)

    def endpoint(self, node: yaml.Node, path: str) -> EtcdEndpoint:
        text = self.string(node, path)
        try:
            url = urlsplit(text)
            port = url.port
        except ValueError as e:
            raise self.error(node, f"{path}: invalid URL {text!r}: {e}") from None
        if url.scheme not in ("http", "https") or not url.hostname:
            raise self.error(node, f"{path}: expected http://host:port or https://host:port, got {text!r}")
        if url.path not in ("", "/") or url.query or url.fragment or url.username or url.password:
            raise self.error(node, f"{path}: {text!r}: give only scheme, host and port (etcd's API path is found)")
        return EtcdEndpoint(url.scheme, url.hostname, 2379 if port is None else port)

    def etcd_prefix(self, node: yaml.Node) -> str:
        prefix = self.string(node, "etcd.prefix")
        if not prefix.startswith("/") or prefix.endswith("/") or "//" in prefix:
            meant = "/" + "/".join(p for p in prefix.split("/") if p)
            hint = f"; did you mean {meant!r}?" if meant != "/" else ""
            raise self.error(node, f"etcd.prefix: {prefix!r} must start with '/', and not end with one{hint}")
        return prefix

    def etcd_tls(self, section: yaml.Node | None) -> EtcdTLS | None:
        m = self.mapping(section, "etcd.tls", ("ca", "cert", "key"))
        if not m:
            return None
        paths: dict[str, str] = {}
        for key, node in m.items():
            path = paths[key] = self.string(node, f"etcd.tls.{key}")
            if not os.access(path, os.R_OK):
                raise self.error(node, f"etcd.tls.{key}: cannot read {path!r}")
        if ("cert" in m) != ("key" in m):
            given, missing = ("cert", "key") if "cert" in m else ("key", "cert")
            raise self.error(m[given], f"etcd.tls: {given} without {missing}; a client certificate needs both")
        return EtcdTLS(**paths)


class _Routes:
    """Routes as they are read: arrays in file order, checked as a whole by finish()."""

    def __init__(self, keys: array | None = None, vias: array | None = None, lines: array | None = None,
                 via_lines: array | None = None) -> None:
        self.keys, self.vias = keys or array("Q"), vias or array("I")
        self.lines, self.via_lines = lines or array("Q"), via_lines or array("I")  # 0: no line (a dict)

    def add(self, key: int, via: int, line: int, via_line: int) -> None:
        self.keys.append(key)
        self.vias.append(via)
        self.lines.append(line)
        self.via_lines.append(via_line)

    def finish(self, reader: _Reader, node: NodeConfig) -> RouteSet:
        own = int(node.ip.ip)
        if own in self.vias:
            i = self.vias.index(own)
            raise ConfigError(reader.source, self.via_lines[i] or None,
                              f"routes[{i}].via: {node.ip.ip} is this node's own address (node.ip)")
        try:
            return RouteSet.build(self.keys, self.vias, self.lines)
        except DuplicateRouteError as e:
            a, b = e.first_index, e.second_index
            on_line = f" on line {self.lines[a]}" if self.lines[a] else ""
            raise ConfigError(reader.source, self.lines[b] or None,
                              f"routes[{b}]: duplicate route for {cidr_text(e.key)};"
                              f" routes[{a}]{on_line} already routes it (via {IPv4Address(self.vias[a])})") from None
