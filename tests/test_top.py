"""`ipipfast top`: the rates of a frame from two hand-made samples, and a
live daemon's frame under a ping flood, as plain text from a pipe."""
from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
from rich.console import Console

from ipipfast.top import Sample, frame, si
from ipipfast_lab.daemons import running_tunnels, wait_until
from ipipfast_lab.testbed import Testbed


def status(pid: int, tx: int, rx: int, no_route: int, foreign: int, workers: list[tuple[int, int]],
           peers: dict[str, tuple[int, int, int, int]] | None = None, waiting: int = 0) -> dict:
    """waiting: frames in each worker's receive ring, seen by the kernel
    (past 3 it dropped as ring_full) and not yet taken."""
    def direction(packets: int, drops: dict) -> dict:
        return {"packets": packets, "bytes": packets * 100, "offloaded": 0, "drops": drops}
    return {
        "pid": pid, "tunnel": "t0", "ready": True, "mode": "Always", "generation": 4, "ring_frames": 4096,
        "routes_encapsulated": 2, "routes_direct": 1, "reloads": {"applied": 1, "refused": 0},
        "counters": {"tx": direction(tx, {"no_route": no_route, "queue_full": 0}),
                     "rx": direction(rx, {"unknown_peer": 0}), "foreign_ipip": foreign,
                     "workers": [{"tx": direction(t, {"no_route": 0}), "rx": direction(r, {"ring_full": 3}),
                                  "ring": {"seen": r + 3 + waiting, "taken": r}} for t, r in workers],
                     "peers": {ip: dict(zip(("tx_packets", "tx_bytes", "rx_packets", "rx_bytes"), c))
                               for ip, c in (peers or {}).items()}},
    }


PEERS = [{"node": "198.18.0.11", "kind": "encapsulated", "next_hop": "198.18.0.11", "mac": "02:00:5e:00:00:01",
          "mac_state": "resolved", "path_mtu": 1400, "cidrs": ["198.19.1.0/24"]},
         {"node": "198.18.9.12", "kind": "encapsulated", "next_hop": "198.18.0.1", "mac": None,
          "mac_state": "unresolved", "path_mtu": None, "cidrs": ["198.19.2.0/24", "198.19.3.0/24"]}]


def text(prev: Sample, cur: Sample) -> str:
    out = io.StringIO()
    Console(file=out, width=120).print(frame(prev, cur))
    return out.getvalue()


def row(out: str, *start: str) -> list[str]:
    """The cells of the line whose first cells are `start`."""
    for line in out.splitlines():
        cells = line.split()
        if cells[:len(start)] == list(start):
            return cells[len(start):]
    raise AssertionError(f"no line {start} in\n{out}")


def test_rates_are_the_difference_over_the_time_between_samples() -> None:
    prev = Sample(100.0, status(7, 1000, 500, 3, 0, [(600, 200), (400, 300)],
                                {"198.18.0.11": (1000, 100_000, 500, 50_000)}), PEERS)
    cur = Sample(102.0, status(7, 25000, 4500, 13, 4, [(12600, 2200), (12400, 2300)],
                               {"198.18.0.11": (25000, 2_500_000, 4500, 450_000), "198.18.9.12": (0, 0, 4, 400)},
                               waiting=17), PEERS)
    out = text(prev, cur)
    assert "ipipfast t0: pid 7, ready, mode Always; rates over 2.0 s" in out
    assert "table generation 4: 2 routes encapsulated, 1 direct; reloads: 1 applied, 0 refused" in out
    assert row(out, "tx", "(encap)") == ["12k", "9.60", "0", "25k", "2.5M"]   # 24,000 packets, 2.4 MB in 2 s
    assert row(out, "rx", "(decap)") == ["2k", "1.60", "0", "4.5k", "450k"]
    assert row(out, "tx", "no_route") == ["5", "13"]
    assert row(out, "egress", "foreign_ipip") == ["2", "4"]
    assert row(out, "0") == ["6k", "1k", "0", "0", "17"] and row(out, "1") == ["6k", "1k", "0", "0", "17"]
    assert "rx ring waiting (of 4096)" in out
    peers = out[out.index("peers"):out.index("next hops")]
    # the busiest first: 2.4 MB out and 400 kB in over 2 s; the other only 400 bytes in, new since prev
    assert row(peers, "198.18.0.11") == ["12k", "9.60", "2k", "1.60", "29.5k", "2.95M"]
    assert row(peers, "198.18.9.12") == ["0", "0.00", "2", "0.00", "4", "400"]
    assert peers.index("198.18.0.11") < peers.index("198.18.9.12")
    hops = out[out.index("next hops"):]
    assert row(hops, "198.18.0.11") == ["encapsulated", "198.18.0.11", "02:00:5e:00:00:01", "resolved", "1400",
                                        "198.19.1.0/24"]
    assert row(hops, "198.18.9.12") == ["encapsulated", "198.18.0.1", "unresolved", "unresolved", "-",
                                        "198.19.2.0/24", "198.19.3.0/24"]


def test_only_the_busiest_peers() -> None:
    many = {f"198.18.1.{i}": (i, 100 * i, 0, 0) for i in range(1, 13)}
    out = text(Sample(0.0, status(7, 0, 0, 0, 0, [], {}), PEERS), Sample(1.0, status(7, 0, 0, 0, 0, [], many), PEERS))
    assert "peers: the 10 busiest of 12" in out
    assert [ln.split()[0] for ln in out.splitlines() if ln.strip().startswith("198.18.1.")] == \
        [f"198.18.1.{i}" for i in range(12, 2, -1)]


def test_a_restarted_daemon_shows_no_rates() -> None:
    out = text(Sample(0.0, status(7, 1000, 0, 0, 0, [(1000, 0)]), PEERS),
               Sample(1.0, status(8, 10, 0, 0, 0, [(10, 0)]), PEERS))
    assert row(out, "tx", "(encap)")[:3] == ["-", "-", "-"]


def test_si() -> None:
    assert [si(x) for x in (0, 7, 2.5, 999, 1000, 12345, 4.56e6, 7e9)] == \
        ["0", "7", "2.5", "999", "1k", "12.3k", "4.56M", "7G"]


@pytest.mark.netns
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces, TUN and AF_PACKET")
def test_once_on_a_live_daemon_under_a_flood() -> None:
    with Testbed(nodes=2, pods_per_node=1) as tb, running_tunnels(tb) as (t0, _):
        n0, n1 = tb.nodes
        a, b = n0.pods[0], n1.pods[0]
        flood = tb.popen(a, [sys.executable, "-m", "ipipfast_lab.traffic", "ping", "--dst", b.ip, "--count",
                             "2000", "--interval", "0.002"], stdout=subprocess.DEVNULL)
        try:
            before = t0.counters()["tx_packets"]
            wait_until(lambda: t0.counters()["tx_packets"] > before + 50, what="the flood going through")
            top = tb.python(n0, "-m", "ipipfast", "top", "--once", timeout=30)
        finally:
            flood.kill()
            flood.wait()
        out = top.stdout
        assert "\x1b[" not in out  # plain text into a pipe
        st = t0.status()
        assert f"ipipfast {tb.prefix}t0: pid {t0.proc.pid}, ready, mode Always; rates over " in out, out
        assert f"table generation {st['generation']}: 1 routes encapsulated, 0 direct" in out, out
        tx, rx = row(out, "tx", "(encap)"), row(out, "rx", "(decap)")
        assert float(tx[0]) > 0 and float(rx[0]) > 0, out  # echoes out, replies in: a few hundred a second
        assert row(out, "tx", "no_route")[0] == "0" and row(out, "egress", "foreign_ipip") == ["0", "0"]
        worker = row(out, "0")
        assert float(worker[0]) > 0 and len(worker) == 5, out  # the one worker, its ring's waiting frames last
        mac = tb.ipr(n1).get_links(ifname=n1.interface)[0].get_attr("IFLA_ADDRESS")  # the oracle: the peer's link
        hops = out[out.index("next hops"):]
        assert row(hops, n1.ip) == ["encapsulated", n1.ip, mac, "resolved", "-", n1.pod_cidr]
        by_peer = row(out[out.index("peers"):out.index("next hops")], n1.ip)
        assert float(by_peer[0]) > 0 and float(by_peer[2]) > 0, out  # the flood's echoes out, replies in
