"""Before and after: ipipfast of another revision against this checkout, side by side.

    python -m bench.ab REV [--rounds 6] [--streams 1] [--duration 5] [--rtt] [--loaded] [--flood]
                           [--profile wire] [--tunnel KEY=VALUE ...] [--tunnel-b KEY=VALUE ...]

REV's build (a git worktree in a temporary directory, its extension built in
place) is A, this checkout as built is B. Every measurement is a fresh testbed
with an ipipfast per node, made by this checkout's harness in a child process;
only the daemons differ: they start in the measured build's checkout, so that
`python -m ipipfast` imports that build, and the child checks in their
/proc/<pid>/maps that they run its extension. Rounds alternate the order, AB
then BA, so that a drift of this shared machine falls on both. Both sides get
the same 64-byte generator (--flood, --loaded), built once from this checkout.
--tunnel sets a tunnel option in both sides' config, --tunnel-b in B's only
(so `bench.ab HEAD --tunnel-b coalesce_us=0` measures an option of one build). REV's
daemon must take this checkout's testbed config (`ipipfast run --config
--status-file`): any revision since the TX ring. Needs root, as the tests do.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from . import e2e

ROOT = Path(__file__).resolve().parent.parent

# Runs in the child, in this checkout; argv[1] is the measured build's checkout.
MEASURE = """
import json, sys, time
from pathlib import Path
from bench import e2e
from ipipfast_lab.testbed import Testbed
from ipipfast_lab.daemons import start_tunnels
root, o = sys.argv[1], json.loads(sys.argv[2])
with Testbed(profile=o["profile"], pod_mtu=1480) as tb:
    tunnels = start_tunnels(tb, cwd=root, **o["tunnel"])
    try:
        for t in tunnels:
            so = [line.split()[-1] for line in Path(f"/proc/{t.proc.pid}/maps").read_text().splitlines()
                  if "_datapath" in line]
            assert so and all(p.startswith(root) for p in so), f"daemon {t.proc.pid} runs {so}, not {root}'s build"
        a, b = tb.nodes[0].pods[0], tb.nodes[1].pods[0]
        out = e2e.iperf(tb, a, b, o["streams"], o["duration"], [t.proc.pid for t in tunnels] + e2e._ksoftirqd())
        if o["rtt"]:
            pids, t0 = [t.proc.pid for t in tunnels], time.monotonic()
            before = e2e.process_cpu(pids)
            out.update(e2e.rtt(tb, a, b, o["pings"]))
            out["rtt_cpu_pct"] = 100 * (e2e.process_cpu(pids) - before) / (time.monotonic() - t0)
        if o["loaded"]:
            out.update(e2e.loaded_rtt(tb, a, b, o["pings"], Path(o["binary"]), o["load_kpps"]))
        if o["flood"]:
            out["udp64_kpps"] = e2e.flood(tb, a, b, o["duration"], Path(o["binary"]))["kpps"]
        print(json.dumps(out))
    finally:
        for t in tunnels:
            t.stop()
"""
FIGURES = (("gbit_s", "TCP Gbit/s"), ("cpu_s_per_gb", "CPU s/GB"), ("retransmits", "retransmits"),
           ("rtt_p50_us", "RTT p50 µs"), ("rtt_cpu_pct", "daemons' CPU % in the ping-pong"), ("rtt_p99_us", "RTT p99 µs"), ("rtt_p999_us", "RTT p99.9 µs"),
           ("loaded_p50_us", "loaded RTT p50 µs"), ("loaded_p99_us", "loaded RTT p99 µs"),
           ("loaded_p999_us", "loaded RTT p99.9 µs"), ("udp64_kpps", "64 B UDP kpps"))
HIGHER_IS_BETTER = {"gbit_s", "udp64_kpps"}
PINGS = 5000  # per ping-pong: its p99.9 is the 5th-slowest round trip


def tunnel_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError("KEY=VALUE")
    return key, yaml.safe_load(value)


def build(root: Path) -> None:
    subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace", "-q"], cwd=root, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stale_build(root: Path) -> str:
    """Why root's extension is not the build of its sources, or ''. This
    checkout is not rebuilt here: setuptools rewrites the .so in place, which
    would crash any process that has it mapped."""
    built = list((root / "ipipfast").glob("_datapath*.so"))
    if not built:
        return "no built extension"
    sources = [*(root / "ipipfast").glob("_datapath.p*"), *(root / "ipipfast" / "datapath").glob("*.pyx"),
               *(root / "ipipfast" / "includes").iterdir()]
    newer = [s.name for s in sources if s.stat().st_mtime > built[0].stat().st_mtime]
    return f"{', '.join(newer)} changed since the extension was built" if newer else ""


def measure(root: Path, side: str, args: argparse.Namespace, binary: Path | None) -> dict[str, Any]:
    o = {"profile": args.profile, "streams": args.streams, "duration": args.duration, "rtt": args.rtt,
         "loaded": args.loaded, "flood": args.flood, "pings": PINGS, "load_kpps": args.load_kpps,
         "binary": str(binary or ""), "tunnel": dict(args.tunnel + (args.tunnel_b if side == "B" else []))}
    r = subprocess.run([sys.executable, "-c", MEASURE, str(root), json.dumps(o)],
                       cwd=ROOT, capture_output=True, text=True, timeout=args.duration + 180)
    if r.returncode:
        raise RuntimeError(f"measuring {root} failed: {r.stderr.strip().splitlines()[-1:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def report(runs: dict[str, list[dict[str, Any]]], rev: str, args: argparse.Namespace) -> str:
    keys = [(k, title) for k, title in FIGURES if all(k in m for ms in runs.values() for m in ms)]
    flags = "".join(f" --{f}" for f in ("rtt", "loaded", "flood") if getattr(args, f))
    flags += "".join(f" --tunnel {k}={v}" for k, v in args.tunnel)
    flags += "".join(f" --tunnel-b {k}={v}" for k, v in args.tunnel_b)
    lines = [f"`python -m bench.ab {rev} --rounds {args.rounds} --streams {args.streams} --duration "
             f"{args.duration}{flags} --profile {args.profile}`: medians over "
             f"{args.rounds} rounds, A = {rev}, B = this checkout, order alternating.", "",
             "| figure | A | B | B/A | rounds B better |", "|---|---|---|---|---|"]
    for k, title in keys:
        a, b = ([m[k] for m in runs[x]] for x in "AB")
        ma, mb = statistics.median(a), statistics.median(b)
        higher = k in HIGHER_IS_BETTER
        wins = sum((y > x) if higher else (y < x) for x, y in zip(a, b))
        lines.append(f"| {title} | {ma:.3g} | {mb:.3g} | ×{mb / ma:.2f} | {wins} of {len(a)} |" if ma else
                     f"| {title} | {ma:.3g} | {mb:.3g} | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("rev", help="the revision to compare with (A), e.g. HEAD~1")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--streams", type=int, default=1, help="iperf3 streams (default 1)")
    p.add_argument("--duration", type=int, default=5, help="seconds per measurement (default 5)")
    p.add_argument("--rtt", action="store_true", help="also the UDP ping-pong RTT")
    p.add_argument("--loaded", action="store_true",
                   help="also the ping-pong under a paced 64-byte flood (--load-kpps, as bench.e2e's loaded RTT)")
    p.add_argument("--load-kpps", type=float, default=e2e.LOAD_KPPS, help="that flood's rate (0: flat out)")
    p.add_argument("--flood", action="store_true", help="also the 64-byte UDP rate (bench/udpflood.c)")
    p.add_argument("--tunnel", type=tunnel_option, action="append", default=[], metavar="KEY=VALUE",
                   help="a tunnel option for both sides (YAML value), e.g. coalesce_us=0; repeatable")
    p.add_argument("--tunnel-b", type=tunnel_option, action="append", default=[], metavar="KEY=VALUE",
                   help="a tunnel option for B only, over --tunnel; repeatable")
    p.add_argument("--profile", choices=("wire", "veth"), default="wire")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.ab needs root: it builds network namespaces", file=sys.stderr)
        return 1
    if why := stale_build(ROOT):
        print(f"bench.ab measures this checkout as built, and {why}: run "
              f"`python setup.py build_ext --inplace` first", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="ipipfast-ab-") as tmp:
        wt = Path(tmp) / "a"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(wt), args.rev], cwd=ROOT, check=True)
        try:
            build(wt)
            flood = e2e.flood_binary() if args.flood or args.loaded else None
            runs: dict[str, list[dict[str, Any]]] = {"A": [], "B": []}
            for i in range(args.rounds):
                for side in ("AB" if i % 2 == 0 else "BA"):
                    m = measure(wt if side == "A" else ROOT, side, args, flood)
                    runs[side].append(m)
                    print(f"round {i + 1} {side}: " + ", ".join(f"{t} {m[k]:.3g}" for k, t in FIGURES if k in m),
                          file=sys.stderr, flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(wt)], cwd=ROOT, check=False)
    print(report(runs, args.rev, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
