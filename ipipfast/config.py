"""The YAML config: parsed from the YAML node tree so every error names its line.

Dicts (the testbed's configs) go through the same code: they are turned into a
node tree first, whose nodes have no line, so their errors carry line None.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, fields
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from os import PathLike
from typing import Any
from urllib.parse import urlsplit

import yaml
from yaml.representer import RepresenterError, SafeRepresenter

from .routes import DuplicateRouteError, Mode, Route, RouteTable, check_unicast, parse_address, parse_network

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: 100k routes compose in seconds, not minutes
_NULL_TAG = "tag:yaml.org,2002:null"
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
    ip: IPv4Interface  # a bare address means /32: CrossSubnet then finds no peer local
    interface: str
    pod_cidrs: tuple[IPv4Network, ...] = ()  # this node's pod blocks, registered in etcd


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
class StatsConfig:
    listen: tuple[str, int] | None = None  # (host, port); "" is every address, port 0 any free port


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
    stats: StatsConfig = StatsConfig()
    routes: RouteTable = RouteTable()
    etcd: EtcdConfig | None = None
    # "source:line: text" for things that parse but are probably not meant; log them.
    warnings: tuple[str, ...] = field(default=(), compare=False)


def load_config(path: str | PathLike[str], tunnel: Mapping[str, Any] | None = None) -> Config:
    """The config in the file at path; `tunnel` overrides keys of its tunnel
    section (the command line's options), checked by the same rules after
    the file itself is."""
    source = str(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(source, None, f"cannot read config: {e}") from None
    config = parse_config(text, source)
    if not tunnel:
        return config
    d = yaml.load(text, Loader=_Loader)
    d["tunnel"] = {**(d.get("tunnel") or {}), **tunnel}
    return config_from_dict(d, f"{source} with {' '.join(f'--{k}' for k in tunnel)}")


def parse_config(text: str, source: str = "<config>") -> Config:
    try:
        root = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        context = f" ({e.context})" if e.context else ""
        raise ConfigError(source, mark.line + 1 if mark else None, f"invalid YAML: {e.problem}{context}") from None
    except yaml.reader.ReaderError as e:  # a character YAML forbids; it gives an offset, not a mark
        line = text.count("\n", 0, e.position) + 1
        raise ConfigError(source, line, f"invalid YAML: character U+{e.character:04X}: {e.reason}") from None
    if root is None:
        raise ConfigError(source, None, "the config is empty; it needs at least node.ip and node.interface")
    return _Reader(source).config(root)


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
    return _Reader(source).config(root)


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
        self.warnings: list[str] = []

    def error(self, node: yaml.Node, reason: str) -> ConfigError:
        return ConfigError(self.source, _line(node), reason)

    def warn(self, node: yaml.Node, reason: str) -> None:
        self.warnings.append(str(self.error(node, reason)))

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

    def config(self, root: yaml.Node) -> Config:
        top = self.mapping(root, "", ("node", "tunnel", "stats", "routes", "etcd"), required=("node",))
        tunnel = self.tunnel(top.get("tunnel"))
        node = self.node(top["node"], tunnel.mode)
        return Config(
            node=node,
            tunnel=tunnel,
            stats=self.stats(top.get("stats")),
            routes=self.routes(top.get("routes"), node),
            etcd=self.etcd(top.get("etcd")),
            warnings=tuple(self.warnings),
        )

    def node(self, section: yaml.Node, mode: Mode) -> NodeConfig:
        m = self.mapping(section, "node", ("ip", "interface", "pod_cidrs"), required=("ip", "interface"))
        text = self.string(m["ip"], "node.ip")
        try:
            ip = IPv4Interface(text)
        except ValueError as e:
            raise self.error(m["ip"], f"node.ip: invalid IPv4 address {text!r}: {e}") from None
        try:
            check_unicast(ip.ip, "node.ip")
        except ValueError as e:
            raise self.error(m["ip"], str(e)) from None
        if "/" not in text and mode is Mode.CROSS_SUBNET:
            self.warn(
                m["ip"],
                f"node.ip {text} has no prefix length, so it is /32 and CrossSubnet encapsulates to every peer;"
                f" give the underlay subnet (e.g. {text}/24) to reach same-subnet peers directly",
            )
        return NodeConfig(ip=ip, interface=self.ifname(m["interface"], "node.interface"),
                          pod_cidrs=self.pod_cidrs(m.get("pod_cidrs"), ip))

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
        m = self.mapping(section, "stats", ("listen",))
        node = m.get("listen")
        if _is_null(node):
            return StatsConfig()
        assert node is not None
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
        return StatsConfig(listen=(host, int(port)))

    def routes(self, section: yaml.Node | None, node: NodeConfig) -> RouteTable:
        if _is_null(section):
            return RouteTable()
        assert section is not None
        if not isinstance(section, yaml.SequenceNode):
            raise self.error(section, f"routes: expected a list of {{cidr, via}}, got {self.describe(section, 'routes')}")
        routes: list[Route] = []
        cidr_nodes: list[yaml.Node] = []
        for i, item in enumerate(section.value):
            p = f"routes[{i}]"
            m = self.mapping(item, p, ("cidr", "via"), required=("cidr", "via"))
            cidr_text, via_text = self.string(m["cidr"], p + ".cidr"), self.string(m["via"], p + ".via")
            try:
                cidr = parse_network(cidr_text)
            except ValueError as e:
                raise self.error(m["cidr"], f"{p}.cidr: {e}") from None
            try:
                via = parse_address(via_text)
            except ValueError as e:
                raise self.error(m["via"], f"{p}.via: {e}") from None
            if via == node.ip.ip:
                raise self.error(m["via"], f"{p}.via: {via} is this node's own address (node.ip)")
            try:
                routes.append(Route(cidr, via))
            except ValueError as e:
                raise self.error(m["via"], f"{p}: {e}") from None
            cidr_nodes.append(m["cidr"])
        try:
            return RouteTable.from_routes(routes)
        except DuplicateRouteError as e:
            first = cidr_nodes[e.first_index]
            on_line = f" on line {_line(first)}" if _line(first) else ""
            raise self.error(
                cidr_nodes[e.second_index],
                f"routes[{e.second_index}]: duplicate route for {e.second.cidr};"
                f" routes[{e.first_index}]{on_line} already routes it (via {e.first.via})",
            ) from None

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
