"""bench.etcd_scale, briefly: every case on a small cluster, each put
matched to a table publication, the full-table swaps with no packet dropped for want of a route.
Its figures are the benchmark's, not asserted here."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from test_bench_smoke import ROOT, run_harness

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces and TUN"),
    pytest.mark.skipif(shutil.which("etcd") is None, reason="needs etcd (Debian: etcd-server)"),
]


def test_small_run_of_every_case(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "bench.etcd_scale", "--nodes", "10", "--cidrs", "40", "--changes", "10",
            "--churn-rate", "20", "--churn-seconds", "2", "--full", "300", "--swaps", "3", "--out", str(tmp_path)]
    done = run_harness(argv, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = tmp_path.glob("etcd-scale-*.json")
    r = json.loads(result.read_text())
    c, f = r["cluster"], r["full_table"]
    assert c["load"]["keys"] == 40 and f["load"]["keys"] == 301  # and the real node's
    for case in (c["propagation"], c["churn"], f["swaps"]):
        assert case["unmatched"] == 0 and case["latency"]["n"] == case["puts"] > 0
    assert c["churn"]["puts"] == 40
    assert f["traffic"]["received"] > 0 and f["traffic"]["tx_drop_no_route"] == 0  # losses are a figure
    assert "| put to datapath, churn" in done.stdout
