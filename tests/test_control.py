"""The control socket and `ipipfast show`: the protocol on a socket of our
own, then a live daemon asked from the test and from inside its namespace."""
from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipipfast.control import ControlError, ControlServer, NoDaemon, request
from ipipfast_lab import traffic
from ipipfast_lab.daemons import TunnelProcess, running_tunnels
from ipipfast_lab.testbed import Testbed

netns = pytest.mark.netns
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces, TUN and AF_PACKET")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ControlServer]:
    calls = {"n": 0}

    def status() -> dict:
        calls["n"] += 1
        return {"calls": calls["n"]}

    def broken() -> dict:
        raise RuntimeError("datapath gone")

    srv = ControlServer(tmp_path / "run" / "t0.sock", {"status": status, "broken": broken})
    srv.serve()
    yield srv
    srv.close()


def lines(path: Path, *requests: bytes) -> list[dict]:
    """Each request on one connection, and the replies, one line each."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(path))
        with s.makefile("rwb") as f:
            out = []
            for r in requests:
                f.write(r + b"\n")
                f.flush()
                out.append(json.loads(f.readline()))
    return out


def test_owner_only_socket_in_an_owner_only_directory(server: ControlServer) -> None:
    assert stat.S_ISSOCK(server.path.stat().st_mode)
    assert stat.S_IMODE(server.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(server.path.parent.stat().st_mode) == 0o700
    assert [p.name for p in server.path.parent.iterdir()] == ["t0.sock"]  # no temporary name left


def test_requests_and_errors_on_one_connection(server: ControlServer) -> None:
    replies = lines(server.path, b'{"get": "status"}', b'{"get": "nothing"}', b"not json", b"[1]",
                    b'{"get": "broken"}', b'{"get": "status"}')
    assert replies[0] == {"calls": 1} and replies[-1] == {"calls": 2}  # each answer is made afresh
    assert "unknown request" in replies[1]["error"] and "broken, status" in replies[1]["error"]
    assert replies[2]["error"].startswith("not JSON")
    assert "unknown request" in replies[3]["error"]
    assert replies[4] == {"error": "broken failed: datapath gone"}


def test_request_helper(server: ControlServer) -> None:
    assert request(server.path, "status") == {"calls": 1}
    with pytest.raises(ControlError, match="unknown request"):
        request(server.path, "routes")


def test_a_second_server_is_refused_and_close_removes_the_socket(server: ControlServer) -> None:
    with pytest.raises(RuntimeError, match="another ipipfast daemon"):
        ControlServer(server.path, {})
    assert request(server.path, "status") == {"calls": 1}  # the first one still answers
    server.close()
    assert not server.path.exists()
    with pytest.raises(NoDaemon, match="does not exist"):
        request(server.path, "status")


def test_a_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "t0.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: a daemon that was killed
    with pytest.raises(NoDaemon, match="stale"):
        request(path, "status")
    srv = ControlServer(path, {"status": lambda: {"ok": True}})
    srv.serve()
    try:
        assert request(path, "status") == {"ok": True}
    finally:
        srv.close()


def ipipfast(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ipipfast", *args], capture_output=True, text=True, timeout=60)


def test_show_without_a_daemon_says_so_in_one_line(tmp_path: Path) -> None:
    for args in (["--run-dir", str(tmp_path / "none")], ["routes", "--run-dir", str(tmp_path)],
                 ["--socket", str(tmp_path / "t0.sock")], ["--tunnel", "t0", "--run-dir", str(tmp_path)]):
        r = ipipfast("show", *args)
        assert r.returncode == 1 and r.stdout == "", (args, r)
        assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("ipipfast show: no "), (args, r.stderr)


def test_show_fails_unless_the_daemon_is_ready(tmp_path: Path) -> None:
    """As a readiness probe: a daemon that says it is not ready (stopping),
    or has its socket but does not answer yet (starting), fails the show."""
    state = {"tunnel": "t0", "generation": 1, "ready": False, "counters": {}}
    srv = ControlServer(tmp_path / "t0.sock", {"status": lambda: state})
    try:
        r = ipipfast("show", "counters", "--json", "--run-dir", str(tmp_path))
        assert (r.returncode, r.stdout) == (1, "") and "did not answer in time" in r.stderr, r.stderr
        srv.serve()
        r = ipipfast("show", "counters", "--json", "--run-dir", str(tmp_path))
        assert r.returncode == 1 and r.stderr == "ipipfast show: t0 is not ready\n", r.stderr
        assert json.loads(r.stdout)["ready"] is False
        state["ready"] = True
        r = ipipfast("show", "counters", "--json", "--run-dir", str(tmp_path))
        assert (r.returncode, r.stderr) == (0, ""), r.stderr
    finally:
        srv.close()


def test_show_asks_for_a_tunnel_when_several_run(tmp_path: Path) -> None:
    servers = [ControlServer(tmp_path / f"{name}.sock", {}) for name in ("t0", "t1")]
    try:
        r = ipipfast("show", "--run-dir", str(tmp_path))
        assert r.returncode == 1 and r.stderr.strip() == f"ipipfast show: 2 daemons in {tmp_path} (t0, t1): " \
                                                         "pick one with --tunnel"
    finally:
        for s in servers:
            s.close()


PINGS, PING_BYTES = 3, 20 + 8 + 56  # traffic.ping's default size, as the TUN carries it


@pytest.fixture(scope="module")
def bed() -> Iterator[tuple[Testbed, list[TunnelProcess]]]:
    with Testbed(nodes=2, pods_per_node=1) as tb, running_tunnels(tb) as tunnels:
        a, b = tb.nodes[0].pods[0], tb.nodes[1].pods[0]
        assert traffic.ping(tb, a, b.ip, count=PINGS, interval=0.01)["received"] == PINGS
        yield tb, tunnels


def show(tb: Testbed, node_index: int, *args: str) -> subprocess.CompletedProcess:
    """`ipipfast show` inside the node, where the daemon's socket is at its default path."""
    return tb.python(tb.nodes[node_index], "-m", "ipipfast", "show", *args, check=False)


@netns
@needs_root
class TestLive:
    def test_status(self, bed) -> None:
        tb, (ta, _) = bed
        st = ta.request("status")
        assert (st["pid"], st["tunnel"], st["ready"], st["mode"]) == (ta.proc.pid, f"{tb.prefix}t0", True, "Always")
        assert st["generation"] >= 1 and st["reloads"] == {"applied": 0, "unchanged": 0, "refused": 0}
        n1 = tb.nodes[1]
        assert st["next_hops"] == {n1.ip: tb.ipr(n1).get_links(ifname=n1.interface)[0].get_attr("IFLA_ADDRESS")}
        assert st["path_mtu"] == {}
        c = st["counters"]
        assert c["tx"]["packets"] >= 3 and c["rx"]["packets"] >= 3 and len(c["workers"]) == 1
        assert c["tx"]["drops"]["no_route"] == 0 and "queue_full" in c["tx"]["drops"]

    def test_routes(self, bed) -> None:
        tb, (ta, _) = bed
        n1 = tb.nodes[1]
        r = ta.request("routes")
        assert r["generation"] == ta.request("status")["generation"]
        mac = tb.ipr(n1).get_links(ifname=n1.interface)[0].get_attr("IFLA_ADDRESS")
        assert r["routes"] == [{"cidr": n1.pod_cidr, "node": n1.ip, "kind": "encapsulated", "source": "file",
                                "detail": "node.yaml:5", "next_hop": n1.ip, "kernel": "ours", "mac": mac,
                                "mac_state": "resolved", "path_mtu": None}]
        assert (r["conflicts"], r["refused"]) == ([], [])

    def test_socket_is_owner_only(self, bed) -> None:
        _, (ta, _) = bed
        assert stat.S_IMODE(ta.socket_path.stat().st_mode) == 0o600
        assert stat.S_IMODE(ta.socket_path.parent.stat().st_mode) == 0o700
        # each node's daemon sees its own /run/ipipfast: one socket in each
        assert [p.name for p in ta.socket_path.parent.iterdir()] == [ta.socket_path.name]

    def test_show_text(self, bed) -> None:
        tb, (ta, _) = bed
        n1 = tb.nodes[1]
        r = show(tb, 0)
        assert r.returncode == 0, r.stderr
        first = r.stdout.splitlines()[0]
        assert first.startswith(f"tunnel {tb.prefix}t0: pid {ta.proc.pid}, ready, mode Always, table generation ")
        assert r.stdout.splitlines()[1] == "mtu: 1480 inner (the TUN's), 1500 underlay"
        route = next(ln.split() for ln in r.stdout.splitlines() if ln.strip().startswith(n1.pod_cidr))
        assert route[1:3] == [n1.ip, "encapsulated"] and route[-2:] == ["file", "node.yaml:5"]
        assert any(ln.strip().startswith("tx: ") for ln in r.stdout.splitlines())
        ta.wait_for(lambda st: st["counters"]["peers"].get(n1.ip, {}).get("rx_packets") == PINGS)
        peers = show(tb, 0, "peers").stdout.splitlines()
        assert peers[-2].split()[8:16] == ["tx", "packets", "tx", "bytes", "rx", "packets", "rx", "bytes"]
        assert peers[-1].split()[:2] == [n1.ip, "encapsulated"] and peers[-1].split()[-1] == n1.pod_cidr
        assert peers[-1].split()[-5:-1] == [str(PINGS), str(PINGS * PING_BYTES)] * 2

    def test_show_json(self, bed) -> None:
        tb, (ta, _) = bed
        n1 = tb.nodes[1]
        routes = json.loads(show(tb, 0, "routes", "--json").stdout)
        assert [(r["cidr"], r["kind"], r["source"]) for r in routes["routes"]] == \
            [(n1.pod_cidr, "encapsulated", "file")]
        ta.wait_for(lambda st: st["counters"]["peers"].get(n1.ip, {}).get("rx_packets") == PINGS)
        peers = json.loads(show(tb, 0, "peers", "--json").stdout)["peers"]
        assert [(p["node"], p["cidrs"]) for p in peers] == [(n1.ip, [n1.pod_cidr])]
        # the fixture's pings, as the ping tool counted them: each echo out toward n1, each reply in from it
        assert [(p["tx_packets"], p["tx_bytes"], p["rx_packets"], p["rx_bytes"]) for p in peers] == \
            [(PINGS, PINGS * PING_BYTES, PINGS, PINGS * PING_BYTES)]
        counters = json.loads(show(tb, 0, "counters", "--json").stdout)
        assert counters["counters"]["tx"]["packets"] >= 3 and counters["tunnel"] == f"{tb.prefix}t0"
        everything = json.loads(show(tb, 0, "--json").stdout)
        assert everything["pid"] == ta.proc.pid and everything["routes"] == routes["routes"]

    def test_show_in_a_namespace_without_a_daemon(self, bed) -> None:
        tb, _ = bed
        r = tb.python(tb.nodes[0].pods[0], "-m", "ipipfast", "show", check=False)
        assert (r.returncode, r.stdout) == (1, "")
        assert r.stderr == "ipipfast show: no ipipfast daemon running (no socket in /run/ipipfast)\n"


@netns
@needs_root
def test_the_socket_goes_with_the_daemon() -> None:
    with Testbed(nodes=2, pods_per_node=1) as tb, running_tunnels(tb) as (ta, _tb):
        path = ta.socket_path
        assert path.exists()
        assert ta.stop() == 0
        assert not path.exists()
        r = show(tb, 0)
        assert r.returncode == 1 and len(r.stderr.splitlines()) == 1 and "no ipipfast daemon" in r.stderr
