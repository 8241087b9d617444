import random
import time
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import pytest

from ipipfast.routes import DuplicateRouteError, Mode, Route, RouteTable, parse_network


def R(cidr: str, via: str) -> Route:
    return Route.parse(cidr, via)


def table(*routes: tuple[str, str]) -> RouteTable:
    return RouteTable.from_routes(R(c, v) for c, v in routes)


def test_table_is_sorted_with_sorted_distinct_peers() -> None:
    t = table(
        ("10.2.0.0/16", "198.18.0.9"),
        ("10.1.0.0/24", "198.18.0.10"),
        ("10.1.0.0/16", "198.18.0.9"),
        ("10.0.0.0/8", "198.18.0.2"),
    )
    assert [str(r.cidr) for r in t.routes] == ["10.0.0.0/8", "10.1.0.0/16", "10.1.0.0/24", "10.2.0.0/16"]
    assert list(t.routes) == sorted(t.routes)  # same order as Route's own ordering
    assert t.peers == (IPv4Address("198.18.0.2"), IPv4Address("198.18.0.9"), IPv4Address("198.18.0.10"))
    assert len(t) == 4


def test_table_is_an_immutable_value() -> None:
    routes = [R("10.1.0.0/16", "198.18.0.1"), R("10.0.0.0/16", "198.18.0.2")]
    a, b = RouteTable.from_routes(routes), RouteTable.from_routes(reversed(routes))
    assert a == b and hash(a) == hash(b)
    with pytest.raises(AttributeError):
        a.routes = ()  # type: ignore[misc]


def test_duplicate_cidr_is_refused_naming_both() -> None:
    routes = [R("10.0.0.0/24", "198.18.0.1"), R("10.9.0.0/24", "198.18.0.1"), R("10.0.0.0/24", "198.18.0.2")]
    with pytest.raises(DuplicateRouteError) as e:
        RouteTable.from_routes(routes)
    assert (e.value.first_index, e.value.second_index) == (0, 2)
    assert (e.value.first, e.value.second) == (routes[0], routes[2])
    assert "duplicate route for 10.0.0.0/24" in str(e.value)


@pytest.mark.parametrize(
    "cidr, via, message",
    [
        ("10.0.0.1/24", "198.18.0.1", "has host bits set; did you mean 10.0.0.0/24?"),
        ("10.0.0.0/33", "198.18.0.1", "invalid IPv4 CIDR"),
        ("10.0.0/24", "198.18.0.1", "invalid IPv4 CIDR"),
        ("10.0.0.0/24", "0.0.0.0", "unspecified"),
        ("10.0.0.0/24", "224.0.0.5", "multicast"),
        ("10.0.0.0/24", "255.255.255.255", "broadcast"),
        ("10.0.0.0/24", "127.0.0.1", "loopback"),
        ("10.0.0.0/24", "10.0.0.7", "lies inside the routed CIDR"),
        ("10.0.0.0/24", "198.18.0", "invalid IPv4 address"),
    ],
    ids=["host-bits", "bad-prefix", "short-cidr", "via-unspecified", "via-multicast", "via-broadcast",
         "via-loopback", "via-inside-cidr", "bad-via"],
)
def test_route_validation(cidr: str, via: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("?", r"\?")):
        R(cidr, via)


def test_route_needs_ip_objects() -> None:
    with pytest.raises(TypeError):
        Route("10.0.0.0/24", "198.18.0.1")  # type: ignore[arg-type]


def test_parse_network_bare_address_is_host_route() -> None:
    assert parse_network("10.0.0.1") == IPv4Network("10.0.0.1/32")


SPLIT_TABLE = table(
    ("10.0.1.0/26", "198.18.0.11"),  # same /24 as the node
    ("10.0.2.0/26", "198.18.0.12"),  # same /24 as the node
    ("10.0.3.0/26", "198.18.1.13"),  # other subnet
    ("10.0.4.0/26", "198.18.0.10"),  # the node itself
)


@pytest.mark.parametrize(
    "mode, node, encapsulated, direct",
    [
        (Mode.ALWAYS, "198.18.0.10/24", ["10.0.1.0/26", "10.0.2.0/26", "10.0.3.0/26", "10.0.4.0/26"], []),
        (Mode.NEVER, "198.18.0.10/24", [], ["10.0.1.0/26", "10.0.2.0/26", "10.0.3.0/26", "10.0.4.0/26"]),
        (Mode.CROSS_SUBNET, "198.18.0.10/24", ["10.0.3.0/26"], ["10.0.1.0/26", "10.0.2.0/26", "10.0.4.0/26"]),
        (Mode.CROSS_SUBNET, "198.18.0.10/16", [], ["10.0.1.0/26", "10.0.2.0/26", "10.0.3.0/26", "10.0.4.0/26"]),
        # A /32 node address: only the node itself is "local".
        (Mode.CROSS_SUBNET, "198.18.0.10/32", ["10.0.1.0/26", "10.0.2.0/26", "10.0.3.0/26"], ["10.0.4.0/26"]),
        ("CrossSubnet", "198.18.0.10/24", ["10.0.3.0/26"], ["10.0.1.0/26", "10.0.2.0/26", "10.0.4.0/26"]),
    ],
    ids=["always", "never", "cross-subnet-24", "cross-subnet-16", "cross-subnet-32", "mode-as-string"],
)
def test_split(mode: Mode, node: str, encapsulated: list[str], direct: list[str]) -> None:
    enc, dir_ = SPLIT_TABLE.split(mode, IPv4Interface(node))
    assert [str(r.cidr) for r in enc.routes] == encapsulated
    assert [str(r.cidr) for r in dir_.routes] == direct
    assert set(enc.peers) == {r.via for r in enc.routes}  # each half indexes only its own peers


def test_split_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError):
        SPLIT_TABLE.split("Sometimes", IPv4Interface("198.18.0.10/24"))


def test_datapath_entries() -> None:
    t = table(("10.0.1.0/26", "198.18.0.20"), ("10.0.0.0/16", "198.18.0.3"), ("10.0.2.0/24", "198.18.0.20"))
    assert t.datapath_entries() == [
        (0x0A000000, 16, 0),
        (0x0A000100, 26, 1),
        (0x0A000200, 24, 1),
    ]
    assert [t.peers[i] for _, _, i in t.datapath_entries()] == [r.via for r in t.routes]
    assert RouteTable().datapath_entries() == []


@pytest.mark.parametrize(
    "old, new, added, removed",
    [
        ([], [], set(), set()),
        ([("10.0.0.0/24", "198.18.0.1")], [("10.0.0.0/24", "198.18.0.1")], set(), set()),
        ([], [("10.0.0.0/24", "198.18.0.1")], {("10.0.0.0/24", "198.18.0.1")}, set()),
        ([("10.0.0.0/24", "198.18.0.1")], [], set(), {("10.0.0.0/24", "198.18.0.1")}),
        (
            [("10.0.0.0/24", "198.18.0.1"), ("10.0.1.0/24", "198.18.0.1")],
            [("10.0.0.0/24", "198.18.0.2"), ("10.0.1.0/24", "198.18.0.1"), ("10.0.2.0/24", "198.18.0.3")],
            {("10.0.0.0/24", "198.18.0.2"), ("10.0.2.0/24", "198.18.0.3")},
            {("10.0.0.0/24", "198.18.0.1")},
        ),
    ],
    ids=["empty", "unchanged", "added", "removed", "via-changed-and-added"],
)
def test_diff(old: list, new: list, added: set, removed: set) -> None:
    got_added, got_removed = table(*old).diff(table(*new))
    assert got_added == {R(*r) for r in added}
    assert got_removed == {R(*r) for r in removed}


def test_build_100k_routes_quickly() -> None:
    routes = [
        Route(IPv4Network((0x0A000000 + (i << 6), 26)), IPv4Address(0xC6120001 + i % 1000)) for i in range(100_000)
    ]
    random.Random(0).shuffle(routes)
    start = time.perf_counter()
    t = RouteTable.from_routes(routes)
    elapsed = time.perf_counter() - start
    assert len(t) == 100_000 and len(t.peers) == 1000
    assert elapsed < 1.0, f"building took {elapsed:.2f}s"
