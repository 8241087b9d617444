"""The benchmark tools, briefly, on the real-wire profile: the end-to-end
harness in its quick mode (plain routing, ipipfast and the naive baseline each
get every figure and pass the check that their traffic took the expected
path), and the before/after driver against this very commit."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODES = ["plain", "ipipfast", "naive"]
FIGURES = ["tcp1_gbit_s", "tcp4_gbit_s", "udp64_kpps", "rtt_p50_us", "rtt_p99_us", "rtt1_p50_us", "cpu_s_per_gb"]

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces, TUN and raw sockets")]


def run_harness(argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Runs the harness; past the timeout it gets SIGTERM first, on which it
    tears its testbed down (a SIGKILL would leave the namespaces behind)."""
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"the harness took over {timeout}s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def test_quick_run_on_the_wire_profile(tmp_path: Path) -> None:
    proc = run_harness(
        [sys.executable, "-m", "bench.e2e", "--quick", "--profiles", "wire", "--modes", ",".join(MODES),
         "--out", str(tmp_path), "--no-install"], timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [result_file] = tmp_path.glob("e2e-*.json")
    result = json.loads(result_file.read_text())
    assert result["skipped"] == {}
    for mode in MODES:
        row = result["summary"]["wire"][mode]
        assert row["verified"], (mode, row)
        assert row["errors"] == [], (mode, row["errors"])
        for key in FIGURES:
            assert row["figures"][key]["median"] > 0, (mode, key)
        if mode != "plain":
            assert row["figures"]["tcp1_gbit_s"]["vs_plain"] > 0
    table = result_file.with_suffix(".md").read_text()
    assert table == proc.stdout  # what it prints is what it wrote
    assert "| mode | pod MTU | TCP 1 stream Gbit/s |" in table
    for mode in MODES:
        assert f"| {mode} | " in table


def ab_worktrees() -> set[str]:
    listing = subprocess.run(["git", "worktree", "list"], cwd=ROOT, capture_output=True, text=True).stdout
    return {line.split()[0] for line in listing.splitlines() if "ipipfast-ab-" in line}


def test_before_and_after_against_head() -> None:
    """bench.ab builds HEAD in a worktree of its own and measures it against
    this checkout, each side's daemons checked to run its own build."""
    before = ab_worktrees()
    proc = run_harness([sys.executable, "-m", "bench.ab", "HEAD", "--rounds", "1", "--duration", "1", "--flood"],
                       timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Each side's one round, as printed while it ran: "round 1 A: TCP Gbit/s 2.87, CPU s/GB 4.7, ..."
    rounds = {side: dict(f.rsplit(" ", 1) for f in line.split(": ", 1)[1].split(", "))
              for line in proc.stderr.splitlines() if line.startswith("round 1 ")
              for side in line.split()[2].rstrip(":")}
    assert set(rounds) == {"A", "B"}, proc.stderr[-3000:]
    rows = {cells[0]: cells[1:] for line in proc.stdout.splitlines() if line.startswith("| ")
            for cells in [[c.strip() for c in line.strip("|").split("|")]]}
    for title, higher_is_better in (("TCP Gbit/s", True), ("CPU s/GB", False), ("64 B UDP kpps", True)):
        a, b = (float(rounds[side][title]) for side in "AB")
        assert a > 0 and b > 0, (title, rounds)
        # One round: the medians are that round's figures, and the report's verdict follows from them
        # (from the printed three digits: within their rounding, and unless they print alike).
        assert rows[title][:2] == [rounds["A"][title], rounds["B"][title]], (title, rows[title])
        assert abs(float(rows[title][2].lstrip("×")) - b / a) < 0.01 + 0.01 * b / a, (title, rows[title])
        if a != b:
            assert rows[title][3] == f"{int(b > a if higher_is_better else b < a)} of 1", (title, rows[title])
    assert ab_worktrees() <= before  # its own is removed again (others' runs may have theirs)
