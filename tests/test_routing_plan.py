"""The daemon's Plan (a table, its peers and their datapath indexes) kept
across route changes that leave the peers as they are, against plans built
afresh."""
from ipaddress import IPv4Address, IPv4Interface

from ipipfast.daemon import Plan
from ipipfast.routes import Mode, Route, RouteSet, Source, Table

NODE = IPv4Interface("198.18.0.10/24")


def table(*routes: tuple[str, str], mode: Mode = Mode.CROSS_SUBNET) -> Table:
    return Table.build({Source.ETCD: RouteSet.of(Route.parse(c, v) for c, v in routes)}, mode, NODE)


BASE = (("198.19.1.0/24", "198.18.0.11"), ("198.19.2.0/24", "198.18.1.12"), ("198.19.3.0/24", "198.18.1.13"))


def test_a_route_moved_between_known_peers_keeps_the_peers() -> None:
    first = Plan.of(table(*BASE))
    moved = table(BASE[0], BASE[1], ("198.19.3.0/24", "198.18.1.12"), ("198.19.4.0/24", "198.18.1.13"))
    kept, fresh = Plan.of(moved, first), Plan.of(moved)
    assert kept.table is moved
    assert kept.peers is first.peers and kept.encapsulated is first.encapsulated  # the daemon's caches hold
    assert (kept.peers, kept.encapsulated, kept.index) == (fresh.peers, fresh.encapsulated, fresh.index)
    assert list(kept.entries()) == list(fresh.entries())
    assert kept.peers == tuple(map(IPv4Address, ("198.18.1.12", "198.18.1.13", "198.18.0.11")))


def test_new_peers_or_a_new_split_make_new_peers() -> None:
    first = Plan.of(table(*BASE))
    for t in (table(*BASE, ("198.19.4.0/24", "198.18.1.14")),  # a new node
              table(*BASE[:2]),  # one gone
              table(*BASE, mode=Mode.ALWAYS)):  # the same nodes, one more encapsulated
        kept, fresh = Plan.of(t, first), Plan.of(t)
        assert kept.peers is not first.peers
        assert (kept.peers, kept.encapsulated, kept.index) == (fresh.peers, fresh.encapsulated, fresh.index)
        assert list(kept.entries()) == list(fresh.entries())
