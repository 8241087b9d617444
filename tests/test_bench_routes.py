"""bench.routes, briefly: every case on a small table, each figure present
and what it counts right (route writes, reloads parsed or not, every probe
route seen in a publication). Its times are the benchmark's, not asserted."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from test_bench_smoke import run_harness

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces and TUN"),
]
ROUTES = 2000


def test_small_run_of_every_case(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "bench.routes", "--routes", str(ROUTES), "--reloads", "3", "--events", "10",
            "--out", str(tmp_path)]
    done = run_harness(argv, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = tmp_path.glob("routes-*.json")
    r = json.loads(result.read_text())
    f = r["file"]
    assert f["start_route_writes"] == ROUTES and f["start_s"] > 0 and f["rss_ready_mb"] > 0
    assert (f["reload_same"]["parsed"], f["reload_same"]["route_writes"]) == (False, 0)
    assert (f["reload_comment"]["parsed"], f["reload_comment"]["route_writes"]) == (True, 0)
    assert (f["reload_one"]["route_writes"], f["reload_one"]["route_batches"]) == (1, 1)
    assert f["rss_reloads_mb"]["n"] == 3
    assert r["kernel"]["route_writes"] == 0  # the kernel's routes into the TUN are followed, not rewritten
    assert (r["restart"]["first_route_writes"], r["restart"]["route_writes"]) == (ROUTES, 0)
    assert [c["samples"] for c in r["latency"]] == [10, 10]
    assert "| event -> datapath" in done.stdout
