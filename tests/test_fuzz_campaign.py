"""Bad input at volume, briefly: bench.fuzz with 30,000 frames instead of its
million (about 10 s here), every check of its verdict held, and its figures
as it reports them."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from test_bench_smoke import run_harness

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces, TUN and AF_PACKET")]
FRAMES = 30_000


def test_a_short_campaign_holds_every_check(tmp_path: Path) -> None:
    proc = run_harness([sys.executable, "-m", "bench.fuzz", "--frames", str(FRAMES), "--seed", "7",
                        "--workers", "2", "--out", str(tmp_path)], timeout=180)
    [path] = tmp_path.glob("fuzz-*.json")
    result = json.loads(path.read_text())
    assert proc.returncode == 0 and all(result["checks"].values()), (result["checks"], proc.stderr[-3000:])
    injector, n0 = result["injector"], result["n0"]
    assert injector["frames"] == FRAMES and injector["accepted"] > FRAMES * 0.9
    assert len(injector["kinds"]) >= 15  # every mutation, fragments, random bytes
    # The mutations reach every check the datapath has, past the socket filter.
    for reason in ("truncated", "other_host", "bad_header", "bad_checksum", "unknown_peer", "source_mac",
                   "inner_bad", "inner_ipip", "inner_to_local", "inner_to_peer", "ecn"):
        assert n0["drops"].get(reason, 0) > 0, (reason, n0["drops"])
    assert n0["rx_packets"] > 0 and result["traffic"]["during"] >= 1
    assert "| rx drop reason | frames |" in proc.stdout
