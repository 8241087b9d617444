"""The mirror's rules on notifications built by hand: which routes are the
kernel source, which are ours, which are refused, and what a change says."""
from ipaddress import IPv4Address

from ipipfast import rtnl
from ipipfast.kernel_routes import DEV_TUN, DEV_UNDERLAY, KernelRoutes
from ipipfast.routes import Route

TUN, UNDERLAY, OTHER = 7, 2, 9
NODE = int(IPv4Address("198.18.0.10"))
OURS = 0xBF


def msg(cidr: str, via: str | None = None, *, new: bool = True, oif: int = TUN, proto: int = 80, metric: int = 0,
        tos: int = 0, nexthops: tuple = (), table: int = 254) -> rtnl.RouteMsg:
    net, plen = cidr.split("/")
    return rtnl.RouteMsg(new, int(IPv4Address(net)), int(plen), tos, table, proto, 1, 0, 0 if nexthops else oif,
                         int(IPv4Address(via)) if via else 0, metric, nexthops, False)


def key(cidr: str) -> int:
    return Route.parse(cidr, "198.18.255.1").key


def source(m: KernelRoutes) -> dict[str, str]:
    return {str(r.cidr): str(r.via) for r in m.source().routes()}


def mirror() -> KernelRoutes:
    return KernelRoutes(TUN, UNDERLAY, NODE, OURS)


def test_routes_into_the_tun_are_the_source_whatever_their_protocol() -> None:
    m = mirror()
    m.apply([msg("198.19.1.0/24", "198.18.0.11", proto=12), msg("198.19.2.0/24", "198.18.0.12", proto=80),
             msg("198.19.3.0/24", "198.18.0.13", proto=4), msg("198.19.4.0/24", "198.18.0.14", oif=OTHER),
             msg("198.19.5.0/24", "198.18.0.15", table=100)])
    assert source(m) == {"198.19.1.0/24": "198.18.0.11", "198.19.2.0/24": "198.18.0.12", "198.19.3.0/24": "198.18.0.13"}
    assert list(m.source().details) == [12, 80, 4]  # the protocol: shown as "proto bird"
    m.apply([msg("198.19.1.0/24", "198.18.0.12", proto=12)])  # replaced: re-pointed to another node
    m.apply([msg("198.19.2.0/24", "198.18.0.12", new=False)])
    assert source(m) == {"198.19.1.0/24": "198.18.0.12", "198.19.3.0/24": "198.18.0.13"}


def test_the_lowest_metric_is_the_route_in_use() -> None:
    m = mirror()
    m.apply([msg("198.19.1.0/24", "198.18.0.12", metric=32), msg("198.19.1.0/24", "198.18.0.11", metric=10)])
    assert source(m) == {"198.19.1.0/24": "198.18.0.11"}
    m.apply([msg("198.19.1.0/24", "198.18.0.11", metric=10, new=False)])
    assert source(m) == {"198.19.1.0/24": "198.18.0.12"}
    m.apply([msg("198.19.1.0/24", "198.18.0.11", metric=99, new=False)])  # no such route: nothing changes
    assert source(m) == {"198.19.1.0/24": "198.18.0.12"}


def test_refusals_are_counted_once_and_forgotten_when_the_route_goes() -> None:
    m = mirror()
    hops = ((TUN, int(IPv4Address("198.18.0.11"))), (TUN, int(IPv4Address("198.18.0.12"))))
    bad = [msg("198.19.1.0/24"), msg("198.19.2.0/24", nexthops=hops), msg("198.19.3.0/24", "198.19.3.1"),
           msg("198.19.4.0/24", "198.18.0.10"), msg("198.19.5.0/24", "198.18.0.11", tos=0x10)]
    m.apply(bad)
    m.apply(bad)  # told again (a resync, a replace): not counted again
    assert sorted(r.reason for r in m.refused().values()) == ["bad_gateway", "bad_gateway", "multipath",
                                                               "no_gateway", "tos"]
    assert dict(m.refused_total) == {"no_gateway": 1, "multipath": 1, "bad_gateway": 2, "tos": 1}
    assert source(m) == {}
    m.apply([msg("198.19.1.0/24", new=False)])
    assert len(m.refused()) == 4


def test_a_route_elsewhere_that_replaces_ours_holds_the_key_until_it_goes() -> None:
    m = mirror()
    m.wrote(key("198.19.1.0/24"), int(IPv4Address("198.18.0.11")) | DEV_TUN << 32)
    m.wrote(key("198.19.2.0/24"), int(IPv4Address("198.18.0.12")) | DEV_UNDERLAY << 32)
    m.own_changed.clear()
    m.apply([msg("198.19.1.0/24", "198.18.0.11", oif=OTHER, proto=4)])  # `ip route replace ... dev eth1`
    assert m.state.own.get(key("198.19.1.0/24")) is None and m.blocked == {key("198.19.1.0/24")}
    assert m.own_changed == {key("198.19.1.0/24")}
    m.own_changed.clear()
    m.apply([msg("198.19.1.0/24", "198.18.0.11", oif=OTHER, proto=4, new=False)])
    assert m.blocked == set() and m.own_changed == {key("198.19.1.0/24")}  # ours may go in again
    # Someone deletes ours: the next pass puts it back.
    m.own_changed.clear()
    m.apply([msg("198.19.2.0/24", proto=OURS, oif=UNDERLAY, new=False)])
    assert m.state.own.get(key("198.19.2.0/24")) is None and m.own_changed == {key("198.19.2.0/24")}


def test_a_route_into_the_tun_over_ours_is_the_source_and_not_held() -> None:
    m = mirror()
    m.wrote(key("198.19.1.0/24"), int(IPv4Address("198.18.0.11")))
    m.apply([msg("198.19.1.0/24", "198.18.0.12", proto=12)])  # BIRD replaces ours
    assert m.state.own.get(key("198.19.1.0/24")) is None and m.blocked == set()
    assert source(m) == {"198.19.1.0/24": "198.18.0.12"}


def test_a_dump_replaces_the_mirror_and_says_whether_it_differed() -> None:
    m = mirror()
    routes = [msg("198.19.1.0/24", "198.18.0.11"), msg("198.19.2.0/24", "198.18.0.12", proto=OURS),
              msg("198.19.3.0/24", "198.18.0.13", metric=5), msg("198.19.3.0/24", "198.18.0.14", metric=1)]

    def dump(consume, routes=routes):
        for r in routes:
            consume(r)
        return False

    assert not m.load(dump)  # the first: nothing to differ from
    assert source(m) == {"198.19.1.0/24": "198.18.0.11", "198.19.3.0/24": "198.18.0.14"}
    assert m.state.own.get(key("198.19.2.0/24")) == int(IPv4Address("198.18.0.12")) | DEV_TUN << 32
    assert not m.load(dump) and (m.resyncs, m.resyncs_changed) == (1, 0)
    m.apply([msg("198.19.1.0/24", "198.18.0.11", new=False)])  # the mirror now says gone; the kernel did not
    assert m.load(dump) and (m.resyncs, m.resyncs_changed) == (2, 1)
    assert source(m)["198.19.1.0/24"] == "198.18.0.11"  # put right
