"""PeerHops without a kernel: which peers a changed route has asked again
(against ipaddress's idea of a prefix), and what an answer makes of a
peer's next hop. (With the kernel: tests/test_crosssubnet.py.)"""
from __future__ import annotations

import errno
from collections.abc import Iterable
from ipaddress import IPv4Address, IPv4Network

from hypothesis import given, settings
from hypothesis import strategies as st

from ipipfast import rtnl
from ipipfast.peer_hops import NO_HOP, PeerHops

UNDERLAY, OTHER = 2, 7
addresses = st.integers(min_value=int(IPv4Address("198.18.0.0")), max_value=int(IPv4Address("198.19.255.255")))


def route(dst: int, dst_len: int, *, new: bool = True, oif: int = UNDERLAY, gateway: int = 0,
          flags: int = 0) -> rtnl.RouteMsg:
    return rtnl.RouteMsg(new, dst, dst_len, 0, rtnl.RT_TABLE_MAIN, 4, rtnl.RTN_UNICAST, flags, oif, gateway, 0, (),
                         False)


class Kernel:
    """Answers lookups from a table of its own, and remembers what it was asked."""

    def __init__(self, answers: dict[int, rtnl.RouteMsg | int] | None = None) -> None:
        self.answers = answers or {}
        self.asked: list[list[int]] = []

    def lookup(self, peers: Iterable[int]) -> dict[int, rtnl.RouteMsg | int]:
        peers = list(peers)
        self.asked.append(peers)
        return {p: self.answers.get(p, route(p, 32)) for p in peers}


@settings(max_examples=200, deadline=None)
@given(st.lists(addresses, min_size=1, max_size=30), st.lists(st.tuples(addresses, st.integers(0, 32)), max_size=5))
def test_a_changed_route_asks_again_exactly_the_peers_inside_its_prefix(peers: list[int], changes) -> None:
    hops, kernel = PeerHops(UNDERLAY), Kernel()
    hops.track(peers)
    hops.resolve(kernel.lookup)
    assert sorted(kernel.asked[0]) == sorted(set(peers))
    messages = [route(int(IPv4Network((addr, plen), strict=False).network_address), plen) for addr, plen in changes]
    messages.append(route(peers[0], 32, flags=rtnl.RTM_F_CLONED))  # a cached exception: no route changed
    messages.append(rtnl.LinkMsg(True, UNDERLAY, rtnl.IFF_UP, 1500, "u0"))
    hops.routes_changed(messages)
    hops.resolve(kernel.lookup)
    inside = {p for p in peers for addr, plen in changes if IPv4Address(p) in IPv4Network((addr, plen), strict=False)}
    assert set(kernel.asked[1] if len(kernel.asked) > 1 else []) == inside


def test_next_hops_as_the_answers_say() -> None:
    on_link, routed, elsewhere, unreachable, gone = (int(IPv4Address(f"198.18.{i}.10")) for i in range(5))
    gateway = int(IPv4Address("198.18.0.1"))
    kernel = Kernel({routed: route(routed, 32, gateway=gateway), elsewhere: route(elsewhere, 32, oif=OTHER),
                     unreachable: errno.ENETUNREACH})
    hops = PeerHops(UNDERLAY)
    hops.track([on_link, routed, elsewhere, unreachable, gone])
    # A peer without a next hop from the start is no change: nothing had it.
    assert hops.resolve(kernel.lookup) == {on_link, routed, gone}
    assert [hops.get(p) for p in (on_link, routed, elsewhere, unreachable)] == [on_link, gateway, NO_HOP, NO_HOP]
    assert hops.gateways == {gateway}  # routes via it go onlink; via an on-link peer, not
    assert hops.resolve(kernel.lookup) == set() and len(kernel.asked) == 1  # nothing stale: nothing asked

    kernel.answers[on_link] = route(on_link, 32, gateway=gateway)  # now behind the router too
    kernel.answers[routed] = errno.ENETUNREACH
    hops.routes_changed([route(int(IPv4Address("198.18.0.0")), 16, new=False)])
    assert hops.resolve(kernel.lookup) == {on_link, routed}
    assert (hops.get(on_link), hops.get(routed)) == (gateway, NO_HOP)

    hops.track([on_link])  # the others left the table: forgotten
    assert hops.hops == {on_link: gateway} and hops.get(gone) == NO_HOP
    hops.all_stale()
    hops.resolve(kernel.lookup)
    assert kernel.asked[-1] == [on_link]
