"""The soak with faults, briefly: two cycles with every fault kind (a
restart in the second), every check of its verdict held, and each kind's
figures real."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from test_bench_smoke import run_harness

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces, TUN and AF_PACKET")]


def test_two_cycles_with_every_fault_hold_every_check(tmp_path: Path) -> None:
    proc = run_harness([sys.executable, "-m", "bench.soak", "--cycles", "2", "--restart-every", "2",
                        "--out", str(tmp_path)], timeout=180)
    [path] = tmp_path.glob("soak-*.json")
    result = json.loads(path.read_text())
    v = result["verdict"]
    assert proc.returncode == 0 and all(v["checks"].values()), (v["checks"], proc.stderr[-3000:])
    faults = v["faults"]
    # per node and cycle: 3 churn batches, an edit and a SIGHUP; a flap and a MAC change per cycle; one restart
    assert [faults[k]["events"] for k in ("churn", "reload", "flap", "mac", "restart")] == [12, 8, 2, 2, 1]
    assert all(f["recovered"] == f["events"] and f["recovery_ms"]["median"] > 0 for f in faults.values())
    assert faults["churn"]["route_writes"] == 1600
    assert faults["flap"]["echoes_lost"]["total"] > 0 and faults["restart"]["echoes_lost"]["total"] > 0
    assert faults["flap"]["drops"]  # what the flap lost, by reason
    # the restarted daemon is judged on its own life, its counters closed like the others'
    lives = v["daemons"]
    assert [(d["node"], d["restarted"]) for d in lives] == [(0, False), (1, False), (0, True)]
    assert all(d["closed"] and d["reloads_ok"] and d["tun_read_checked"] >= 200 for d in lives)  # the echoes at least
    assert lives[1]["reloads"] == {"applied": 2, "unchanged": 2, "refused": 0}
    assert "| SIGKILL + restart (exec → first reply) | 1 |" in proc.stdout
