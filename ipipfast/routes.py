"""The IPIP route table (pod CIDR -> peer node) and Calico's ipipMode split."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

_BROADCAST = IPv4Address("255.255.255.255")


class Mode(StrEnum):
    """Calico's IPPool ipipMode, spelled as Calico spells it (str(Mode.ALWAYS) == "Always")."""

    ALWAYS = "Always"
    CROSS_SUBNET = "CrossSubnet"
    NEVER = "Never"


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


def check_unicast(addr: IPv4Address, what: str) -> None:
    """Refuse addresses a tunnel endpoint can never have."""
    for bad, kind in (
        (addr.is_unspecified, "unspecified"),
        (addr.is_multicast, "multicast"),
        (addr == _BROADCAST, "broadcast"),
        (addr.is_loopback, "loopback"),
    ):
        if bad:
            raise ValueError(f"{what} {addr} is a {kind} address, not a unicast one")


@dataclass(frozen=True, order=True)
class Route:
    """Traffic to `cidr` (a remote node's pod block) is tunnelled to node `via`."""

    cidr: IPv4Network
    via: IPv4Address

    def __post_init__(self) -> None:
        if not isinstance(self.cidr, IPv4Network) or not isinstance(self.via, IPv4Address):
            raise TypeError("Route needs an IPv4Network and an IPv4Address; use Route.parse for strings")
        check_unicast(self.via, "via")
        if self.via in self.cidr:
            # The outer packet to `via` would itself match the route: a tunnel loop.
            raise ValueError(f"via {self.via} lies inside the routed CIDR {self.cidr}")

    @classmethod
    def parse(cls, cidr: str, via: str) -> Route:
        return cls(parse_network(cidr), parse_address(via))

    def __str__(self) -> str:
        return f"{self.cidr} via {self.via}"


class DuplicateRouteError(ValueError):
    """Two routes for the same CIDR; indexes are positions in the input, first < second."""

    def __init__(self, first: Route, second: Route, first_index: int, second_index: int) -> None:
        super().__init__(f"duplicate route for {first.cidr}: {first} (#{first_index}) and {second} (#{second_index})")
        self.first, self.second = first, second
        self.first_index, self.second_index = first_index, second_index


def _key(route: Route) -> tuple[int, int]:
    # Same order as Route's own (IPv4Network sorts by address, then prefix), but on
    # ints: comparing ipaddress objects in Python is too slow for 100k routes.
    return int(route.cidr.network_address), route.cidr.prefixlen


@dataclass(frozen=True, repr=False)
class RouteTable:
    """An immutable, validated route table; build a new one to change it."""

    routes: tuple[Route, ...] = ()
    peers: tuple[IPv4Address, ...] = field(init=False)

    def __post_init__(self) -> None:
        given = tuple(self.routes)
        keys = [_key(r) for r in given]
        order = sorted(range(len(given)), key=keys.__getitem__)  # stable: input order on ties
        for a, b in zip(order, order[1:]):
            if keys[a] == keys[b]:
                raise DuplicateRouteError(given[a], given[b], a, b)
        routes = tuple(given[i] for i in order)
        object.__setattr__(self, "routes", routes)
        object.__setattr__(self, "peers", tuple(sorted({r.via for r in routes}, key=int)))

    @classmethod
    def from_routes(cls, routes: Iterable[Route]) -> RouteTable:
        """Sort and validate; raises DuplicateRouteError for two routes to one CIDR."""
        return cls(tuple(routes))

    def __len__(self) -> int:
        return len(self.routes)

    def __repr__(self) -> str:
        return f"<RouteTable {len(self.routes)} routes, {len(self.peers)} peers>"

    def split(self, mode: Mode | str, node: IPv4Interface) -> tuple[RouteTable, RouteTable]:
        """(encapsulated, direct) as Calico's ipipMode decides.

        CrossSubnet sends peers inside the node's own subnet direct on the underlay,
        so with a /32 node address every peer is encapsulated.
        """
        mode = Mode(mode)
        if mode is Mode.ALWAYS:
            return self, RouteTable()
        if mode is Mode.NEVER:
            return RouteTable(), self
        local = node.network
        direct = [r for r in self.routes if r.via in local]
        encapsulated = [r for r in self.routes if r.via not in local]
        return RouteTable(tuple(encapsulated)), RouteTable(tuple(direct))

    def datapath_entries(self) -> list[tuple[int, int, int]]:
        """(network as host-order int, prefix length, index into self.peers), sorted."""
        index = {peer: i for i, peer in enumerate(self.peers)}
        return [(int(r.cidr.network_address), r.cidr.prefixlen, index[r.via]) for r in self.routes]

    def diff(self, other: RouteTable) -> tuple[frozenset[Route], frozenset[Route]]:
        """(added, removed) turning self into `other`: `old.diff(new)`.

        A CIDR whose via changed is in both sets: remove before adding, or match
        the kernel route on via too, so the new route is not deleted.
        """
        old, new = set(self.routes), set(other.routes)
        return frozenset(new - old), frozenset(old - new)
