"""The daemon's resident memory: at its working size once it is up, so that
traffic does not make it grow (the soak's RSS budget relies on it)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from ipipfast_lab import traffic
from ipipfast_lab.testbed import Testbed
from ipipfast_lab.daemons import running_tunnels

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces, TUN and AF_PACKET")]

TRANSFER = 32 << 20
# A worker's TUN buffers (batch x 64 KB for GSO reads) and segment headers
# were committed page by page as batches first reached them: the first
# 32 MB each way grew each daemon by 1.7-2.5 MB, and later ones by less and
# less, for hours. Touched at start, two rounds grow it by well under 100 kB.
GROWTH_KB = 512


def rss_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))


def test_tcp_both_ways_commits_no_new_memory():
    with Testbed(nodes=2, pods_per_node=1) as tb, running_tunnels(tb) as tunnels:
        a, b = tb.nodes[0].pods[0], tb.nodes[1].pods[0]
        before = [rss_kb(t.proc.pid) for t in tunnels]
        for seed in range(2):
            for src, dst in ((a, b), (b, a)):
                assert traffic.tcp_transfer(tb, src, dst, TRANSFER, seed=seed)["match"]
        grown = [rss_kb(t.proc.pid) - kb for t, kb in zip(tunnels, before)]
    assert max(grown) < GROWTH_KB, f"2 x {TRANSFER >> 20} MB each way grew the daemons by {grown} kB"
