"""Restart: what a SIGKILL and a restart of a node's daemon cost a pod, under a ping flood.

    python -m bench.restart [--rounds 5] [--interval 0.001]

Each round: a fresh two-node testbed with ipipfast on both nodes, a pod pinging
the other node's pod every INTERVAL throughout. After WARMUP seconds the sending
node's daemon gets SIGKILL and a new one is exec'd at once; its TUN and every
route into it persist, so it attaches and forwards again. Clocks: every reply's
arrival (CLOCK_MONOTONIC, shared by all namespaces) against the moment of the
exec. Figures per round:
  exec -> first reply   how long after the new daemon's exec the first echo came back
  outage                the last reply before the kill to the first after it
  lost                  echoes without a reply
Medians and the range over rounds on stdout, as a Markdown table; the JSON in
bench/results/restart-<time>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ipipfast_lab import traffic
from ipipfast_lab.daemons import TunnelProcess, start_tunnels
from ipipfast_lab.testbed import Testbed

from . import stopping

WARMUP = 1.0      # seconds of flood before the kill
AFTER = 3.0       # seconds of flood after the restart's exec
HERE = Path(__file__).resolve().parent


def one_round(interval: float) -> dict[str, Any]:
    with Testbed(nodes=2, profile="wire") as tb:
        n0 = tb.nodes[0]
        a, b = n0.pods[0], tb.nodes[1].pods[0]
        tunnels = start_tunnels(tb)
        count = int((WARMUP + AFTER) / interval)
        pinger = tb.popen(a, [sys.executable, "-m", "ipipfast_lab.traffic", "ping", "--dst", b.ip, "--count",
                              str(count), "--interval", str(interval), "--size", "56", "--times"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        again: TunnelProcess | None = None
        try:
            time.sleep(WARMUP)
            tunnels[0].stop(sig=9)
            exec_at = time.monotonic()
            again = TunnelProcess(tb, n0, tb.node_config(n0))
            again.wait_ready()
            ping = traffic.collect(pinger, timeout=WARMUP + AFTER + 30)
        finally:
            for t in [*tunnels, *([again] if again else [])]:
                t.stop()
    return {**gap(ping["replied_at"], exec_at), "lost": ping["sent"] - ping["received"], "sent": ping["sent"]}


def gap(replies: list[float], exec_at: float) -> dict[str, float]:
    """A restart's gap in a stream of echo replies (CLOCK_MONOTONIC): from the
    new daemon's exec to the first reply after it, and from the last reply
    before it to that one."""
    before = [t for t in replies if t < exec_at]
    after = [t for t in replies if t >= exec_at]
    if not before or not after:
        raise RuntimeError(f"no replies {'before the kill' if not before else 'after the restart'}")
    return {"exec_to_first_reply_ms": (after[0] - exec_at) * 1e3, "outage_ms": (after[0] - before[-1]) * 1e3}


def markdown(rounds: list[dict[str, Any]], command: str) -> str:
    lines = [f"`{command}` — {time.strftime('%Y-%m-%d')}, Linux {os.uname().release}, {os.cpu_count()} CPUs; "
             f"{len(rounds)} rounds, median [min–max].", "", "| figure | value |", "|---|---|"]
    for key, title in (("exec_to_first_reply_ms", "exec -> first reply, ms"), ("outage_ms", "outage, ms"),
                       ("lost", "echoes lost")):
        v = [r[key] for r in rounds]
        lines.append(f"| {title} | {statistics.median(v):.4g} [{min(v):.4g}–{max(v):.4g}] |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.restart", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--interval", type=float, default=0.001, help="seconds between echoes (default 0.001)")
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        p.error("needs root: it builds network namespaces")
    stopping.install()
    rounds = []
    for i in range(args.rounds):
        stopping.check()
        rounds.append(one_round(args.interval))
        print(f"round {i + 1}: " + ", ".join(f"{k} {v:.4g}" for k, v in rounds[-1].items()), file=sys.stderr,
              flush=True)
    command = shlex.join(["python", "-m", "bench.restart", *(sys.argv[1:] if argv is None else argv)])
    table = markdown(rounds, command)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"restart-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(
        json.dumps({"command": command, "rounds": rounds}, indent=1) + "\n")
    sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
