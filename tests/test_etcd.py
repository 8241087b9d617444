"""The etcd source alone (no daemon), against a real etcd on the testbed's
control-plane host; etcdctl is the oracle for what is stored."""
from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator

import pytest

from etcd_fixtures import etcd, prefix, tb  # noqa: F401 (fixtures)
from ipipfast_lab.daemons import wait_until
from ipipfast_lab.etcd import EtcdServer, SourceProcess
from ipipfast_lab.testbed import Testbed

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
    pytest.mark.skipif(shutil.which("etcd") is None or shutil.which("etcdctl") is None,
                       reason="needs etcd and etcdctl (Debian: etcd-server, etcd-client)"),
]

SHORT_TTL = 6  # seconds: leases that expire within a test
MARGIN = 10  # seconds past a TTL for etcd to expire the lease and the watch to tell


Start = Callable[..., SourceProcess]


@pytest.fixture
def start(tb: Testbed, etcd: EtcdServer, prefix: str) -> Iterator[Start]:
    """start(node_index, cidrs, **kw): a source on that node, stopped after the test.
    On failure, every source's log is printed."""
    procs: list[SourceProcess] = []

    def start_source(index: int, cidrs: list[str], **kw: object) -> SourceProcess:
        procs.append(SourceProcess(tb, tb.nodes[index], etcd, cidrs, prefix=prefix, **kw))
        return procs[-1]

    yield start_source
    for p in procs:
        p.stop()
        print(f"--- source on {p.node.name}:\n{p.log()[-4000:]}")


def subnets(etcd: EtcdServer, prefix: str) -> dict[str, dict]:
    return etcd.get(prefix + "/subnets/")


def registered(*cidrs: str) -> Callable[[dict], bool]:
    return lambda s: set(s["status"]["registered"]) == set(cidrs) and s["status"]["connected"]


def routes_to(expected: dict[str, str]) -> Callable[[dict], bool]:
    """Its routes are exactly these cidr -> via."""
    return lambda s: {c: r["via"] for c, r in s["routes"].items()} == expected


def test_registration_in_flannel_form(start: Start, etcd: EtcdServer, prefix: str) -> None:
    a = start(0, ["198.19.0.0/24", "198.19.100.0/24"])
    snap = a.wait_for("registered", registered("198.19.0.0/24", "198.19.100.0/24"))
    stored = subnets(etcd, prefix)
    keys = [f"{prefix}/subnets/198.19.0.0-24", f"{prefix}/subnets/198.19.100.0-24"]
    assert sorted(stored) == keys
    lease = int(snap["status"]["lease"], 16)
    for key in keys:
        assert json.loads(stored[key]["value"]) == {"PublicIP": "198.18.0.10", "BackendType": "ipip",
                                                    "BackendData": None}
        assert stored[key]["lease"] == lease
    granted, remaining, leased = etcd.lease(lease)
    assert granted == 30 and 0 < remaining <= 30 and sorted(leased) == keys
    assert snap["routes"] == {}  # its own CIDRs are not routes
    assert snap["status"]["ignored"] == {}


def test_two_nodes_see_each_other(start: Start, etcd: EtcdServer, prefix: str) -> None:
    a, b = start(0, ["198.19.0.0/24"]), start(1, ["198.19.1.0/24"])
    snap_a = a.wait_for("seeing b", routes_to({"198.19.1.0/24": "198.18.0.11"}))
    snap_b = b.wait_for("seeing a", routes_to({"198.19.0.0/24": "198.18.0.10"}))
    stored = subnets(etcd, prefix)
    for snap, cidr, key in ((snap_a, "198.19.1.0/24", "198.19.1.0-24"), (snap_b, "198.19.0.0/24", "198.19.0.0-24")):
        route = snap["routes"][cidr]
        assert route["key"] == f"{prefix}/subnets/{key}"
        assert route["mod_revision"] == stored[route["key"]]["mod_revision"]
        assert snap["changes"] >= 1  # on_change() was called


def test_conflicting_cidr_refused_naming_the_holder(start: Start, etcd: EtcdServer, prefix: str) -> None:
    key = f"{prefix}/subnets/198.19.0.0-24"
    a = start(0, ["198.19.0.0/24"])
    lease_a = int(a.wait_for("registered", registered("198.19.0.0/24"))["status"]["lease"], 16)
    b = start(1, ["198.19.0.0/24", "198.19.1.0/24"])
    snap = b.wait_for("refused", lambda s: "198.19.0.0/24" in s["status"]["conflicts"]
                      and "198.19.1.0/24" in s["status"]["registered"] and key in s["status"]["ignored"])
    message = snap["status"]["conflicts"]["198.19.0.0/24"]
    assert f"{key} is held by 198.18.0.10 (lease {lease_a:x})" in message
    assert "198.19.0.0/24" not in snap["status"]["registered"] and snap["routes"] == {}
    assert "own pod CIDR, held by 198.18.0.10" in snap["status"]["ignored"][key]
    assert "198.19.0.0/24" in b.log() and "held by 198.18.0.10" in b.log()  # logged as an error
    stored = subnets(etcd, prefix)[key]
    assert json.loads(stored["value"])["PublicIP"] == "198.18.0.10" and stored["lease"] == lease_a

    # The holder dies and its lease goes (revoked, as its expiry would): b
    # claims the CIDR, and the holder, back, is the one refused.
    a.stop(sig=signal.SIGKILL)
    etcd.etcdctl("lease", "revoke", f"{lease_a:x}")
    lease_b = int(b.wait_for("holding it", registered("198.19.0.0/24", "198.19.1.0/24"))["status"]["lease"], 16)
    assert json.loads(subnets(etcd, prefix)[key]["value"])["PublicIP"] == "198.18.0.11"
    snap = start(0, ["198.19.0.0/24"]).wait_for("refused", lambda s: "198.19.0.0/24" in s["status"]["conflicts"])
    assert f"{key} is held by 198.18.0.11 (lease {lease_b:x})" in snap["status"]["conflicts"]["198.19.0.0/24"]


def test_killed_owner_expires_from_the_others_view(start: Start, etcd: EtcdServer, prefix: str) -> None:
    a, b = start(0, ["198.19.0.0/24"], ttl=SHORT_TTL), start(1, ["198.19.1.0/24"])
    b.wait_for("seeing a", routes_to({"198.19.0.0/24": "198.18.0.10"}))
    changes = b.snapshot()["changes"]
    a.stop(sig=signal.SIGKILL)
    killed = time.monotonic()
    snap = b.wait_for("without a's route", routes_to({}), timeout=SHORT_TTL + MARGIN)
    print(f"a's route left b's view {time.monotonic() - killed:.1f} s after a was killed (TTL {SHORT_TTL} s)")
    assert snap["changes"] > changes
    assert list(subnets(etcd, prefix)) == [f"{prefix}/subnets/198.19.1.0-24"]


def test_restart_takes_over_its_own_key(start: Start, etcd: EtcdServer, prefix: str) -> None:
    """A node back within its TTL moves its key to its new lease: no gap, no flap."""
    key = f"{prefix}/subnets/198.19.0.0-24"
    a, b = start(0, ["198.19.0.0/24"]), start(1, ["198.19.1.0/24"])
    old = int(a.wait_for("registered", registered("198.19.0.0/24"))["status"]["lease"], 16)
    changes = b.wait_for("seeing a", routes_to({"198.19.0.0/24": "198.18.0.10"}))["changes"]
    a.stop(sig=signal.SIGKILL)
    new = int(start(0, ["198.19.0.0/24"]).wait_for("registered", registered("198.19.0.0/24"))["status"]["lease"], 16)
    assert new != old and subnets(etcd, prefix)[key]["lease"] == new
    granted, remaining, keys = etcd.lease(old)
    assert remaining > 0 and keys == []  # the old lease lives on until its TTL, holding nothing
    snap = b.wait_for("at the new revision", lambda s: s["routes"]["198.19.0.0/24"]["mod_revision"]
                      == subnets(etcd, prefix)[key]["mod_revision"])
    assert snap["changes"] == changes  # the route itself never changed


def test_etcd_down_keeps_routes_then_resyncs(start: Start, etcd: EtcdServer, prefix: str) -> None:
    a, b = start(0, ["198.19.0.0/24"]), start(1, ["198.19.1.0/24"])
    a.wait_for("seeing b", routes_to({"198.19.1.0/24": "198.18.0.11"}))
    b.wait_for("seeing a", routes_to({"198.19.0.0/24": "198.18.0.10"}))
    stopped = time.time()
    etcd.stop()
    try:
        snap = a.wait_for("unreachable", lambda s: not s["status"]["connected"])
        assert snap["status"]["since"] >= stopped and snap["status"]["last_error"]
        assert "198.18.0.2:2379" in snap["status"]["last_error"]
        c = start(2, ["198.19.2.0/24"])  # a node that joins while etcd is down
        c.wait_for("failing", lambda s: s["counters"]["etcd_errors"] > 0)
        # Nothing was flushed: a keeps b's route however long etcd is away.
        snap = a.wait_for("retrying", lambda s: s["counters"]["etcd_errors"] >= 3)
        assert routes_to({"198.19.1.0/24": "198.18.0.11"})(snap)
    finally:
        etcd.start()
    everyone = {"198.19.0.0/24": "198.18.0.10", "198.19.1.0/24": "198.18.0.11", "198.19.2.0/24": "198.18.0.12"}
    for node, me in ((a, "198.19.0.0/24"), (b, "198.19.1.0/24"), (c, "198.19.2.0/24")):
        sees_the_others = routes_to({k: v for k, v in everyone.items() if k != me})
        snap = node.wait_for("resynced", lambda s: sees_the_others(s) and s["status"]["connected"])
        assert snap["status"]["since"] > stopped
    c.wait_for("registered", registered("198.19.2.0/24"))
    assert sorted(subnets(etcd, prefix)) == [f"{prefix}/subnets/198.19.{i}.0-24" for i in range(3)]


def test_partition_longer_than_the_ttl(tb: Testbed, start: Start, etcd: EtcdServer, prefix: str) -> None:
    """Routes are kept while cut off; the lease that expired meanwhile is taken
    again; a watch that fell behind a compaction lists again."""
    key = f"{prefix}/subnets/198.19.0.0-24"
    flannel = '{"PublicIP":"198.18.0.%d","BackendType":"ipip","BackendData":null}'
    etcd.etcdctl("put", f"{prefix}/subnets/198.19.60.0-24", flannel % 60)
    a = start(0, ["198.19.0.0/24"], ttl=SHORT_TTL)
    snap = a.wait_for("registered", lambda s: registered("198.19.0.0/24")(s)
                      and routes_to({"198.19.60.0/24": "198.18.0.60"})(s))
    lease = int(snap["status"]["lease"], 16)
    tb.control_plane_link(False)
    try:
        a.wait_for("unreachable", lambda s: not s["status"]["connected"], timeout=SHORT_TTL + MARGIN)
        # Meanwhile: one node leaves, one joins, and etcd compacts past both.
        etcd.etcdctl("del", f"{prefix}/subnets/198.19.60.0-24")
        etcd.etcdctl("put", f"{prefix}/subnets/198.19.61.0-24", flannel % 61)
        etcd.etcdctl("compact", str(etcd.revision()), "--physical")
        wait_until(lambda: key not in subnets(etcd, prefix), SHORT_TTL + MARGIN, "a's lease expiring on etcd's side")
        assert routes_to({"198.19.60.0/24": "198.18.0.60"})(a.snapshot())  # kept while cut off
    finally:
        tb.control_plane_link(True)
    snap = a.wait_for("resynced", lambda s: s["status"]["connected"] and registered("198.19.0.0/24")(s)
                      and routes_to({"198.19.61.0/24": "198.18.0.61"})(s), timeout=60)
    assert snap["counters"]["etcd_compacted"] >= 1 and snap["counters"]["etcd_lists"] >= 2
    assert snap["counters"]["etcd_lease_expired"] == 1
    new_lease = int(snap["status"]["lease"], 16)
    assert new_lease != lease and subnets(etcd, prefix)[key]["lease"] == new_lease
    assert etcd.lease(lease)[1] == -1  # the old one is gone


def test_hand_written_flannel_leases(start: Start, etcd: EtcdServer, prefix: str) -> None:
    a = start(0, ["198.19.0.0/24"])
    a.wait_for("registered", registered("198.19.0.0/24"))
    lease = etcd.lease_grant(60)
    s = f"{prefix}/subnets/"
    written = {  # as flannel's nodes write them (Go's json.Marshal: no spaces)
        "198.19.50.0-24": '{"PublicIP":"198.18.0.50","BackendType":"ipip","BackendData":null}',
        "198.19.51.0-24": '{"PublicIP":"198.18.0.51","BackendType":"vxlan",'
                          '"BackendData":{"VNI":1,"VtepMAC":"6a:5e:2d:1c:0b:fa"}}',
        "198.19.52.0-24&fc00:0:0:52::-64": '{"PublicIP":"198.18.0.52","PublicIPv6":"fc00::52",'
                                           '"BackendType":"ipip"}',
        "198.19.54.1-24": '{"PublicIP":"198.18.0.54","BackendType":"ipip"}',
        "garbage": '{"PublicIP":"198.18.0.55","BackendType":"ipip"}',
        "198.19.56.0-24": "not json",
    }
    for tail, value in written.items():
        etcd.etcdctl("put", s + tail, value, f"--lease={lease:x}")
    etcd.etcdctl("put", s + "198.19.53.0-24", '{"PublicIP":"198.18.0.53","BackendType":"ipip"}')  # a reservation
    want = {"198.19.50.0/24": "198.18.0.50", "198.19.52.0/24": "198.18.0.52", "198.19.53.0/24": "198.18.0.53"}
    watched = a.wait_for("seeing the ipip leases", routes_to(want))
    ignored = watched["status"]["ignored"]
    assert ignored == {
        s + "198.19.51.0-24": "BackendType 'vxlan': not an ipip node, so not routed",
        s + "198.19.54.1-24": "198.19.54.1/24 has host bits set; did you mean 198.19.54.0/24?",
        s + "garbage": "not a subnet key (<address>-<length>): 'garbage'",
        s + "198.19.56.0-24": "the value is not JSON",
    }
    stored = subnets(etcd, prefix)
    for route in watched["routes"].values():
        assert route["mod_revision"] == stored[route["key"]]["mod_revision"]
    # A source that finds them by listing sees the same.
    b = start(1, [])
    listed = b.wait_for("seeing them", routes_to({**want, "198.19.0.0/24": "198.18.0.10"}))
    assert {k: v for k, v in listed["routes"].items() if k != "198.19.0.0/24"} == watched["routes"]
    assert listed["status"]["ignored"] == ignored
    # Their lease revoked: the leased ones go, the reservation stays.
    etcd.etcdctl("lease", "revoke", f"{lease:x}")
    a.wait_for("without them", routes_to({"198.19.53.0/24": "198.18.0.53"}))


def test_next_endpoint_after_a_dead_one(start: Start, etcd: EtcdServer, prefix: str) -> None:
    dead = "http://198.18.0.2:2390"  # the same host, a closed port: refused at once
    a = start(0, ["198.19.0.0/24"], endpoints=[dead, etcd.endpoint])
    snap = a.wait_for("registered", registered("198.19.0.0/24"))
    assert snap["status"]["endpoint"] == etcd.endpoint
    assert list(subnets(etcd, prefix)) == [f"{prefix}/subnets/198.19.0.0-24"]


def test_tls_with_client_certificates() -> None:
    with Testbed(nodes=2, control_plane=True) as bed, EtcdServer(bed, tls=True) as server:
        assert server.endpoint.startswith("https://")
        a = SourceProcess(bed, bed.nodes[0], server, ["198.19.0.0/24"])
        b = SourceProcess(bed, bed.nodes[1], server, ["198.19.1.0/24"])
        try:
            a.wait_for("seeing b", routes_to({"198.19.1.0/24": "198.18.0.11"}))
            b.wait_for("seeing a", routes_to({"198.19.0.0/24": "198.18.0.10"}))
            assert sorted(server.get("/coreos.com/network/subnets/")) == [
                "/coreos.com/network/subnets/198.19.0.0-24", "/coreos.com/network/subnets/198.19.1.0-24"]
        finally:
            for p in (a, b):
                p.stop()
                print(f"--- source on {p.node.name}:\n{p.log()[-4000:]}")
