"""Route sets, the merge rule and the mode split, against references built
here from ipaddress objects and plain dicts."""
import random
from array import array
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import pytest

from ipipfast.routes import (Conflict, DuplicateRouteError, Kind, Mode, Route, RouteSet, Side, Source, Table,
                             cidr_text, fast_address, fast_network, key_of, network_of, parse_network)

NODE = IPv4Interface("198.18.0.10/24")


def R(cidr: str, via: str) -> Route:
    return Route.parse(cidr, via)


def rs(*routes: tuple[str, str], detail: int = 0) -> RouteSet:
    return RouteSet.of((R(c, v) for c, v in routes), detail)


def test_keys_sort_as_networks_do() -> None:
    rng = random.Random(0)
    nets = list({IPv4Network((rng.getrandbits(32), p), strict=False) for p in range(33) for _ in range(20)})
    keys = [key_of(int(n.network_address), n.prefixlen) for n in nets]
    assert [nets[keys.index(k)] for k in sorted(keys)] == sorted(nets)
    assert all(IPv4Network(network_of(k)) == n for k, n in zip(keys, nets))
    assert cidr_text(key_of(0xC6130100, 24)) == "198.19.1.0/24"


@pytest.mark.parametrize("text", [
    "198.19.1.0/24", "198.19.1.7", "0.0.0.0/0", "255.255.255.255/32", "10.0.0.0/8", "10.0.0.0/08",
    "198.19.1.1/24", "198.19.01.0/24", "198.19.256.0/24", "198.19.1/24", "198.19.1.0/33", "198.19.1.0/",
    "198.19.1.0/-1", "198.19.1.0/255.255.255.0", " 198.19.1.0/24", "198.19.1.0/24 ", "198.19.1.0/2a",
    "1.2.3.4.5", "0x1.2.3.4", "198.19.1.0/024", "", "/24", "١٩٨.19.1.0/24"])
def test_fast_network_agrees_with_ipaddress(text: str) -> None:
    """fast_network answers only what ipaddress accepts, and the same; the
    rest goes to parse_network, which has the words for the error."""
    try:
        net = parse_network(text)
    except ValueError:
        net = None
    fast = fast_network(text)
    if fast is not None:
        assert net is not None and (int(net.network_address), net.prefixlen) == fast


@pytest.mark.parametrize("text", ["198.18.0.11", "0.0.0.0", "255.255.255.255", "198.18.0.011", "198.18.0",
                                  "198.18.0.256", "198.18.0.1 ", "1.2.3.4\0", "198.18.0.1/32"])
def test_fast_address_agrees_with_ipaddress(text: str) -> None:
    try:
        want = int(IPv4Address(text))
    except ValueError:
        want = None
    got = fast_address(text)
    assert got is None or got == want


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
        ("0.0.0.0/0", "198.18.0.1", "lies inside the routed CIDR 0.0.0.0/0"),
        ("10.0.0.0/24", "198.18.0", "invalid IPv4 address"),
    ],
    ids=["host-bits", "bad-prefix", "short-cidr", "via-unspecified", "via-multicast", "via-broadcast",
         "via-loopback", "via-inside-cidr", "via-inside-default", "bad-via"],
)
def test_route_validation(cidr: str, via: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("?", r"\?")):
        R(cidr, via)


def test_route_needs_ip_objects() -> None:
    with pytest.raises(TypeError):
        Route("10.0.0.0/24", "198.18.0.1")  # type: ignore[arg-type]


def test_parse_network_bare_address_is_host_route() -> None:
    assert parse_network("10.0.0.1") == IPv4Network("10.0.0.1/32")


def test_route_set_sorts_and_keeps_details() -> None:
    keys = array("Q", [key_of(0x0A020000, 16), key_of(0x0A010000, 24), key_of(0x0A010000, 16)])
    s = RouteSet.build(keys, array("I", [1, 2, 3]), array("I", [10, 20, 30]))
    assert [str(r.cidr) for r in s.routes()] == ["10.1.0.0/16", "10.1.0.0/24", "10.2.0.0/16"]
    assert list(s.vias) == [3, 2, 1] and list(s.details) == [30, 20, 10]
    assert s.index(key_of(0x0A010000, 24)) == 1 and s.index(key_of(0x0A030000, 16)) == -1
    assert s == RouteSet.build(keys, array("I", [1, 2, 3]), array("I", [0, 0, 0]))  # details are not the value


def test_duplicate_cidr_is_refused_naming_both_positions() -> None:
    routes = [R("10.0.0.0/24", "198.18.0.1"), R("10.9.0.0/24", "198.18.0.1"), R("10.0.0.0/24", "198.18.0.2")]
    with pytest.raises(DuplicateRouteError) as e:
        RouteSet.of(routes)
    assert (e.value.first_index, e.value.second_index) == (0, 2)
    assert e.value.key == routes[0].key


@pytest.mark.parametrize("n_changes", [3, 400], ids=["few (inserts)", "many (rebuild)"])
def test_updated_matches_a_dict(n_changes: int) -> None:
    rng = random.Random(n_changes)
    base = {key_of(rng.getrandbits(24) << 8, 24): (rng.getrandbits(32), rng.randrange(256)) for _ in range(1000)}
    keys = array("Q", sorted(base))
    s = RouteSet(keys, array("I", (base[k][0] for k in keys)), array("I", (base[k][1] for k in keys)))
    changes: dict[int, tuple[int, int] | None] = {}
    for _ in range(n_changes):
        pick = rng.random()
        key = rng.choice(keys) if pick < 0.6 else key_of(rng.getrandbits(24) << 8, 24)
        changes[key] = None if pick < 0.3 else (rng.getrandbits(32), rng.randrange(256))
    want = dict(base)
    for k, v in changes.items():
        if v is None:
            want.pop(k, None)
        else:
            want[k] = v
    got = s.updated(changes)
    assert list(got.keys) == sorted(want)
    assert list(zip(got.vias, got.details)) == [want[k] for k in sorted(want)]
    assert list(s.keys) == list(keys)  # the original is left as it was


def reference_merge(sources: dict[Source, list[tuple[str, str]]]) -> tuple[dict[IPv4Network, tuple], set]:
    """The rule written out: per CIDR, the first source in file, kernel, etcd order."""
    table: dict[IPv4Network, tuple[IPv4Address, Source]] = {}
    conflicts = set()
    for source in (Source.FILE, Source.KERNEL, Source.ETCD):
        for cidr, via in sources.get(source, []):
            net, addr = IPv4Network(cidr), IPv4Address(via)
            if net in table:
                if table[net][0] != addr:
                    conflicts.add((net, table[net][1], table[net][0], source, addr))
            else:
                table[net] = (addr, source)
    return table, conflicts


@pytest.mark.parametrize("seed", range(6))
def test_merge_follows_the_rule(seed: int) -> None:
    rng = random.Random(seed)
    pool = [f"198.19.{i}.0/24" for i in range(60)]
    vias = [f"198.18.{rng.randrange(2)}.{i}" for i in range(11, 16)]
    sizes = {Source.FILE: rng.choice([0, 2, 40]), Source.KERNEL: rng.choice([0, 1, 40]), Source.ETCD: rng.choice([0, 30])}
    given = {src: [(c, rng.choice(vias)) for c in rng.sample(pool, n)] for src, n in sizes.items()}
    want, want_conflicts = reference_merge(given)
    t = Table.build({src: rs(*routes, detail=int(src) + 7) for src, routes in given.items()}, Mode.ALWAYS, NODE)
    got = {r.cidr: (r.via, Source(s)) for r, s in zip(t.routes.routes(), t.sources)}
    assert got == want
    assert list(t.routes.details) == [int(s) + 7 for s in t.sources]  # each route keeps its own origin
    assert {(IPv4Network(network_of(c.key)), c.winner.source, IPv4Address(c.winner.via), c.loser.source,
             IPv4Address(c.loser.via)) for c in t.conflicts} == want_conflicts
    kernel = {IPv4Network(c) for c, _ in given[Source.KERNEL]}
    assert [k == Kind.FOREIGN for k in t.kinds] == [r.cidr in kernel for r in t.routes.routes()]


def test_conflict_keeps_both_sides() -> None:
    t = Table.build({Source.FILE: rs(("198.19.1.0/24", "198.18.0.11"), detail=12),
                     Source.KERNEL: rs(("198.19.1.0/24", "198.18.0.12"), ("198.19.2.0/24", "198.18.0.12"), detail=80)},
                    Mode.ALWAYS, NODE)
    assert t.conflicts == (Conflict(R("198.19.1.0/24", "198.18.0.11").key,
                                    Side(Source.FILE, int(IPv4Address("198.18.0.11")), 12),
                                    Side(Source.KERNEL, int(IPv4Address("198.18.0.12")), 80)),)
    # The kernel routes the CIDR into the TUN: encapsulated, to the file's node, nothing of ours to install.
    assert list(t.kinds) == [Kind.FOREIGN, Kind.FOREIGN]
    assert t.routes.routes() == [R("198.19.1.0/24", "198.18.0.11"), R("198.19.2.0/24", "198.18.0.12")]


def test_same_route_from_two_sources_is_no_conflict() -> None:
    t = Table.build({Source.FILE: rs(("198.19.1.0/24", "198.18.0.11")),
                     Source.KERNEL: rs(("198.19.1.0/24", "198.18.0.11"))}, Mode.ALWAYS, NODE)
    assert t.conflicts == () and list(t.sources) == [Source.FILE]


SPLIT = rs(
    ("10.0.1.0/26", "198.18.0.11"),  # same /24 as the node
    ("10.0.2.0/26", "198.18.0.12"),  # same /24 as the node
    ("10.0.3.0/26", "198.18.1.13"),  # other subnet
    ("10.0.4.0/26", "198.18.0.10"),  # the node itself
)


@pytest.mark.parametrize(
    "mode, node, encapsulated",
    [
        (Mode.ALWAYS, "198.18.0.10/24", ["10.0.1.0/26", "10.0.2.0/26", "10.0.3.0/26", "10.0.4.0/26"]),
        (Mode.NEVER, "198.18.0.10/24", []),
        (Mode.CROSS_SUBNET, "198.18.0.10/24", ["10.0.3.0/26"]),
        (Mode.CROSS_SUBNET, "198.18.0.10/16", []),
        # A /32 node address: only the node itself is "local".
        (Mode.CROSS_SUBNET, "198.18.0.10/32", ["10.0.1.0/26", "10.0.2.0/26", "10.0.3.0/26"]),
        ("CrossSubnet", "198.18.0.10/24", ["10.0.3.0/26"]),
    ],
    ids=["always", "never", "cross-subnet-24", "cross-subnet-16", "cross-subnet-32", "mode-as-string"],
)
def test_split(mode: Mode, node: str, encapsulated: list[str]) -> None:
    t = Table.build({Source.FILE: SPLIT}, mode, IPv4Interface(node))
    got = {str(r.cidr): Kind(k) for r, k in zip(t.routes.routes(), t.kinds)}
    assert got == {c: Kind.ENCAPSULATED if c in encapsulated else Kind.DIRECT for c in got}
    assert [IPv4Address(p) for p in t.encapsulated_peers()] == sorted(
        {r.via for r in t.routes.routes() if str(r.cidr) in encapsulated})


def test_a_kernel_route_into_the_tun_is_encapsulated_whatever_the_mode() -> None:
    t = Table.build({Source.FILE: SPLIT, Source.KERNEL: rs(("10.0.1.0/26", "198.18.0.11"))}, Mode.NEVER, NODE)
    assert [Kind(k) for k in t.kinds] == [Kind.FOREIGN, Kind.DIRECT, Kind.DIRECT, Kind.DIRECT]


def test_split_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError):
        Table.build({Source.FILE: SPLIT}, "Sometimes", NODE)


def test_datapath_entries_are_the_encapsulated_routes_by_peer_index() -> None:
    t = Table.build({Source.FILE: rs(("10.0.1.0/26", "198.18.1.20"), ("10.0.0.0/16", "198.18.1.3"),
                                     ("10.0.2.0/24", "198.18.0.20"), ("10.0.3.0/24", "198.18.1.20"))},
                    Mode.CROSS_SUBNET, NODE)
    peers = t.encapsulated_peers()
    assert [str(IPv4Address(p)) for p in peers] == ["198.18.1.3", "198.18.1.20"]
    entries = t.datapath_entries({p: i for i, p in enumerate(peers)})
    assert len(entries) == 3
    assert list(entries) == [(0x0A000000, 16, 0), (0x0A000100, 26, 1), (0x0A000300, 24, 1)]
    assert list(Table.build({}, Mode.ALWAYS, NODE).datapath_entries({})) == []


def test_counts_by_source_and_kind() -> None:
    t = Table.build({Source.FILE: SPLIT, Source.KERNEL: rs(("10.9.0.0/24", "198.18.1.13"))}, Mode.CROSS_SUBNET, NODE)
    assert t.counts == {(Source.FILE, Kind.ENCAPSULATED): 1, (Source.FILE, Kind.DIRECT): 3,
                        (Source.KERNEL, Kind.FOREIGN): 1}


def test_100k_routes_merge_into_one_table() -> None:
    n = 100_000
    keys = array("Q", (key_of(0x0A000000 + (i << 6), 26) for i in range(n)))
    vias = array("I", (0xC6120001 + i % 1000 for i in range(n)))
    file = RouteSet.build(keys, vias, array("I", range(n)))
    kernel = RouteSet(array("Q", keys[::50]), array("I", vias[::50]), array("I", [12] * (n // 50)))
    t = Table.build({Source.FILE: file, Source.KERNEL: kernel}, Mode.ALWAYS, NODE)
    assert len(t) == n and t.conflicts == () and t.kinds.count(Kind.FOREIGN) == n // 50
    assert len(t.encapsulated_peers()) == 1000
