"""Soak: ipipfast on one two-node testbed under mixed traffic and faults for
a long time, watching the daemons for leaks, the traffic for corruption and
the counters for consistency.

    python -m bench.soak [--minutes 30] [--cycles N] [--restart-every 6] [--profile wire] [--out bench/results]

Each cycle: an echo stream (one every STREAM_INTERVAL) and TCP transfers of 2
MB each way back to back (bytes checked by SHA-256) run while the faults of
bench.soak_faults come one after another: route churn and a file edit and a
SIGHUP on both nodes, a link flap of one node's underlay and a MAC change of
the other's (the nodes take turns), and every --restart-every cycles a
SIGKILL and restart of one daemon (in turn). Then, with the faults over, a
32 MB TCP transfer each way, a 64-byte UDP flood (udpflood.c) and 200 UDP
echoes. At rest after each cycle, each daemon's counters must close: the
frames its rings saw = taken + ring_full, taken = decapsulated + dropped by
reason (bench.fuzz's check), and the packets it read from the TUN (the TUN's
own count) = sent + dropped by reason (for a restarted daemon, from its
first rest on: the TUN outlives it); its reloads are exactly those the soak
made. Then each daemon's resident memory, threads and open descriptors are
sampled. Memory is judged per daemon process after its own warm-up of
WARMUP_CYCLES, once the rings, buffers and allocator have reached their
working size; a restarted daemon is judged on its own life.

Verdict (exit 0 when all hold): every transfer matched and every echo after
the faults came back; every fault recovered (within soak_faults.TIMEOUT);
no daemon died but those killed; the counters closed at every rest; each
daemon's threads never changed and its file descriptors never grew (beyond
FD_SLACK, a status file caught being written); its resident memory grew by
at most RSS_BUDGET_KB after its warm-up; the last ones exit 0 on SIGTERM.
Figures per fault kind: events, recovery (median, max), echoes lost per
event, drops by reason. Results: bench/results/soak-<time>.json, and a
Markdown summary on stdout.
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ipipfast_lab import traffic
from ipipfast_lab.daemons import TunnelProcess, start_tunnels, tx_accounted, wait_until
from ipipfast_lab.testbed import Testbed

from . import e2e, results, stopping
from .fuzz import TRANSFER as ALONGSIDE_TRANSFER, Alongside, closes
from .restart import gap
from .soak_faults import Event, Faults, Life, drops_of

WARMUP_CYCLES = 3
RSS_BUDGET_KB = 1024  # growth allowed after the warm-up, per daemon
FD_SLACK = 2
TRANSFER = 32 << 20
FLOOD_SECONDS = 2
ECHOES = 200
STREAM_INTERVAL = 0.001
SLACK = 0.01  # an echo sent this long before a fault is still its to lose
KINDS = ("churn", "reload", "flap", "mac", "restart")


def sample(t: TunnelProcess, reads: int = 5) -> dict[str, int]:
    """Resident memory (kB), threads and open descriptors of a daemon: the
    fewest of a few reads 20 ms apart, as the control socket answers each
    request (ours, just before) in a thread of its own, with its connection."""
    def read() -> dict[str, int]:
        status = dict(line.split(":", 1) for line in Path(f"/proc/{t.proc.pid}/status").read_text().splitlines())
        return {"rss_kb": int(status["VmRSS"].split()[0]), "threads": int(status["Threads"]),
                "fds": len(os.listdir(f"/proc/{t.proc.pid}/fd"))}
    samples = []
    for _ in range(reads):
        samples.append(read())
        time.sleep(0.02)
    return {"rss_kb": samples[-1]["rss_kb"], **{k: min(x[k] for x in samples) for k in ("threads", "fds")}}


def tun_reads(tb: Testbed, i: int) -> int:
    """Packets read from node i's TUN (its tx_packets), by any daemon it has had."""
    return tb.ipr(tb.nodes[i]).get_links(ifname=f"{tb.prefix}t{i}")[0].get_attr("IFLA_STATS64")["tx_packets"]


def at_rest(tb: Testbed, life: Life, since: dict[str, int] | None = None) -> dict[str, Any]:
    """A daemon's counters once its rings' frames are accounted for and, if
    `since` (an earlier rest of this daemon), the packets read from the TUN
    since then too; whether they were, within 10 s. Only across traffic
    without GSO: a super-packet read once leaves as several frames, each
    counted as sent, and no counter says how many."""
    t = life.tunnel

    def point() -> dict[str, Any]:
        c = t.counters()
        return {"counters": c, "tun_read": tun_reads(tb, life.node), "gso": c["tx_gso"],
                "accounted": tx_accounted(c) - c.get("tx_drop_queue_full", 0)}  # queue_full: never read

    def tx_closes(p: dict[str, Any]) -> bool:
        return since is None or (p["tun_read"] - since["tun_read"] == p["accounted"] - since["accounted"]
                                 and p["gso"] == since["gso"])
    try:
        wait_until(lambda: closes((p := point())["counters"]) and tx_closes(p), 10, f"node {life.node} at rest")
        ok = True
    except TimeoutError:
        ok = False
    p = point()
    p.update(rx_closed=closes(p["counters"]), tx_closed=tx_closes(p), closed=ok)
    if since is not None:
        p["tx_read"] = p["tun_read"] - since["tun_read"]
    return p


def attribute(events: list[Event], ping: dict[str, Any]) -> dict[str, Any]:
    """Puts each lost echo on the fault it followed, and the stream's
    recovery figures on the flaps (link up -> first reply) and restarts
    (bench.restart's gap)."""
    replies = ping["replied_at"]
    starts = [e.start for e in events]
    unattributed = 0
    for e in events:
        e.detail["echoes_lost"] = 0
    for lost in ping["lost_at"]:
        k = max((j for j, s in enumerate(starts) if s <= lost + SLACK), default=None)
        if k is None:
            unattributed += 1
        else:
            events[k].detail["echoes_lost"] += 1
    for e in events:
        if e.recovery_s is None or e.kind not in ("flap", "restart"):
            continue
        if e.kind == "restart":
            g = gap(replies, e.at)
            e.detail.update(g)
            e.recovery_s = g["exec_to_first_reply_ms"] / 1e3
        else:
            e.recovery_s = next(t for t in replies if t >= e.at) - e.at
    return {"sent": ping["sent"], "received": ping["received"], "corrupt": ping["corrupt"],
            "lost_before_any_fault": unattributed}


def cycle(tb: Testbed, faults: Faults, n: int, binary: Path, restart_every: int) -> dict[str, Any]:
    a, b = tb.nodes[0].pods[0], tb.nodes[1].pods[0]
    out: dict[str, Any] = {"cycle": n, "t": time.time()}
    stream = traffic.ping_stream(tb, a, b.ip, STREAM_INTERVAL)
    alongside = [Alongside(tb, a, b), Alongside(tb, b, a)]
    for x in alongside:
        x.start()
    events: list[Event] = []
    try:
        for i in range(len(tb.nodes)):
            events += faults.churn(i)
        for i in range(len(tb.nodes)):
            events += faults.reload(i)
        events.append(faults.flap(n % 2))
        events.append(faults.mac_change((n + 1) % 2))
        if restart_every and n % restart_every == restart_every - 1:
            events.append(faults.restart(n // restart_every % 2, n))
    finally:
        for x in alongside:
            x.stop.set()
        for x in alongside:
            x.join()
        stream.terminate()
        ping = traffic.collect(stream, timeout=30)
    out["stream"] = attribute(events, ping)
    out["events"] = [asdict(e) for e in events]
    out["alongside"] = [{"transfers": len(x.transfers), "matched": sum(t["match"] for t in x.transfers),
                         "error": repr(x.error) if x.error else None} for x in alongside]
    out["tcp_ab"] = traffic.tcp_transfer(tb, a, b, TRANSFER, seed=n)["match"]
    out["tcp_ba"] = traffic.tcp_transfer(tb, b, a, TRANSFER, seed=n + 1)["match"]
    lives = [faults.life(i) for i in range(len(tb.nodes))]
    alive = [lf.tunnel.proc.poll() is None for lf in lives]
    before = [at_rest(tb, lf) if ok else None for lf, ok in zip(lives, alive)]
    out["flood_kpps"] = e2e.flood(tb, a, b, FLOOD_SECONDS, binary)["kpps"]
    out["echoes"] = traffic.udp_roundtrip(tb, a, b, count=ECHOES, size=512)["received"]
    out["daemons"] = []
    for lf, ok, since in zip(lives, alive, before):
        ok = ok and lf.tunnel.proc.poll() is None
        rest = at_rest(tb, lf, since) if ok and since else {}
        if rest:
            rest["reloads"] = lf.tunnel.status()["reloads"]
            rest["reloads_ok"] = rest["reloads"] == lf.reloads
        s = {**(sample(lf.tunnel) if ok else {}), "alive": ok, "pid": lf.tunnel.proc.pid, **rest}
        lf.samples.append(s)
        out["daemons"].append({"node": lf.node, **{k: v for k, v in s.items() if k != "counters"}})
    return out


def judge(life: Life) -> dict[str, Any]:
    ds = [d for d in life.samples if d["alive"]]
    w = min(WARMUP_CYCLES, len(ds) - 1)
    warm = ds[w:]
    return {
        "node": life.node, "pid": life.tunnel.proc.pid, "restarted": life.restarted,
        "cycles": [life.started_cycle, life.started_cycle + len(ds) - 1], "samples": len(ds),
        "rss_kb_first": ds[0]["rss_kb"], "rss_kb_warm": warm[0]["rss_kb"], "rss_kb_last": ds[-1]["rss_kb"],
        "rss_kb_max": max(d["rss_kb"] for d in ds), "rss_growth_kb": ds[-1]["rss_kb"] - warm[0]["rss_kb"],
        "threads": sorted({d["threads"] for d in ds}), "fds": sorted({d["fds"] for d in ds}),
        "fd_growth": max(d["fds"] for d in warm) - warm[0]["fds"],
        "closed": all(d["closed"] for d in ds), "reloads_ok": all(d["reloads_ok"] for d in ds),
        "reloads": ds[-1]["reloads"], "drops": drops_of(ds[-1]["counters"]),
        "tx_packets": ds[-1]["counters"]["tx_packets"], "rx_packets": ds[-1]["counters"]["rx_packets"],
        "ring_seen": ds[-1]["counters"]["ring_seen"], "tun_read_checked": sum(d["tx_read"] for d in ds),
    }


def fault_summary(cycles: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in KINDS:
        es = [e for c in cycles for e in c["events"] if e["kind"] == kind]
        rec = [e["recovery_s"] for e in es if e["recovery_s"] is not None]
        lost = [e["detail"]["echoes_lost"] for e in es]
        drops: dict[str, int] = {}
        for e in es:
            for k, n in e["drops"].items():
                drops[k] = drops.get(k, 0) + n
        out[kind] = {"events": len(es), "recovered": len(rec),
                     "recovery_ms": {"median": statistics.median(rec) * 1e3, "max": max(rec) * 1e3} if rec else None,
                     "echoes_lost": {"median": statistics.median(lost), "max": max(lost), "total": sum(lost)}
                     if lost else None, "drops": drops}
        if kind == "churn":
            out[kind]["route_writes"] = sum(e["detail"]["writes"] for e in es)
        if kind == "restart" and es:
            out[kind]["outage_ms"] = [round(e["detail"].get("outage_ms", float("nan")), 1) for e in es]
            out[kind]["ready_ms"] = [round(e["detail"]["ready_s"] * 1e3, 1) for e in es]
    return out


def verdict(cycles: list[dict[str, Any]], lives: list[Life], died: list[int]) -> dict[str, Any]:
    """died: the pids of the daemons that had exited before the soak stopped them."""
    judged = [judge(lf) for lf in lives if any(d["alive"] for d in lf.samples)]
    faults = fault_summary(cycles)
    killed = {e["detail"]["killed_pid"] for c in cycles for e in c["events"] if e["kind"] == "restart"}
    checks = {
        "every transfer matched": all(c["tcp_ab"] and c["tcp_ba"] and all(
            x["error"] is None and x["transfers"] and x["matched"] == x["transfers"] for x in c["alongside"])
            for c in cycles),
        "every echo after the faults came back": all(c["echoes"] == ECHOES for c in cycles),
        "no echo lost or corrupted outside a fault": all(
            c["stream"]["lost_before_any_fault"] == 0 and c["stream"]["corrupt"] == 0 for c in cycles),
        "every fault recovered": all(f["events"] == f["recovered"] for f in faults.values()),
        "no daemon died but those killed": set(died) <= killed and all(d["alive"] for c in cycles
                                                                        for d in c["daemons"]),
        "counters closed at every rest (rings; TUN reads over the flood and echoes; reloads)": all(
            d["closed"] and d["reloads_ok"] for d in judged),
        "threads constant": all(len(d["threads"]) == 1 for d in judged),
        "file descriptors not growing": all(d["fd_growth"] <= FD_SLACK for d in judged),
        f"RSS growth after warm-up <= {RSS_BUDGET_KB} kB": all(d["rss_growth_kb"] <= RSS_BUDGET_KB for d in judged),
    }
    return {"checks": checks, "daemons": judged, "faults": faults,
            "flood_kpps_median": statistics.median(c["flood_kpps"] for c in cycles)}


def _ms(r: dict[str, float] | None) -> str:
    return f"{r['median']:.0f} [{r['max']:.0f}]" if r else "–"


def markdown(result: dict[str, Any]) -> str:
    m, v = result["meta"], result["verdict"]
    lines = [f"`{m['command']}` — {m['started']}, Linux {m['kernel']}, {m['cpus']} CPUs, load {m['loadavg']}; "
             f"{m['cycles']} cycles in {m['minutes']:.1f} min, {m['gb_moved']:.1f} GB through the tunnel, "
             f"64 B flood median {v['flood_kpps_median']:.0f} kpps.", "",
             "| daemon | cycles | RSS start → after warm-up → end (max) MB | growth after warm-up | threads | fds "
             "| reloads | drops |", "|---|---|---|---|---|---|---|---|"]
    for d in v["daemons"]:
        mb = [f"{d[k] / 1024:.1f}" for k in ("rss_kb_first", "rss_kb_warm", "rss_kb_last", "rss_kb_max")]
        drops = ", ".join(f"{k} {n}" for k, n in d["drops"].items()) or "none"
        who = f"n{d['node']}{' (restarted)' if d['restarted'] else ''}"
        reloads = "/".join(str(d["reloads"][k]) for k in ("applied", "unchanged", "refused"))
        lines.append(f"| {who} | {d['cycles'][0]}–{d['cycles'][1]} | {mb[0]} → {mb[1]} → {mb[2]} ({mb[3]}) "
                     f"| {d['rss_growth_kb']} kB | {d['threads']} | {d['fds']} | {reloads} | {drops} |")
    lines += ["", "| fault | events | recovery ms, median [max] | echoes lost per event, median [max] | "
              "drops meanwhile, by reason |", "|---|---|---|---|---|"]
    what = {"churn": "route churn (batch → table converged)", "reload": "reload (edit or SIGHUP → counted)",
            "flap": "link flap (up → first reply)", "mac": "MAC change (→ peer's next hop)",
            "restart": "SIGKILL + restart (exec → first reply)"}
    for kind, f in v["faults"].items():
        lost = f"{f['echoes_lost']['median']:g} [{f['echoes_lost']['max']}]" if f["echoes_lost"] else "–"
        drops = ", ".join(f"{k} {n}" for k, n in sorted(f["drops"].items())) or "none"
        lines.append(f"| {what[kind]} | {f['events']} | {_ms(f['recovery_ms'])} | {lost} | {drops} |")
    churn = v["faults"]["churn"]
    lines += ["", f"Route churn: {churn['route_writes']} kernel route writes. Reloads per daemon as "
              "applied/unchanged/refused."]
    lines += [""] + [f"- {'ok' if ok else 'FAILED'}: {name}" for name, ok in v["checks"].items()]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace, command: str) -> int:
    stopping.install()
    binary = e2e.flood_binary()
    started, t0 = time.strftime("%Y-%m-%dT%H:%M:%S%z"), time.monotonic()
    loadavg = " ".join(f"{x:.2f}" for x in os.getloadavg())
    cycles: list[dict[str, Any]] = []
    lives: list[Life] = []
    with Testbed(profile=args.profile) as tb:
        lives += [Life(i, t, 0, False) for i, t in enumerate(start_tunnels(tb))]
        faults = Faults(tb, lives)
        try:
            while not cycles or (time.monotonic() - t0 < args.minutes * 60
                                 and (args.cycles is None or len(cycles) < args.cycles)):
                stopping.check()
                cycles.append(cycle(tb, faults, len(cycles), binary, args.restart_every))
                c = cycles[-1]
                recovered = sum(e["recovery_s"] is not None for e in c["events"])
                print(f"cycle {c['cycle']}: {recovered}/{len(c['events'])} faults recovered, echoes lost "
                      f"{c['stream']['sent'] - c['stream']['received']}/{c['stream']['sent']}, tcp "
                      f"{c['tcp_ab']}/{c['tcp_ba']}, flood {c['flood_kpps']:.0f} kpps, echoes {c['echoes']}, "
                      f"rss {[d.get('rss_kb') for d in c['daemons']]} kB, closed "
                      f"{[d.get('closed') for d in c['daemons']]}", flush=True)
                if not all(d["alive"] for d in c["daemons"]):
                    break
        finally:
            died = [lf.tunnel.proc.pid for lf in lives if lf.tunnel.proc.poll() is not None]
            codes = [faults.life(i).tunnel.stop() for i in range(len(tb.nodes))]
            for lf in lives:
                lf.tunnel.stop()
    transfers = sum(x["transfers"] for c in cycles for x in c["alongside"])
    result: dict[str, Any] = {
        "meta": {"command": command, "started": started, "kernel": os.uname().release, "cpus": os.cpu_count(),
                 "loadavg": loadavg, "profile": args.profile, "cycles": len(cycles),
                 "minutes": (time.monotonic() - t0) / 60,
                 "gb_moved": (len(cycles) * 2 * TRANSFER + transfers * ALONGSIDE_TRANSFER) / 1e9,
                 "exit_codes": codes},
        "verdict": verdict(cycles, lives, died),
        "cycles": cycles,
    }
    result["verdict"]["checks"]["daemons exit 0 on SIGTERM"] = codes == [0] * len(codes)
    path = results.save(args.out, "soak", result)
    sys.stdout.write(markdown(result))
    print(f"wrote {path}")
    return 0 if all(result["verdict"]["checks"].values()) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30, help="how long to run (default 30)")
    parser.add_argument("--cycles", type=int, help="stop after this many cycles (default: as many as fit)")
    parser.add_argument("--restart-every", type=int, default=6,
                        help="a SIGKILL and restart every this many cycles, the nodes in turn (default 6; 0: none)")
    parser.add_argument("--profile", choices=("wire", "veth"), default="wire", help="underlay profile")
    parser.add_argument("--out", type=Path, default=e2e.HERE / "results", help="results directory")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("needs root: it builds network namespaces, a TUN and raw sockets")
    return run(args, shlex.join(["python", "-m", "bench.soak", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
