"""The TUN outlives the daemon, as tunl0 does: a stopped or killed daemon
leaves the device and every route into it; the next one attaches; only
`--remove-device` or `ipipfast down` take them away."""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
import yaml

from ipipfast import daemon, tc_drops
from ipipfast.config import config_from_dict
from ipipfast.routing import RTPROT_IPIPFAST
from ipipfast_lab import traffic
from ipipfast_lab.daemons import TunnelProcess, running_tunnels
from ipipfast_lab.testbed import Node, Testbed

root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces, TUN and AF_PACKET")
FELIX = 80  # the protocol felix writes its routes with


def test_a_loaded_ipip_module_refuses_the_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(daemon, "ipip_module_loaded", lambda: True)
    d = daemon.Daemon(config_from_dict({"node": {"ip": "198.18.0.10/24", "interface": "eth0"}}))
    with pytest.raises(daemon.StartError, match=r"ipip module is loaded.*modprobe -r ipip.*blacklist ipip"):
        d.start()


def _routes_to(tb: Testbed, node: Node, cidr: str) -> list[tuple[int, int, int]]:
    """(type, oif or 0, protocol) of node's routes to cidr (a /24)."""
    net = cidr.split("/")[0]
    return sorted((r["type"], r.get_attr("RTA_OIF") or 0, r["proto"]) for r in tb.ipr(node).get_routes()
                  if r.get_attr("RTA_DST") == net and r["dst_len"] == 24)


def _tun_index(tb: Testbed, node: Node) -> int | None:
    found = tb.ipr(node).link_lookup(ifname=f"{tb.prefix}t{node.index}")
    return found[0] if found else None


def _tc_drop(tb: Testbed, node: Node) -> bool:
    """Whether both tc drops are on the node's underlay (False if neither; an error if one alone)."""
    idx = tb.ipr(node).link_lookup(ifname=node.interface)[0]
    hooks = [any(f.get_attr("TCA_KIND") for f in tb.ipr(node).get_filters(index=idx, parent=hook))
             for hook in (tc_drops.INGRESS, tc_drops.EGRESS)]
    assert hooks[0] == hooks[1], f"only one of the tc drops: ingress {hooks[0]}, egress {hooks[1]}"
    return hooks[0]


def _ipipfast(tb: Testbed, node: Node, config: Path, *args: str) -> tuple[int, str]:
    config.write_text(yaml.safe_dump(tb.node_config(node)))
    r = tb.run(node, [sys.executable, "-m", "ipipfast", *args, "--config", str(config)], check=False)
    return r.returncode, r.stdout + r.stderr


@root
@pytest.mark.netns
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["stopped", "killed"])
def test_the_device_and_its_routes_outlive_the_daemon(sig: int) -> None:
    with Testbed(nodes=2) as tb:
        n0, n1 = tb.nodes
        a, b = n0.pods[0], n1.pods[0]
        with running_tunnels(tb) as (t0, t1):
            index = _tun_index(tb, n0)
            # A route someone else wrote into the device (felix, BIRD): ours to keep, not to own.
            tb.ipr(n0).route("add", dst="198.19.9.0/24", oif=index, proto=FELIX, scope=253)
            assert traffic.ping(tb, a, b.ip, count=3, interval=0.01)["received"] == 3
            t0.stop(sig=sig)
            assert _tun_index(tb, n0) == index
            assert (1, index, RTPROT_IPIPFAST) in _routes_to(tb, n0, n1.pod_cidr)
            assert _routes_to(tb, n0, "198.19.9.0/24") == [(1, index, FELIX)]
            assert _tc_drop(tb, n0)  # the kernel keeps out of IPIP until the next run
            # Nothing forwards while no daemon runs, and nothing leaks onto plain routing.
            assert traffic.ping(tb, a, b.ip, count=2, interval=0.01, timeout=0.3)["received"] == 0
            again = TunnelProcess(tb, n0, tb.node_config(n0))
            try:
                again.wait_ready()
                assert "attached to the existing" in again.log()
                assert _tun_index(tb, n0) == index
                assert traffic.ping(tb, a, b.ip, count=3, interval=0.01)["received"] == 3
                assert traffic.ping(tb, b, a.ip, count=3, interval=0.01)["received"] == 3
                assert _routes_to(tb, n0, "198.19.9.0/24") == [(1, index, FELIX)]
            finally:
                assert again.stop() == 0


@root
@pytest.mark.netns
def test_remove_device_and_down_leave_the_node_as_before(tmp_path: Path) -> None:
    with Testbed(nodes=2) as tb:
        n0, n1 = tb.nodes
        blackhole_only = [(6, 0, 4)]  # RTN_BLACKHOLE, proto static: the testbed's, behind the tunnel
        assert _routes_to(tb, n0, n1.pod_cidr) == blackhole_only
        t0 = TunnelProcess(tb, n0, tb.node_config(n0), args=["--remove-device"])
        t0.wait_ready()
        assert _tun_index(tb, n0) is not None
        assert t0.stop() == 0
        assert _tun_index(tb, n0) is None and not _tc_drop(tb, n0)
        assert _routes_to(tb, n0, n1.pod_cidr) == blackhole_only

        with running_tunnels(tb):
            rc, out = _ipipfast(tb, n0, tmp_path / "node.yaml", "down")
            assert rc == 1 and "held by a running ipipfast" in out, out
            assert _tc_drop(tb, n0)  # refused, it removed nothing
        assert _tun_index(tb, n0) is not None  # a plain stop leaves it
        rc, out = _ipipfast(tb, n0, tmp_path / "node.yaml", "down")
        assert rc == 0 and f"{tb.prefix}t0 and the routes into it" in out, out
        assert f"the tc ingress and egress drops on {n0.interface}" in out, out
        assert _tun_index(tb, n0) is None and not _tc_drop(tb, n0)
        assert _routes_to(tb, n0, n1.pod_cidr) == blackhole_only
        rc, out = _ipipfast(tb, n0, tmp_path / "node.yaml", "down")
        assert (rc, out.strip()) == (0, "nothing of ipipfast's was there")


@root
@pytest.mark.netns
def test_a_device_with_other_queue_settings_is_refused_clearly() -> None:
    with Testbed(nodes=2) as tb:
        n0 = tb.nodes[0]
        t = TunnelProcess(tb, n0, tb.node_config(n0))
        t.wait_ready()
        t.stop()
        two = TunnelProcess(tb, n0, tb.node_config(n0, workers=2))
        assert two.proc.wait(timeout=15) == 1
        assert "cannot attach to the existing interface" in two.log() and "ipipfast down" in two.log()
        assert "Traceback" not in two.log()
        two.stop()


@root
@pytest.mark.netns
def test_an_mtu_set_by_someone_else_is_kept_across_restarts() -> None:
    """felix sets tunl0's MTU itself: a restarted daemon must not undo it."""
    with Testbed(nodes=2) as tb:
        n0 = tb.nodes[0]
        t = TunnelProcess(tb, n0, tb.node_config(n0))
        t.wait_ready()
        index = _tun_index(tb, n0)
        assert tb.ipr(n0).get_links(index)[0].get_attr("IFLA_MTU") == 1480
        tb.ipr(n0).link("set", index=index, mtu=1400)
        t.stop()
        t = TunnelProcess(tb, n0, tb.node_config(n0))
        try:
            t.wait_ready()
            assert tb.ipr(n0).get_links(index)[0].get_attr("IFLA_MTU") == 1400
        finally:
            t.stop()
