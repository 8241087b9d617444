"""Node leases at the scale of a large cluster: one ipipfast daemon on etcd
alone, against a real etcd (Debian's, on the testbed's control-plane host)
loaded with simulated nodes in flannel's form by bench.etcd_load.

    python -m bench.etcd_scale [--nodes 1000] [--cidrs 5000] [--changes 200] [--churn-rate 100]
                               [--churn-seconds 60] [--full 100000] [--swaps 20]

Cases, each timed on CLOCK_MONOTONIC, which the namespaces share:
  converge     NODES nodes with CIDRS CIDRs (/28s) in etcd: the daemon's exec
               to ready, and to the publication of the datapath table that
               holds every CIDR (the daemon's own record, status
               table.published); its RSS then (and its peak)
  propagation  CHANGES single route changes, 10 a second (each put moves a
               CIDR to another node): the put (just before it is sent) to
               the first table publication whose etcd revision is at least
               the put's (exact: each publication records the revision its
               routes are as of); p50/p99/max, and the put's own round trip,
               which is etcd's share
  churn        the same at CHURN_RATE changes a second for CHURN_SECONDS;
               the daemon's and etcd's CPU over it (% of one core)
  full_table   FULL /32s in etcd (NODES nodes, and a real second node's pod
               CIDR): start to converged and RSS; then SWAPS changes a
               second apart, each rebuilding the whole table and swapping it
               into the datapath (put to publication), while a pod pings the
               other node's pod every millisecond through an unchanged
               route: packets lost, and the datapath's no_route drops
Results: bench/results/etcd-scale-<time>.json, and a Markdown table on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ipipfast_lab import traffic
from ipipfast_lab.daemons import TunnelProcess, wait_until
from ipipfast_lab.etcd import EtcdServer, node_config
from ipipfast_lab.testbed import Testbed

from . import results

HERE = Path(__file__).resolve().parent
TICKS = os.sysconf("SC_CLK_TCK")
POLL = 0.25  # seconds between the harness's looks at the daemon's publications (it keeps the last 64)
SINGLE_RATE = 10.0  # changes a second for the propagation case: each one alone
PING_INTERVAL = 0.001


@contextmanager
def cluster() -> Iterator[tuple[Testbed, EtcdServer, Path]]:
    """The testbed, etcd on its control-plane host, and the load's state file (removed after)."""
    with Testbed(nodes=2, control_plane=True) as tb, EtcdServer(tb) as etcd, \
            tempfile.TemporaryDirectory(prefix=f"{tb.prefix}-load-") as tmp:
        yield tb, etcd, Path(tmp) / "state.json"


def load(tb: Testbed, etcd: EtcdServer, state: Path, *args: str) -> dict[str, Any]:
    """bench.etcd_load on the control-plane host; its summary."""
    assert tb.control_plane is not None
    out = tb.run(tb.control_plane, [sys.executable, "-m", "bench.etcd_load", "--endpoint", etcd.endpoint,
                                    "--state", str(state), *args], timeout=1800, cwd=HERE.parent).stdout
    return json.loads(out.strip().splitlines()[-1])


def churn(tb: Testbed, etcd: EtcdServer, state: Path, out: Path, rate: float, seconds: float,
          offset: int) -> subprocess.Popen:
    assert tb.control_plane is not None
    return tb.popen(tb.control_plane, [sys.executable, "-m", "bench.etcd_load", "--endpoint", etcd.endpoint,
                                       "--state", str(state), "churn", "--rate", str(rate), "--seconds",
                                       str(seconds), "--offset", str(offset), "--out", str(out)],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=HERE.parent)


def finish(proc: subprocess.Popen) -> dict[str, Any]:
    out, err = proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"bench.etcd_load failed: {err.decode(errors='replace')}")
    return json.loads(out.decode().strip().splitlines()[-1])


def cpu_s(pid: int) -> float:
    """utime + stime of a process, seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def memory_mb(pid: int) -> dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return {"rss_mb": out["VmRSS"], "peak_rss_mb": out["VmHWM"]}


class Publications:
    """The daemon's table publications (generation -> CLOCK_MONOTONIC ns,
    entries, etcd revision), gathered from its status while it runs."""

    def __init__(self, t: TunnelProcess) -> None:
        self.t, self.seen, self._stop = t, {}, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Publications:
        self.look()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.look()

    def look(self) -> None:
        for g, ns, n, revision in self.t.status()["table"]["published"]:
            self.seen[g] = (ns, n, revision)

    def _run(self) -> None:
        while not self._stop.wait(POLL):
            self.look()

    def first(self, holds: Callable[[int, int, int], bool]) -> tuple[int, int, int] | None:
        """The earliest publication (ns, entries, revision) that holds."""
        return next((p for p in sorted(self.seen.values()) if holds(*p)), None)


def wait_converged(t: TunnelProcess, entries: int, timeout: float = 600) -> tuple[int, int, int]:
    """The first publication with at least `entries` entries."""
    def found() -> tuple[int, int, int] | None:
        return next(((ns, n, r) for _, ns, n, r in t.status()["table"]["published"] if n >= entries), None)
    return wait_until(found, timeout, f"a table of {entries} entries")


def start_daemon(tb: Testbed, etcd: EtcdServer, entries: int) -> tuple[TunnelProcess, dict[str, Any]]:
    """The daemon on node 0 on etcd alone; its exec to ready and to a table of `entries`."""
    n0 = tb.nodes[0]
    t0 = time.monotonic_ns()
    t = TunnelProcess(tb, n0, node_config(tb, n0, etcd))
    try:
        wait_until(lambda: t.status_path.exists() or t.proc.poll() is not None, 600, "ready")
        ready = time.monotonic_ns()
        if t.proc.poll() is not None:
            raise RuntimeError(f"the daemon exited:\n{t.log()[-3000:]}")
        converged = wait_converged(t, entries)[0]
        return t, {"ready_s": (ready - t0) / 1e9, "converged_s": (converged - t0) / 1e9, **memory_mb(t.proc.pid)}
    except BaseException:
        t.stop()
        raise


def percentile(xs: list[float], q: float) -> float:
    return xs[min(len(xs) - 1, int(len(xs) * q))]


def summary(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {"n": len(xs), "p50_ms": percentile(xs, 0.5), "p99_ms": percentile(xs, 0.99), "max_ms": xs[-1]}


def propagation(tb: Testbed, etcd: EtcdServer, t: TunnelProcess, state: Path, rate: float, seconds: float,
                offset: int) -> dict[str, Any]:
    """Each put of a churn to the publication holding it; the daemon's and etcd's CPU."""
    out = state.with_suffix(f".puts{offset}.json")
    assert etcd.proc is not None
    cpu0 = cpu_s(t.proc.pid), cpu_s(etcd.proc.pid)
    with Publications(t) as pubs:
        w0 = time.monotonic()
        proc = churn(tb, etcd, state, out, rate, seconds, offset)
        load_result = finish(proc)
        puts = json.loads(out.read_text())
        last = max(r for _, _, r in puts)
        wait_until(lambda: pubs.first(lambda ns, n, r: r >= last), 60, "the last put published")
        wall = time.monotonic() - w0
    cpu1 = cpu_s(t.proc.pid), cpu_s(etcd.proc.pid)
    latency, missing, start = [], 0, puts[0][0]
    for before, _, revision in puts:
        pub = pubs.first(lambda ns, n, r, rev=revision, at=before: r >= rev and ns >= at)
        if pub is None:
            missing += 1
        else:
            latency.append(((pub[0] - before) / 1e6, (before - start) / 1e9))
    rtt = [(after - before) / 1e6 for before, after, _ in puts]
    return {"rate": load_result["rate"], "puts": len(puts), "unmatched": missing,
            "publications": len(pubs.seen), "latency": summary([ms for ms, _ in latency]),
            "slowest": [(round(ms, 1), round(at, 2)) for ms, at in sorted(latency)[-5:]],  # (ms, s into the run)
            "put_rtt": summary(rtt),
            "daemon_cpu_pct": 100 * (cpu1[0] - cpu0[0]) / wall, "etcd_cpu_pct": 100 * (cpu1[1] - cpu0[1]) / wall}


def case_cluster(args: argparse.Namespace) -> dict[str, Any]:
    with cluster() as (tb, etcd, state):
        r: dict[str, Any] = {"load": load(tb, etcd, state, "load", "--nodes", str(args.nodes), "--cidrs",
                                          str(args.cidrs), "--prefixlen", "28")}
        t, r["converge"] = start_daemon(tb, etcd, args.cidrs)
        try:
            r["propagation"] = propagation(tb, etcd, t, state, SINGLE_RATE, args.changes / SINGLE_RATE, 0)
            r["churn"] = propagation(tb, etcd, t, state, args.churn_rate, args.churn_seconds, args.changes)
            r["after"] = memory_mb(t.proc.pid)
        finally:
            t.stop()
            r["daemon_log_tail"] = t.log()[-2000:]
    return r


def case_full(args: argparse.Namespace) -> dict[str, Any]:
    with cluster() as (tb, etcd, state):
        n0, n1 = tb.nodes
        r: dict[str, Any] = {"load": load(tb, etcd, state, "load", "--nodes", str(args.nodes), "--cidrs",
                                          str(args.full), "--prefixlen", "32", "--extra", f"{n1.pod_cidr}={n1.ip}")}
        peer = TunnelProcess(tb, n1, tb.node_config(n1))  # routes back by its file: the far end of the ping
        t = None
        try:
            peer.wait_ready()
            t, r["converge"] = start_daemon(tb, etcd, args.full + 1)
            a, b = n0.pods[0], n1.pods[0]
            wait_until(lambda: traffic.ping(tb, a, b.ip, count=1, timeout=0.5)["received"], 30, "the pods")
            before = t.counters()
            count = int((args.swaps + 5) / PING_INTERVAL)
            ping: dict[str, Any] = {}
            pinger = threading.Thread(target=lambda: ping.update(traffic.ping(
                tb, a, b.ip, count=count, interval=PING_INTERVAL, timeout=2)))
            pinger.start()
            time.sleep(2)  # the flow under way before the first swap
            r["swaps"] = propagation(tb, etcd, t, state, 1.0, args.swaps, 0)
            pinger.join()
            after = t.counters()
            r["traffic"] = {"sent": ping["sent"], "received": ping["received"], "lost": ping["sent"] - ping["received"],
                            "tx_drop_no_route": after["tx_drop_no_route"] - before["tx_drop_no_route"],
                            "tx_drop_no_neigh": after["tx_drop_no_neigh"] - before["tx_drop_no_neigh"]}
            r["after"] = memory_mb(t.proc.pid)
        finally:
            if t is not None:
                t.stop()
                r["daemon_log_tail"] = t.log()[-2000:]
            peer.stop()
    return r


def markdown(r: dict[str, Any]) -> str:
    c, f = r.get("cluster"), r.get("full_table")
    lines = ["| case | figure |", "|---|---|"]
    if c:
        cv, ld = c["converge"], c["load"]
        lines += [f"| {r['nodes']} nodes, {r['cidrs']} CIDRs: start to a converged table | "
                  f"{cv['converged_s']:.2f} s (ready {cv['ready_s']:.2f} s); RSS {cv['rss_mb']:.1f} MB "
                  f"(peak {cv['peak_rss_mb']:.1f}) |",
                  f"| etcd alone: a paged read of the {ld['keys']} keys | {ld['list_s'] * 1000:.0f} ms |"]
        for name, what in (("propagation", "one change at a time"), ("churn", "churn")):
            p = c[name]
            lat, rtt = p["latency"], p["put_rtt"]
            lines.append(f"| put to datapath, {what} ({p['rate']:.0f}/s, {p['puts']} puts) | p50 {lat['p50_ms']:.1f} "
                         f"ms, p99 {lat['p99_ms']:.1f} ms, max {lat['max_ms']:.1f} ms; the put's own round trip p50 "
                         f"{rtt['p50_ms']:.1f} / p99 {rtt['p99_ms']:.1f} ms; CPU: daemon {p['daemon_cpu_pct']:.0f}%, "
                         f"etcd {p['etcd_cpu_pct']:.0f}% of a core |")
        lines.append(f"| RSS after the churn | {c['after']['rss_mb']:.1f} MB (peak {c['after']['peak_rss_mb']:.1f}) |")
    if f:
        cv, s, tr = f["converge"], f["swaps"], f["traffic"]
        lines += [f"| {r['full']} routes: start to a converged table | {cv['converged_s']:.2f} s "
                  f"(ready {cv['ready_s']:.2f} s); RSS {cv['rss_mb']:.1f} MB (peak {cv['peak_rss_mb']:.1f}) |",
                  f"| {r['full']} routes: one change, the table rebuilt and swapped (put to datapath) | p50 "
                  f"{s['latency']['p50_ms']:.0f} ms, max {s['latency']['max_ms']:.0f} ms ({s['puts']} swaps) |",
                  f"| pings through an unchanged route meanwhile | {tr['sent']} sent, {tr['lost']} lost; "
                  f"no_route drops {tr['tx_drop_no_route']} |"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.etcd_scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--cidrs", type=int, default=5000)
    p.add_argument("--changes", type=int, default=200, help="single changes for the propagation case")
    p.add_argument("--churn-rate", type=float, default=100)
    p.add_argument("--churn-seconds", type=float, default=60)
    p.add_argument("--full", type=int, default=100_000, help="routes of the full-table case (0: skip it)")
    p.add_argument("--swaps", type=int, default=20)
    p.add_argument("--skip-cluster", action="store_true")
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces)")
    r: dict[str, Any] = {"nodes": args.nodes, "cidrs": args.cidrs, "full": args.full,
                         "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "loadavg": os.getloadavg()}
    if not args.skip_cluster:
        r["cluster"] = case_cluster(args)
    if args.full:
        r["full_table"] = case_full(args)
    path = results.save(args.out, "etcd-scale", r)
    print(markdown(r))
    print(f"\n{path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
