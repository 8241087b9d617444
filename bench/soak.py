"""Soak: ipipfast on one two-node testbed under mixed traffic for a long time,
watching the daemons for leaks and the traffic for corruption.

    python -m bench.soak [--minutes 30] [--profile wire] [--out bench/results]

Each cycle, on the same two daemons: a TCP transfer each way (bytes checked by
SHA-256), a 64-byte UDP flood (udpflood.c), 200 UDP echoes, and a SIGHUP that
swaps the forwarding table (a spare route comes and goes, so the old table is
freed after every loop passed a quiescent point). After each cycle it samples
each daemon's resident memory, threads and open file descriptors, and its
counters. Memory is judged after a warm-up of WARMUP_CYCLES, once the rings,
buffers and allocator have reached their working size.

Verdict (exit 0 when all hold): every transfer matched and every echo came
back; neither daemon died; its threads never changed and its file
descriptors never grew (beyond FD_SLACK, a status file caught being
written); and resident memory grew by at most RSS_BUDGET_KB after the
warm-up.
Results: bench/results/soak-<time>.json, and a Markdown summary on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from ipipfast_lab import traffic
from ipipfast_lab.testbed import Testbed
from ipipfast_lab.daemons import TunnelProcess, start_tunnels

from . import e2e, stopping

WARMUP_CYCLES = 3
RSS_BUDGET_KB = 1024  # growth allowed after the warm-up, per daemon
FD_SLACK = 2
TRANSFER = 32 << 20
FLOOD_SECONDS = 2
ECHOES = 200
SPARE = "198.19.250.0/24"  # in the benchmarking range, routed to the peer in every other cycle


def sample(t: TunnelProcess) -> dict[str, int]:
    """Resident memory (kB), threads and open descriptors of a daemon."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{t.proc.pid}/status").read_text().splitlines())
    return {"rss_kb": int(status["VmRSS"].split()[0]), "threads": int(status["Threads"]),
            "fds": len(os.listdir(f"/proc/{t.proc.pid}/fd"))}


def cycle(tb: Testbed, tunnels: list[TunnelProcess], n: int, binary: Path) -> dict[str, Any]:
    a, b = tb.nodes[0].pods[0], tb.nodes[1].pods[0]
    out: dict[str, Any] = {"cycle": n, "t": time.time()}
    out["tcp_ab"] = traffic.tcp_transfer(tb, a, b, TRANSFER, seed=n)["match"]
    out["tcp_ba"] = traffic.tcp_transfer(tb, b, a, TRANSFER, seed=n + 1)["match"]
    for t in tunnels:  # lands while the flood runs: the table is swapped under load
        config = tb.node_config(t.node)
        if n % 2:
            peer = next(o for o in tb.nodes if o is not t.node)
            config["routes"].append({"cidr": SPARE, "via": peer.ip})
        t.reload(config)
    out["flood_kpps"] = e2e.flood(tb, a, b, FLOOD_SECONDS, binary)["kpps"]
    out["echoes"] = traffic.udp_roundtrip(tb, a, b, count=ECHOES, size=512)["received"]
    out["daemons"] = [{**sample(t), "alive": t.proc.poll() is None, "counters": t.counters()} for t in tunnels]
    return out


def verdict(cycles: list[dict[str, Any]]) -> dict[str, Any]:
    per_daemon = []
    w = min(WARMUP_CYCLES, len(cycles) - 1)
    hours = (cycles[-1]["t"] - cycles[w]["t"]) / 3600 or float("nan")
    for i in range(len(cycles[0]["daemons"])):
        ds = [c["daemons"][i] for c in cycles]
        warm = ds[w:]
        drops = {k: v for k, v in ds[-1]["counters"].items() if "drop" in k and v}
        per_daemon.append({
            "rss_kb_first": ds[0]["rss_kb"], "rss_kb_warm": warm[0]["rss_kb"], "rss_kb_last": ds[-1]["rss_kb"],
            "rss_kb_max": max(d["rss_kb"] for d in ds), "rss_growth_kb": ds[-1]["rss_kb"] - warm[0]["rss_kb"],
            "rss_kb_per_hour": (ds[-1]["rss_kb"] - warm[0]["rss_kb"]) / hours,
            "threads": sorted({d["threads"] for d in ds}), "fds": sorted({d["fds"] for d in ds}),
            "fd_growth": max(d["fds"] for d in warm) - warm[0]["fds"],
            "alive": all(d["alive"] for d in ds), "drops": drops,
            "tx_packets": ds[-1]["counters"]["tx_packets"], "rx_packets": ds[-1]["counters"]["rx_packets"],
        })
    checks = {
        "every transfer matched": all(c["tcp_ab"] and c["tcp_ba"] for c in cycles),
        "every echo came back": all(c["echoes"] == ECHOES for c in cycles),
        "daemons alive throughout": all(d["alive"] for d in per_daemon),
        "threads constant": all(len(d["threads"]) == 1 for d in per_daemon),
        "file descriptors not growing": all(d["fd_growth"] <= FD_SLACK for d in per_daemon),
        f"RSS growth after warm-up <= {RSS_BUDGET_KB} kB": all(d["rss_growth_kb"] <= RSS_BUDGET_KB
                                                                for d in per_daemon),
    }
    return {"checks": checks, "daemons": per_daemon,
            "flood_kpps_median": statistics.median(c["flood_kpps"] for c in cycles)}


def markdown(result: dict[str, Any]) -> str:
    m, v = result["meta"], result["verdict"]
    lines = [f"`{m['command']}` — {m['started']}, Linux {m['kernel']}, {m['cpus']} CPUs; {m['cycles']} cycles in "
             f"{m['minutes']:.1f} min, {m['gb_moved']:.1f} GB through the tunnel, "
             f"64 B flood median {v['flood_kpps_median']:.0f} kpps.", "",
             "| node | RSS start → after warm-up → end (max) MB | growth after warm-up | threads | fds | drops |",
             "|---|---|---|---|---|---|"]
    for i, d in enumerate(v["daemons"]):
        mb = [f"{d[k] / 1024:.1f}" for k in ("rss_kb_first", "rss_kb_warm", "rss_kb_last", "rss_kb_max")]
        drops = ", ".join(f"{k} {n}" for k, n in d["drops"].items()) or "none"
        lines.append(f"| n{i} | {mb[0]} → {mb[1]} → {mb[2]} ({mb[3]}) | {d['rss_growth_kb']} kB "
                     f"({d['rss_kb_per_hour']:.0f} kB/h) | {d['threads']} | {d['fds']} | {drops} |")
    lines += [""] + [f"- {'ok' if ok else 'FAILED'}: {name}" for name, ok in v["checks"].items()]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace, command: str) -> int:
    stopping.install()
    binary = e2e.flood_binary()
    started, t0 = time.strftime("%Y-%m-%dT%H:%M:%S%z"), time.monotonic()
    cycles: list[dict[str, Any]] = []
    with Testbed(profile=args.profile) as tb:
        tunnels = start_tunnels(tb)
        try:
            while not cycles or time.monotonic() - t0 < args.minutes * 60:
                stopping.check()
                cycles.append(cycle(tb, tunnels, len(cycles), binary))
                c = cycles[-1]
                print(f"cycle {c['cycle']}: tcp {c['tcp_ab']}/{c['tcp_ba']}, flood {c['flood_kpps']:.0f} kpps, "
                      f"echoes {c['echoes']}, rss {[d['rss_kb'] for d in c['daemons']]} kB", flush=True)
                if not all(d["alive"] for d in c["daemons"]):
                    break
        finally:
            codes = [t.stop() for t in tunnels]
    result: dict[str, Any] = {
        "meta": {"command": command, "started": started, "kernel": os.uname().release, "cpus": os.cpu_count(),
                 "profile": args.profile, "cycles": len(cycles), "minutes": (time.monotonic() - t0) / 60,
                 "gb_moved": len(cycles) * 2 * TRANSFER / 1e9, "exit_codes": codes},
        "verdict": verdict(cycles),
        "cycles": cycles,
    }
    result["verdict"]["checks"]["daemons exit 0 on SIGTERM"] = codes == [0] * len(codes)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    sys.stdout.write(markdown(result))
    print(f"wrote {path}")
    return 0 if all(result["verdict"]["checks"].values()) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30, help="how long to run (default 30)")
    parser.add_argument("--profile", choices=("wire", "veth"), default="wire", help="underlay profile")
    parser.add_argument("--out", type=Path, default=e2e.HERE / "results", help="results directory")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("needs root: it builds network namespaces, a TUN and raw sockets")
    return run(args, shlex.join(["python", "-m", "bench.soak", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
