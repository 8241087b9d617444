"""Where a ping-pong's round trips spend their time, from the scheduler's own trace.

    python -m bench.tail [--mode ipipfast|plain] [--pings 10000] [--load-kpps 0]
                         [--profile wire] [--tunnel KEY=VALUE ...] [--one-cpu] [--cwd DIR] [--keep DIR]

One fresh 2-node testbed; pod a pings pod b's UDP echo (traffic.py udp-send
--times, each round trip's start and length on CLOCK_MONOTONIC) while `perf
record -k monotonic` takes every sched_switch and sched_waking of the machine,
on the same clock. With --load-kpps, a paced 64-byte flood runs a -> b too;
--cwd runs the daemons from another checkout's build (as bench.mac_change's).

Each round trip is followed along its path, the threads that must run one
after the other: for ipipfast pod a, encap a, decap b, pod b, encap b, decap
a and pod a again; for plain routing pod b and pod a (the rest runs inside
their system calls). A thread that was asleep costs its wake-up: from its
sched_waking until it runs, the time goes to what ran on its CPU meanwhile
(nothing: an idle vCPU coming out of halt). Once it runs, its time until it
wakes the next thread is the path's own work, unless it was preempted, which
goes to what preempted it. The report gives, per round trip, the median ones
and the slowest 1% side by side, how often each cause cost 50 µs or more,
and each hop's p50 and p99. Needs root and perf (Debian linux-perf).
"""
from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ipipfast_lab.daemons import start_tunnels
from ipipfast_lab.testbed import Testbed

from . import ab, e2e, stopping

RUNNING = "running: the path's own work"
IDLE = "waking an idle vCPU"
PATH = {"ipipfast": ("encap a", "decap b", "pod b", "encap b", "decap a", "pod a"), "plain": ("pod b", "pod a")}
SLOW = 50.0  # µs: a cause that costs a round trip this much is counted as having delayed it


@dataclass
class Trace:
    """Who ran where, and when each thread on the path was woken and ran."""
    runs: dict[int, list[tuple[float, float, int, str]]] = field(default_factory=lambda: defaultdict(list))
    own: dict[int, list[tuple[float, float, int]]] = field(default_factory=lambda: defaultdict(list))
    wakes: dict[int, list[tuple[float, float, int]]] = field(default_factory=lambda: defaultdict(list))

    def index(self) -> None:
        self._run_starts = {cpu: [r[0] for r in rs] for cpu, rs in self.runs.items()}
        self._own_starts = {tid: [r[0] for r in rs] for tid, rs in self.own.items()}
        self.wake_starts = {tid: [w[0] for w in ws] for tid, ws in self.wakes.items()}

    def ran_on(self, cpu: int, t0: float, t1: float, skip: int = -1) -> Counter[tuple[int, str]]:
        """µs that each (tid, comm) ran on cpu within [t0, t1)."""
        out: Counter[tuple[int, str]] = Counter()
        runs = self.runs.get(cpu, [])
        i = max(0, bisect.bisect_right(self._run_starts.get(cpu, []), t0) - 1)
        while i < len(runs) and runs[i][0] < t1:
            s, e, tid, comm = runs[i]
            if e > t0 and tid != skip:
                out[(tid, comm)] += min(e, t1) - max(s, t0)
            i += 1
        return out

    def on_cpu(self, tid: int, t0: float, t1: float) -> float:
        """µs that tid ran within [t0, t1)."""
        runs, starts = self.own.get(tid, []), self._own_starts.get(tid, [])
        i, total = max(0, bisect.bisect_right(starts, t0) - 1), 0.0
        while i < len(runs) and runs[i][0] < t1:
            if runs[i][1] > t0:
                total += min(runs[i][1], t1) - max(runs[i][0], t0)
            i += 1
        return total

    def cpu_at(self, tid: int, t: float) -> int | None:
        """The CPU that tid ran on last at or before t."""
        i = bisect.bisect_right(self._own_starts.get(tid, []), t) - 1
        return self.own[tid][i][2] if i >= 0 else None


_LINE = re.compile(r"^\s*(.*?)\s+(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+sched:(\w+):\s+(.*)$")
_SWITCH = re.compile(r"prev_comm=(.*) prev_pid=(\d+) prev_prio=\d+ prev_state=(\S+) ==> next_comm=(.*) next_pid=(\d+)")
_WAKING = re.compile(r"comm=(.*) pid=(\d+) prio=\d+ target_cpu=(\d+)")


def parse(lines: Iterable[str], path: set[int]) -> Trace:
    """`perf script -F comm,tid,cpu,time,event,trace` of sched_switch and
    sched_waking (times in seconds) as a Trace in µs, the wake-ups and
    runs of the threads in path. A wake-up that finds its thread still on
    its CPU (it had not gone to sleep yet) costs nothing and is kept as
    such; one that finds it asleep lasts until it runs."""
    tr = Trace()
    running: dict[int, tuple[int, str, float]] = {}
    pending: dict[int, float] = {}
    asleep: dict[int, bool] = {}
    on_cpu: dict[int, int] = {}
    for line in lines:
        m = _LINE.match(line)
        if not m:
            continue
        _comm, _tid, cpu_s, t_s, event, rest = m.groups()
        t, cpu = float(t_s) * 1e6, int(cpu_s)
        if event == "sched_switch":
            x = _SWITCH.match(rest)
            if not x:
                continue
            prev, nxt = int(x[2]), int(x[5])
            if cpu in running:
                tid, comm, since = running[cpu]
                tr.runs[cpu].append((since, t, tid, comm))
                if tid in path:
                    tr.own[tid].append((since, t, cpu))
            if prev in path:
                asleep[prev] = not x[3].startswith("R")
            running[cpu] = (nxt, x[4], t)
            if nxt in path:
                asleep[nxt], on_cpu[nxt] = False, cpu
                if nxt in pending:
                    tr.wakes[nxt].append((pending.pop(nxt), t, cpu))
        elif event == "sched_waking":
            x = _WAKING.match(rest)
            wakee = int(x[2]) if x else -1
            if wakee in path and wakee not in pending:
                if asleep.get(wakee, True) or wakee not in on_cpu:
                    pending[wakee] = t
                else:
                    tr.wakes[wakee].append((t, t, on_cpu[wakee]))
    tr.index()
    return tr


def attribute(tr: Trace, path: list[tuple[str, int]], kind: dict[int, str],
              samples: Iterable[tuple[float, float]]) -> list[tuple[float, Counter[str], dict[str, float]]]:
    """Per round trip (its start in s, its RTT in µs): the RTT, the µs that
    each cause cost it, and each hop's µs. path: (name, tid) in the order a
    round trip wakes them, the sender last; kind: the category of threads
    off the path that are named as such (the daemons' Python threads)."""
    names = {tid: name for name, tid in path}
    sender = path[-1][1]

    def category(tid: int, comm: str) -> str:
        if tid == 0:
            return IDLE
        if tid in names:
            return "behind the path's own threads"
        if tid in kind:
            return f"behind {kind[tid]}"
        if comm.startswith(("ksoftirqd", "kworker", "rcu", "migration")):
            return "behind kernel threads"
        if comm.startswith("perf"):
            return "behind perf (this trace)"
        return "behind other processes"

    out = []
    for start, rtt in samples:
        t0 = start * 1e6
        t1 = t0 + rtt
        cost: Counter[str] = Counter()
        hops: dict[str, float] = {}

        def stretch(tid: int, since: float, until: float, last: bool = False) -> None:
            """tid's time from running to waking the next: its own, or its
            preempters'; last: the sender never slept, and its own time in
            the stretch (back from its send, then the echo) is the path's too."""
            ran = tr.on_cpu(tid, since, until) + (tr.on_cpu(sender, since, until) if last else 0.0)
            cost[RUNNING] += ran
            cpu = tr.cpu_at(tid, since)
            pre = tr.ran_on(cpu, since, until, skip=tid) if cpu is not None else Counter()
            if last:
                pre = Counter({k: v for k, v in pre.items() if k[0] != sender})
            total, off = sum(pre.values()), until - since - ran
            if off <= 0.5:
                return
            if not total:  # it went on elsewhere
                cost["off its CPU, elsewhere"] += off
            for (ptid, pcomm), v in pre.items():
                cost[category(ptid, pcomm)] += off * v / total

        worker, since = sender, t0
        for name, tid in path:
            starts = tr.wake_starts.get(tid, [])
            j = bisect.bisect_left(starts, since)
            woken = tr.wakes[tid][j] if j < len(starts) and starts[j] <= t1 else None
            if woken is None and tid != sender:
                continue  # it never slept: its work is in its waker's stretch
            until = woken[0] if woken else t1
            stretch(worker, since, until, last=woken is None and worker != sender)
            hops[f"{names[worker]} until it wakes {name}"] = until - since
            if woken is None:
                since = t1
                break  # the echo came back before the sender slept
            t_in = min(woken[1], t1)
            for (wtid, wcomm), v in tr.ran_on(woken[2], until, t_in).items():
                cost[category(wtid, wcomm)] += v
            hops[f"wake {name}"] = t_in - until
            worker, since = tid, t_in
        if since < t1:  # the sender, back from its wait: recv() and the clock
            stretch(sender, since, t1)
        out.append((rtt, cost, hops))
    return out


def _q(values: list[float], p: float) -> float:
    return values[min(len(values) - 1, int(p * len(values)))]


def report(rts: list[tuple[float, Counter[str], dict[str, float]]], title: str) -> str:
    rtts = sorted(r[0] for r in rts)
    p50, p99 = _q(rtts, 0.5), _q(rtts, 0.99)
    median = [r for r in rts if abs(r[0] - p50) <= 0.1 * p50]
    slow = [r for r in rts if r[0] >= p99]
    causes = sorted({c for r in rts for c in r[1]}, key=lambda c: -sum(r[1][c] for r in slow))
    lines = [title, "", f"{len(rts)} round trips: p50 {p50:.0f} µs, p99 {p99:.0f} µs, p99.9 {_q(rtts, 0.999):.0f} µs, "
             f"max {rtts[-1]:.0f} µs", "", "| µs per round trip | median ones | slowest 1% | delayed ≥ 50 µs |",
             "|---|---|---|---|"]
    for c in causes:
        a, b = (sum(r[1][c] for r in g) / len(g) for g in (median, slow))
        n = sum(1 for r in rts if r[1][c] >= SLOW)
        if a >= 0.5 or b >= 0.5:
            lines.append(f"| {c} | {a:.1f} | {b:.1f} | {'—' if c == RUNNING else f'{100 * n / len(rts):.2f}%'} |")
    lines.append(f"| round trip | {sum(r[0] for r in median) / len(median):.1f} | "
                 f"{sum(r[0] for r in slow) / len(slow):.1f} | |")
    hops = list(dict.fromkeys(k for r in rts for k in r[2]))
    lines += ["", "| hop | p50 µs | p99 µs | round trips |", "|---|---|---|---|"]
    for h in hops:
        v = sorted(r[2][h] for r in rts if h in r[2])
        if len(v) < len(rts) / 100:
            continue  # a hop skipped: a thread that had not gone to sleep yet
        lines.append(f"| {h} | {_q(v, 0.5):.0f} | {_q(v, 0.99):.0f} | {len(v)} |")
    return "\n".join(lines)


def ping_pong(tb: Testbed, a: Any, b: Any, args: argparse.Namespace) -> tuple[int, str]:
    """The traced ping-pong (with its flood, if any): the echo's pid, and
    udp-send's JSON with its own pid added."""
    echo = e2e.traffic.serve(tb, b, "udp-echo", "--port", e2e.ECHO_PORT)
    flood = sink = None
    try:
        if args.load_kpps:
            binary = e2e.flood_binary()
            sink = tb.popen(b, [str(binary), "sink", str(e2e.FLOOD_PORT), "600", "0.5"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            flood = tb.popen(a, [str(binary), "send", b.ip, str(e2e.FLOOD_PORT), str(e2e.SMALL), "600",
                                 str(args.load_kpps * 1e3)], stdout=subprocess.DEVNULL)
        e2e.traffic.tool(tb, a, "udp-send", "--dst", b.ip, "--port", e2e.ECHO_PORT, "--count", 20,
                         "--size", e2e.SMALL)  # perf is up by the time this returns
        send = tb.popen(a, e2e.traffic._argv(("udp-send", "--dst", b.ip, "--port", e2e.ECHO_PORT,
                                              "--count", args.pings, "--size", e2e.SMALL, "--times")),
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        result = e2e.traffic._result(*send.communicate(timeout=args.pings + 60), send.returncode, "udp-send")
    finally:
        for p in (flood, sink):
            if p is not None:
                e2e._stop(p)
        echo.terminate()
        e2e.traffic.collect(echo)
    return echo.pid, json.dumps({**result, "pid": send.pid})


def record(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Runs the ping-pong under perf on a fresh testbed; returns what the analysis needs."""
    with Testbed(profile=args.profile, pod_mtu=1480) as tb:
        tunnels = start_tunnels(tb, cwd=args.cwd, **dict(args.tunnel)) if args.mode == "ipipfast" else []
        if args.mode == "plain":
            tb.add_plain_routes()
        try:
            a, b = tb.nodes[0].pods[0], tb.nodes[1].pods[0]
            e2e.rtt(tb, a, b, 100)  # neighbours resolved, code paths warm
            tids: dict[str, int] = {}
            python: dict[int, str] = {}
            for node, t in zip("ab", tunnels):
                for task in Path(f"/proc/{t.proc.pid}/task").iterdir():
                    comm = (task / "comm").read_text().strip()
                    if comm.startswith("ipf-encap") or comm.startswith("ipf-decap"):
                        tids[f"{comm[4:9]} {node}"] = int(task.name)
                    else:
                        python[int(task.name)] = "the daemons' Python threads"
            perf = subprocess.Popen(["perf", "record", "-q", "-a", "-k", "monotonic", "-e", "sched:sched_switch",
                                     "-e", "sched:sched_waking", "-o", str(out / "perf.data")],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                # With --one-cpu, the pods' tools (started by this thread) and the daemons share one CPU.
                with e2e.one_cpu([t.proc.pid for t in tunnels]) if args.one_cpu else contextlib.nullcontext():
                    echo, send = ping_pong(tb, a, b, args)
                result = json.loads(send)
            finally:
                perf.send_signal(signal.SIGINT)
                perf.communicate(timeout=120)
            tids["pod b"], tids["pod a"] = echo, result["pid"]
        finally:
            for t in tunnels:
                t.stop()
    return {"mode": args.mode, "tids": tids, "python": python, "sent_at": result["sent_at"],
            "rtts_us": result["rtts_us"], "rtt_us": result["rtt_us"], "load": os.getloadavg()[0],
            "one_cpu": args.one_cpu}


def analyse(meta: dict[str, Any], script: Iterable[str]) -> str:
    path = [(name, meta["tids"][name]) for name in PATH[meta["mode"]]]
    tr = parse(script, {tid for _, tid in path})
    rts = attribute(tr, path, {int(k): v for k, v in meta["python"].items()},
                    zip(meta["sent_at"], meta["rtts_us"]))
    return report(rts, f"`python -m bench.tail --mode {meta['mode']}{' --one-cpu' * meta.get('one_cpu', False)}`, "
                       f"1-min load average {meta['load']:.1f}; "
                       f"the ping-pong's own figures: {meta['rtt_us']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tail", description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=tuple(PATH), default="ipipfast")
    p.add_argument("--pings", type=int, default=10000)
    p.add_argument("--load-kpps", type=float, default=0.0, help="a paced 64-byte flood a -> b meanwhile (kpps)")
    p.add_argument("--profile", choices=("wire", "veth"), default="wire")
    p.add_argument("--tunnel", type=ab.tunnel_option, action="append", default=[], metavar="KEY=VALUE",
                   help="a tunnel option for the daemons, e.g. coalesce_us=0; repeatable")
    p.add_argument("--one-cpu", action="store_true",
                   help="the pods' tools and every thread of the daemons on one CPU (bench.e2e's RTT on 1 CPU)")
    p.add_argument("--cwd", type=Path, help="run the daemons from this checkout's build (a worktree built in place)")
    p.add_argument("--keep", type=Path, help="keep the trace and the round trips here (perf.data, meta.json)")
    p.add_argument("--analyse", type=Path, metavar="DIR", help="only analyse what --keep kept in DIR")
    args = p.parse_args(argv)
    if args.analyse:
        meta = json.loads((args.analyse / "meta.json").read_text())
        out = args.analyse
    else:
        if os.geteuid() != 0:
            p.error("needs root: it builds network namespaces and traces the scheduler")
        stopping.install()
        out = args.keep or Path(tempfile.mkdtemp(prefix="ipipfast-tail-"))
        out.mkdir(parents=True, exist_ok=True)
        meta = record(args, out)
        (out / "meta.json").write_text(json.dumps(meta))
    script = subprocess.run(["perf", "script", "-i", str(out / "perf.data"), "-F", "comm,tid,cpu,time,event,trace"],
                            capture_output=True, text=True, check=True).stdout
    print(analyse(meta, script.splitlines()))
    if not (args.keep or args.analyse):
        for f in out.iterdir():
            f.unlink()
        out.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
