"""Routes by source, the merged forwarding table, and Calico's ipipMode split.

A route is (cidr, via) with its origin. Each source keeps its routes as one
compact set of ints (RouteSet: sorted arrays of keys, vias and origin
details; 100,000 routes take 1.6 MB). A key packs a CIDR into one int,
network << 6 | prefix length, so keys sort as CIDRs do: by network, then
prefix length.

The merged table holds, for each CIDR, the route of the first source in
Source order that has one: the file (this node's operator speaking), then
the kernel (routes BIRD or felix wrote into the TUN), then etcd. Where two
sources name different nodes for one CIDR, both sides are kept as a
Conflict and shown.
"""
from __future__ import annotations

import bisect
import socket
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from enum import IntEnum, StrEnum
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

_BROADCAST = 0xFFFFFFFF
_KEYS, _VIAS, _DETAILS, _FLAGS = "Q", "I", "Q", "B"  # details: a line, a protocol, an etcd revision (int64)


class Mode(StrEnum):
    """Calico's IPPool ipipMode, spelled as Calico spells it (str(Mode.ALWAYS) == "Always")."""

    ALWAYS = "Always"
    CROSS_SUBNET = "CrossSubnet"
    NEVER = "Never"


class Source(IntEnum):
    """Where a route comes from; a lower value wins a CIDR that several name."""

    FILE = 0    # the config file: detail is its line
    KERNEL = 1  # a route into the TUN: detail is its rtm_protocol
    ETCD = 2    # node leases in etcd: detail is the key's mod revision

    def __str__(self) -> str:
        return self.name.lower()


class Kind(IntEnum):
    """How the table carries a CIDR."""

    ENCAPSULATED = 0  # into the TUN by a kernel route of ours
    DIRECT = 1        # on the underlay, unencapsulated, by a kernel route of ours (CrossSubnet, Never)
    FOREIGN = 2       # into the TUN by a kernel route someone else wrote: encapsulated, nothing to install


def key_of(network: int, prefixlen: int) -> int:
    return network << 6 | prefixlen


def network_of(key: int) -> tuple[int, int]:
    return key >> 6, key & 63


def mask_of(prefixlen: int) -> int:
    return (0xFFFFFFFF << (32 - prefixlen)) & 0xFFFFFFFF


def cidr_text(key: int) -> str:
    return f"{IPv4Address(key >> 6)}/{key & 63}"


def parse_network(text: str) -> IPv4Network:
    """Parse a CIDR strictly; on host bits, name the network that was probably meant."""
    try:
        return IPv4Network(text)
    except ValueError as e:
        error = e
    try:
        meant = IPv4Interface(text).network  # parses iff only host bits were wrong
    except ValueError:
        raise ValueError(f"invalid IPv4 CIDR {text!r}: {error}") from None
    raise ValueError(f"{text} has host bits set; did you mean {meant}?")


def parse_address(text: str) -> IPv4Address:
    try:
        return IPv4Address(text)
    except ValueError as e:
        raise ValueError(f"invalid IPv4 address {text!r}: {e}") from None


def _octets(text: str) -> int | None:
    """a.b.c.d as ipaddress takes it (1-3 digits, no leading zero, at most
    255), at C speed: inet_aton, then the canonical form must read back."""
    try:
        packed = socket.inet_aton(text)
    except (OSError, ValueError):  # ValueError: an embedded NUL
        return None
    return int.from_bytes(packed, "big") if socket.inet_ntoa(packed) == text else None


def fast_network(text: str) -> tuple[int, int] | None:
    """(network, prefix length) of a plain "a.b.c.d[/n]" without host bits,
    or None: then parse_network gives the answer or the precise error."""
    addr, slash, plen_text = text.partition("/")
    network = _octets(addr)
    if network is None:
        return None
    if not slash:
        return network, 32
    if not (0 < len(plen_text) <= 2 and plen_text.isascii() and plen_text.isdigit()):
        return None
    plen = int(plen_text)
    if plen > 32 or network & ~mask_of(plen) & 0xFFFFFFFF:
        return None
    return network, plen


def fast_address(text: str) -> int | None:
    return _octets(text)


def unicast_problem(addr: int, what: str) -> str | None:
    """Why addr can never be a tunnel endpoint, or None."""
    kind = ("unspecified" if addr == 0 else "multicast" if addr >> 28 == 0xE else
            "broadcast" if addr == _BROADCAST else "loopback" if addr >> 24 == 127 else None)
    return f"{what} {IPv4Address(addr)} is a {kind} address, not a unicast one" if kind else None


def check_unicast(addr: IPv4Address, what: str) -> None:
    """Refuse addresses a tunnel endpoint can never have."""
    problem = unicast_problem(int(addr), what)
    if problem:
        raise ValueError(problem)


def loop_problem(network: int, prefixlen: int, via: int) -> str | None:
    if via & mask_of(prefixlen) == network:
        # The outer packet to `via` would itself match the route: a tunnel loop.
        return f"via {IPv4Address(via)} lies inside the routed CIDR {cidr_text(key_of(network, prefixlen))}"
    return None


def route_problem(network: int, prefixlen: int, via: int) -> str | None:
    """Why (cidr, via) cannot be a tunnel route, or None."""
    return unicast_problem(via, "via") or loop_problem(network, prefixlen, via)


@dataclass(frozen=True, order=True)
class Route:
    """Traffic to `cidr` (a remote node's pod block) is tunnelled to node `via`:
    one route as a value, for tests and for show; tables hold ints."""

    cidr: IPv4Network
    via: IPv4Address

    def __post_init__(self) -> None:
        if not isinstance(self.cidr, IPv4Network) or not isinstance(self.via, IPv4Address):
            raise TypeError("Route needs an IPv4Network and an IPv4Address; use Route.parse for strings")
        problem = route_problem(int(self.cidr.network_address), self.cidr.prefixlen, int(self.via))
        if problem:
            raise ValueError(problem)

    @classmethod
    def parse(cls, cidr: str, via: str) -> Route:
        return cls(parse_network(cidr), parse_address(via))

    @classmethod
    def of(cls, key: int, via: int) -> Route:
        return cls(IPv4Network(network_of(key)), IPv4Address(via))

    @property
    def key(self) -> int:
        return key_of(int(self.cidr.network_address), self.cidr.prefixlen)

    def __str__(self) -> str:
        return f"{self.cidr} via {self.via}"


class DuplicateRouteError(ValueError):
    """Two routes for one CIDR; indexes are positions in the input, first < second."""

    def __init__(self, key: int, first_index: int, second_index: int) -> None:
        super().__init__(f"duplicate route for {cidr_text(key)}: #{first_index} and #{second_index}")
        self.key, self.first_index, self.second_index = key, first_index, second_index


@dataclass(frozen=True, eq=False)
class RouteSet:
    """One source's routes: parallel arrays sorted by key, one route per key.
    Equality compares the routes (keys and vias), not their origin details."""

    keys: array = field(default_factory=lambda: array(_KEYS))
    vias: array = field(default_factory=lambda: array(_VIAS))
    details: array = field(default_factory=lambda: array(_DETAILS))

    @classmethod
    def build(cls, keys: array, vias: array, details: array) -> RouteSet:
        """Sorts by key (input order on ties); DuplicateRouteError names the
        input positions of the first two routes that share a key."""
        n = len(keys)
        if all(keys[i] < keys[i + 1] for i in range(n - 1)):  # a file is often written in order
            return cls(keys, vias, details)
        order = sorted(range(n), key=keys.__getitem__)
        for a, b in zip(order, order[1:]):
            if keys[a] == keys[b]:
                raise DuplicateRouteError(keys[a], a, b)
        return cls(array(_KEYS, (keys[i] for i in order)), array(_VIAS, (vias[i] for i in order)),
                   array(_DETAILS, (details[i] for i in order)))

    @classmethod
    def of(cls, routes: Iterable[Route], detail: int = 0) -> RouteSet:
        routes = list(routes)
        return cls.build(array(_KEYS, (r.key for r in routes)), array(_VIAS, (int(r.via) for r in routes)),
                         array(_DETAILS, [detail] * len(routes)))

    def __len__(self) -> int:
        return len(self.keys)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RouteSet):
            return NotImplemented
        return self.keys == other.keys and self.vias == other.vias

    def __repr__(self) -> str:
        return f"<RouteSet {len(self)} routes>"

    def index(self, key: int) -> int:
        """The position of key, or -1."""
        i = bisect.bisect_left(self.keys, key)
        return i if i < len(self.keys) and self.keys[i] == key else -1

    def routes(self) -> list[Route]:
        return [Route.of(k, v) for k, v in zip(self.keys, self.vias)]

    def peers(self) -> list[int]:
        return sorted(set(self.vias))

    def updated(self, changes: Mapping[int, tuple[int, int] | None]) -> RouteSet:
        """A copy with changes applied: key -> (via, detail), or None to remove."""
        if len(changes) * 32 > len(self.keys):
            merged = dict(zip(self.keys, zip(self.vias, self.details)))
            for key, value in changes.items():
                if value is None:
                    merged.pop(key, None)
                else:
                    merged[key] = value
            keys = array(_KEYS, sorted(merged))
            return RouteSet(keys, array(_VIAS, (merged[k][0] for k in keys)),
                            array(_DETAILS, (merged[k][1] for k in keys)))
        keys, vias, details = array(_KEYS, self.keys), array(_VIAS, self.vias), array(_DETAILS, self.details)
        for key, value in changes.items():  # few: each insert or delete is one memmove
            i = bisect.bisect_left(keys, key)
            present = i < len(keys) and keys[i] == key
            if value is None:
                if present:
                    del keys[i], vias[i], details[i]
            elif present:
                vias[i], details[i] = value
            else:
                keys.insert(i, key)
                vias.insert(i, value[0])
                details.insert(i, value[1])
        return RouteSet(keys, vias, details)


@dataclass(frozen=True)
class Side:
    source: Source
    via: int
    detail: int


@dataclass(frozen=True)
class Conflict:
    """Two sources name different nodes for one CIDR; the winner is in the table."""
    key: int
    winner: Side
    loser: Side


def _merge_two(high: RouteSet, high_src: array, low: RouteSet, low_src: Source,
               conflicts: list[Conflict]) -> tuple[RouteSet, array]:
    """high's routes, and low's where high has none (sources alongside)."""
    if len(low) * 32 <= len(high):
        # Few low routes: copy high (at C speed) and insert them one by one.
        keys, vias, details, srcs = (array(a.typecode, a) for a in (high.keys, high.vias, high.details, high_src))
        for key, via, detail in zip(low.keys, low.vias, low.details):
            i = bisect.bisect_left(keys, key)
            if i < len(keys) and keys[i] == key:
                if vias[i] != via:
                    conflicts.append(Conflict(key, Side(Source(srcs[i]), vias[i], details[i]), Side(low_src, via, detail)))
                continue
            keys.insert(i, key)
            vias.insert(i, via)
            details.insert(i, detail)
            srcs.insert(i, low_src)
        return RouteSet(keys, vias, details), srcs
    keys, vias, details, srcs = array(_KEYS), array(_VIAS), array(_DETAILS), array(_FLAGS)
    i = j = 0
    hk, lk = high.keys, low.keys
    nh, nl = len(hk), len(lk)
    while i < nh or j < nl:
        if j >= nl or (i < nh and hk[i] <= lk[j]):
            if j < nl and hk[i] == lk[j]:
                if high.vias[i] != low.vias[j]:
                    conflicts.append(Conflict(hk[i], Side(Source(high_src[i]), high.vias[i], high.details[i]),
                                              Side(low_src, low.vias[j], low.details[j])))
                j += 1
            keys.append(hk[i])
            vias.append(high.vias[i])
            details.append(high.details[i])
            srcs.append(high_src[i])
            i += 1
        else:
            keys.append(lk[j])
            vias.append(low.vias[j])
            details.append(low.details[j])
            srcs.append(low_src)
            j += 1
    return RouteSet(keys, vias, details), srcs


@dataclass(frozen=True, eq=False)
class Table:
    """The merged table under a mode: for each CIDR its winning route, the
    source it came from and how it is carried (Kind)."""

    routes: RouteSet
    sources: array       # Source per route
    kinds: array         # Kind per route
    conflicts: tuple[Conflict, ...] = ()

    @classmethod
    def build(cls, sources: Mapping[Source, RouteSet], mode: Mode | str, node: IPv4Interface) -> Table:
        """Merges the sources by the rule (Source order) and splits the result
        as Calico's ipipMode does: CrossSubnet sends peers inside the node's
        own subnet direct on the underlay (with a /32 node address, none).
        A CIDR the kernel source routes into the TUN is encapsulated whatever
        the mode: the kernel sends its packets there (Kind.FOREIGN)."""
        mode = Mode(mode)
        conflicts: list[Conflict] = []
        merged, srcs = RouteSet(), array(_FLAGS)
        first = True
        for source in sorted(sources):
            rs = sources[source]
            if not len(rs):
                continue
            if first:
                merged, srcs, first = rs, array(_FLAGS, bytes([source])) * len(rs), False
            else:
                merged, srcs = _merge_two(merged, srcs, rs, source, conflicts)
        n = len(merged)
        if mode is Mode.ALWAYS:
            kinds = array(_FLAGS, bytes(n))
        elif mode is Mode.NEVER:
            kinds = array(_FLAGS, bytes([Kind.DIRECT])) * n
        else:
            net, mask = int(node.network.network_address), int(node.netmask)
            local = {via: Kind.DIRECT if via & mask == net else Kind.ENCAPSULATED for via in set(merged.vias)}
            kinds = array(_FLAGS, map(local.__getitem__, merged.vias))
        kernel = sources.get(Source.KERNEL)
        if kernel is not None and len(kernel):
            if len(kernel) == n:  # the kernel's routes alone (or each one also named elsewhere)
                kinds = array(_FLAGS, bytes([Kind.FOREIGN])) * n
            else:
                for key in kernel.keys:
                    kinds[merged.index(key)] = Kind.FOREIGN
        return cls(merged, srcs, kinds, tuple(conflicts))

    def __len__(self) -> int:
        return len(self.routes)

    def __repr__(self) -> str:
        return f"<Table {len(self)} routes, {len(self.conflicts)} conflicts>"

    def encapsulated_peers(self) -> list[int]:
        """The distinct vias of encapsulated routes, sorted: the datapath's
        peers, in the order its entries index them."""
        vias = self.routes.vias
        if Kind.DIRECT not in self.kinds:
            return sorted(set(vias))
        return sorted({via for via, kind in zip(vias, self.kinds) if kind != Kind.DIRECT})

    def datapath_entries(self, peer_index: Mapping[int, int]) -> DatapathEntries:
        return DatapathEntries(self, peer_index)

    @cached_property
    def counts(self) -> Counter[tuple[int, int]]:
        """Routes by (source, kind)."""
        return Counter(zip(self.sources, self.kinds))


class DatapathEntries:
    """The encapsulated routes as Datapath.set_table() reads them: (network,
    prefix length, peer index), made one at a time while it copies them,
    instead of a list of 100k tuples."""

    def __init__(self, table: Table, peer_index: Mapping[int, int]) -> None:
        self.table, self.peer_index = table, peer_index
        self.n = len(table) - table.kinds.count(Kind.DIRECT)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        index = self.peer_index
        for key, via, kind in zip(self.table.routes.keys, self.table.routes.vias, self.table.kinds):
            if kind != Kind.DIRECT:
                yield key >> 6, key & 63, index[via]
