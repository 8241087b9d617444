"""The rtnetlink codec against the kernel and iproute2: what we encode, the
kernel installs and `ip -json route` shows; what the kernel dumps and
notifies, we decode. Each check runs in a testbed node's namespace."""
from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address

import pytest

from ipipfast import rtnl
from ipipfast_lab.testbed import Node, Testbed

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")]

OURS = 0xBF


def ip4(text: str) -> int:
    return int(IPv4Address(text))


def ip_routes(*args: str) -> list[dict]:
    out = subprocess.run(["ip", "-json", "route", "show", *args], capture_output=True, text=True, check=True).stdout
    return json.loads(out or "[]")


def dumped(sock: rtnl.RouteSocket) -> list[rtnl.RouteMsg]:
    out: list[rtnl.RouteMsg] = []
    assert not sock.dump(out.append)
    return out


@pytest.fixture(scope="module")
def node() -> Iterator[tuple[Testbed, Node]]:
    with Testbed(nodes=2, pods_per_node=1) as tb:
        yield tb, tb.nodes[0]


def in_node(node: tuple[Testbed, Node], fn: Callable[[Node], None]) -> None:
    tb, n = node
    tb.in_netns(n, fn, n)


def test_encoded_routes_are_what_iproute2_shows_and_the_dump_gives_back(node) -> None:
    def check(n: Node) -> None:
        dev = socket.if_nametoindex(n.interface)
        sock = rtnl.RouteSocket(OURS)
        peer, me = ip4("198.18.0.11"), ip4(n.ip)
        assert sock.write([
            rtnl.RouteOp("add", ip4("198.19.100.0"), 24, dev, peer, onlink=True, prefsrc=me),
            rtnl.RouteOp("add", ip4("198.19.101.0"), 26, dev, peer),
            rtnl.RouteOp("add", ip4("198.19.102.7"), 32, dev, peer),
        ]) == []
        shown = {r["dst"]: r for r in ip_routes("proto", str(OURS))}
        assert set(shown) == {"198.19.100.0/24", "198.19.101.0/26", "198.19.102.7"}
        a = shown["198.19.100.0/24"]
        assert (a["gateway"], a["dev"], a["prefsrc"], a["flags"]) == ("198.18.0.11", n.interface, n.ip, ["onlink"])
        assert shown["198.19.101.0/26"]["flags"] == [] and "prefsrc" not in shown["198.19.101.0/26"]
        ours = {(m.dst, m.dst_len): m for m in dumped(sock) if m.protocol == OURS}
        m = ours[ip4("198.19.100.0"), 24]
        assert (m.oif, m.gateway, m.table, m.priority, m.tos, m.nexthops) == (dev, peer, 254, 0, 0, ())
        assert m.flags & rtnl.RTNH_F_ONLINK and m.type == rtnl.RTN_UNICAST and m.new
        # A replace moves a route in one message; a delete matches our protocol only.
        assert sock.write([rtnl.RouteOp("replace", ip4("198.19.101.0"), 26, dev, ip4("198.18.0.12"))]) == []
        assert ip_routes("198.19.101.0/26")[0]["gateway"] == "198.18.0.12"
        subprocess.run(["ip", "route", "add", "198.19.103.0/24", "via", "198.18.0.11", "proto", "static"], check=True)
        failed = sock.write([rtnl.RouteOp("delete", ip4("198.19.103.0"), 24),
                             rtnl.RouteOp("delete", ip4("198.19.100.0"), 24)])
        assert [(op.dst, code) for op, code, _ in failed] == [(ip4("198.19.103.0"), errno.ESRCH)]
        assert [r["dst"] for r in ip_routes("198.19.103.0/24")] == ["198.19.103.0/24"]  # not ours: still there
        assert ip_routes("198.19.100.0/24") == []
        subprocess.run(["ip", "route", "flush", "proto", str(OURS)], check=True)
        subprocess.run(["ip", "route", "del", "198.19.103.0/24"], check=True)
    in_node(node, check)


def test_each_refused_message_is_named_and_the_others_applied(node) -> None:
    def check(n: Node) -> None:
        dev = socket.if_nametoindex(n.interface)
        sock = rtnl.RouteSocket(OURS)
        subprocess.run(["ip", "route", "add", "198.19.110.0/24", "via", "198.18.0.11", "proto", "static"], check=True)
        before = sock.batches
        failed = sock.write([
            rtnl.RouteOp("add", ip4("198.19.111.0"), 24, dev, ip4("198.18.0.11")),
            rtnl.RouteOp("add", ip4("198.19.110.0"), 24, dev, ip4("198.18.0.12")),  # held: EEXIST
            rtnl.RouteOp("add", ip4("198.19.112.0"), 24, 9999, ip4("198.18.0.11")),  # no such device
            rtnl.RouteOp("add", ip4("198.19.113.0"), 24, dev, ip4("198.18.9.9")),  # not on the link, no onlink
            rtnl.RouteOp("add", ip4("198.19.114.0"), 24, dev, ip4("198.18.0.11")),
        ])
        assert sock.batches == before + 1
        assert [str(IPv4Address(op.dst)) for op, _, _ in failed] == ["198.19.110.0", "198.19.112.0", "198.19.113.0"]
        assert failed[0][1] == errno.EEXIST and all(code for _, code, _ in failed)
        assert all(text for _, _, text in failed[1:]), failed  # the kernel's words (extended ACK)
        assert {r["dst"] for r in ip_routes("proto", str(OURS))} == {"198.19.111.0/24", "198.19.114.0/24"}
        assert ip_routes("198.19.110.0/24")[0]["gateway"] == "198.18.0.11"
        subprocess.run(["ip", "route", "flush", "proto", str(OURS)], check=True)
        subprocess.run(["ip", "route", "del", "198.19.110.0/24"], check=True)
    in_node(node, check)


def test_thousands_of_routes_go_in_64k_batches(node) -> None:
    def check(n: Node) -> None:
        dev = socket.if_nametoindex(n.interface)
        sock = rtnl.RouteSocket(OURS)
        ops = [rtnl.RouteOp("add", ip4("198.19.128.0") + i, 32, dev, ip4("198.18.0.11"), True, ip4(n.ip))
               for i in range(5000)]
        size = len(rtnl.encode_route(ops[0], 1, OURS))
        assert sock.write(ops) == []
        assert (sock.writes, sock.batches) == (5000, -(-5000 // (rtnl.BATCH_BYTES // size)))
        assert len(ip_routes("proto", str(OURS))) == 5000
        assert sorted(m.dst for m in dumped(sock) if m.protocol == OURS) == [op.dst for op in ops]
        assert sock.write([op._replace(op="delete") for op in ops]) == []
        assert ip_routes("proto", str(OURS)) == []
    in_node(node, check)


def test_multipath_and_gatewayless_routes_decode_as_iproute2_wrote_them(node) -> None:
    def check(n: Node) -> None:
        dev = socket.if_nametoindex(n.interface)
        run = lambda *a: subprocess.run(["ip", "route", *a], check=True)  # noqa: E731
        run("add", "198.19.120.0/24", "dev", n.interface, "proto", "80")
        run("add", "198.19.121.0/24", "proto", "bird", "metric", "7", "nexthop", "via", "198.18.0.11", "dev",
            n.interface, "nexthop", "via", "198.18.0.12", "dev", n.interface)
        run("add", "198.19.122.0/24", "via", "198.18.0.11", "dev", n.interface, "tos", "0x10", "proto", "static")
        got = {m.dst: m for m in dumped(rtnl.RouteSocket(OURS)) if m.dst >> 8 in (ip4("198.19.120.0") >> 8,
                                                                                    ip4("198.19.121.0") >> 8,
                                                                                    ip4("198.19.122.0") >> 8)}
        plain, multi, tos = got[ip4("198.19.120.0")], got[ip4("198.19.121.0")], got[ip4("198.19.122.0")]
        assert (plain.oif, plain.gateway, plain.protocol, plain.nexthops) == (dev, 0, 80, ())
        assert (multi.oif, multi.protocol, multi.priority) == (0, 12, 7)
        assert multi.nexthops == ((dev, ip4("198.18.0.11")), (dev, ip4("198.18.0.12")))
        assert tos.tos == 0x10
        run("del", "198.19.120.0/24")
        run("del", "198.19.121.0/24", "metric", "7")
        run("del", "198.19.122.0/24", "tos", "0x10")
    in_node(node, check)


def test_lookups_answer_as_ip_route_get(node) -> None:
    """Each lookup names the device and gateway `ip route get` names, or
    the error it reports; thousands go in batches, each answered."""
    def check(n: Node) -> None:
        run = lambda *a: subprocess.run(["ip", "route", *a], check=True)  # noqa: E731
        run("add", "198.18.7.0/24", "via", "198.18.0.11", "proto", "static")
        run("add", "blackhole", "198.18.8.0/24")
        sock = rtnl.RouteSocket(OURS)
        names = {i: name for i, name in socket.if_nameindex()}

        def iproute2(addr: str) -> tuple[str, str | None] | str:
            got = subprocess.run(["ip", "-json", "route", "get", addr], capture_output=True, text=True)
            if got.returncode:
                return got.stderr.strip()
            r = json.loads(got.stdout)[0]
            return r["dev"], r.get("gateway")

        def ours(answer: rtnl.RouteMsg | int) -> tuple[str, str | None] | str:
            if isinstance(answer, int):
                return f"RTNETLINK answers: {os.strerror(answer)}"
            return names[answer.oif], str(IPv4Address(answer.gateway)) if answer.gateway else None

        probes = ["198.18.0.11", "198.18.5.5", "198.18.7.9", "198.18.8.1", n.ip]
        got = sock.lookup(map(ip4, probes))
        assert [ours(got[ip4(a)]) for a in probes] == [iproute2(a) for a in probes]
        assert ours(got[ip4("198.18.5.5")]) == (n.interface, "198.18.0.1")  # through the default route
        run("del", "default")
        assert ours(sock.lookup([ip4("198.18.5.5")])[ip4("198.18.5.5")]) == iproute2("198.18.5.5")
        assert iproute2("198.18.5.5") == "RTNETLINK answers: Network is unreachable"
        many = [ip4("198.18.0.0") + i for i in range(1, 5000)]  # on the link, behind 198.18.0.11, through nothing
        got = sock.lookup(many)
        assert sorted(got) == many
        for addr in many[::97]:
            assert ours(got[addr]) == iproute2(str(IPv4Address(addr)))
        run("add", "default", "via", "198.18.0.1", "dev", n.interface, "onlink", "proto", "static")
        run("del", "198.18.7.0/24")
        run("del", "blackhole", "198.18.8.0/24")
    in_node(node, check)


def test_subscription_hears_others_but_not_our_writer(node) -> None:
    def check(n: Node) -> None:
        dev = socket.if_nametoindex(n.interface)
        writer = rtnl.RouteSocket(OURS)
        sub = rtnl.Subscription(writer.port)
        writer.write([rtnl.RouteOp("add", ip4("198.19.130.0"), 24, dev, ip4("198.18.0.11"))])
        subprocess.run(["ip", "route", "add", "198.19.131.0/24", "via", "198.18.0.12", "proto", "80"], check=True)
        subprocess.run(["ip", "route", "del", "198.19.130.0/24"], check=True)  # ours, deleted by someone else
        deadline = time.monotonic() + 5
        seen: list[rtnl.RouteMsg] = []
        while len(seen) < 2 and time.monotonic() < deadline:
            seen += [m for m in sub.receive() if isinstance(m, rtnl.RouteMsg)]
        assert [(m.new, str(IPv4Address(m.dst)), m.protocol) for m in seen] == [
            (True, "198.19.131.0", 80), (False, "198.19.130.0", OURS)]
        assert seen[0].gateway == ip4("198.18.0.12") and seen[0].oif == dev
        subprocess.run(["ip", "route", "del", "198.19.131.0/24"], check=True)
    in_node(node, check)


def test_a_full_subscription_says_enobufs_and_drains(node, tmp_path) -> None:
    batch = tmp_path / "burst"
    batch.write_text("".join(f"route add 198.19.{140 + i // 250}.{i % 250}/32 via 198.18.0.11 proto 80\n"
                             for i in range(3000)))

    def check(n: Node) -> None:
        sub = rtnl.Subscription(0, rcvbuf=64 << 10)
        subprocess.run(["ip", "-batch", str(batch)], check=True)
        with pytest.raises(OSError) as e:
            while True:
                sub.receive()
        assert e.value.errno == errno.ENOBUFS
        sub.drain()
        assert sub.receive() == []
        subprocess.run(["ip", "route", "flush", "proto", "80"], check=True)
    in_node(node, check)
