"""End-to-end benchmark: every tunnel mode side by side, pod to pod, on the shared testbed.

    python -m bench.e2e [--profiles wire,veth] [--modes plain,...] [--rounds 3] [--duration 5] [--quick]
                        [--load-kpps 25]

Rounds are interleaved: in each round, for each profile, every mode (in an order
rotated per round) gets a fresh 2-node testbed at its own pod MTU, is set up,
checked and measured, then torn down:
  verify  50 UDP echoes pod to pod while node 1's underlay is captured: the a->b
          frames must carry the mode's encapsulation, and (tunnels) none plain
  rtt     UDP ping-pong pod to pod (traffic.py udp-send), p50, p99 and p99.9
  rtt1    the same with the whole path on one CPU: the path's own work, without
          the wake-ups of idle CPUs (see one_cpu)
  loaded  the ping-pong again while a paced 64-byte flood (--load-kpps) runs the
          same way: the tail that small packets see under load
  tcp1/4  iperf3 -J, 1 and 4 streams, the receiver's rate
  cpu     CPU seconds per GB moved during tcp1 (see CPU_METHOD)
  udp64   64-byte UDP payloads from udpflood.c (sendmmsg), the rate the sink saw
Every remote pod CIDR also has the testbed's blackhole at metric 4000, so a
broken tunnel drops traffic instead of falling back to plain routing.
Each cell is the median over rounds with its [min–max]; a second table gives
each figure's spread over rounds (max/min).
Results: bench/results/e2e-<time>.json, .md (the README table) and .png.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import resource
import select
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from ipipfast_lab import traffic
from ipipfast_lab.testbed import Node, Pod, Testbed
from ipipfast_lab.daemons import start_tunnels

from . import stopping
from .baselines import Running, build, kernel_ipip, missing, naive, vxlan, wireguard

HERE = Path(__file__).resolve().parent
HARNESS_REQUIRES = {"iperf3": "iperf3", "gcc": "gcc"}
IPERF_PORT, ECHO_PORT, FLOOD_PORT = 5201, 7002, 7009
SMALL = 64  # UDP payload bytes of the small-packet and latency figures
# The flood under the loaded RTT: a rate that every mode but the per-packet
# Python ones carries with a core to spare, so the figure is the tail that a
# pod's small packets see on a busy path, not the queue of an overloaded one.
LOAD_KPPS = 25.0
VERIFY_ECHOES = 50
_TICK = os.sysconf("SC_CLK_TCK")

CPU_METHOD = (
    "CPU seconds per GB received during the 1-stream iperf3 run: utime+stime of the iperf3 client and "
    "server (getrusage RUSAGE_CHILDREN; both are reaped inside the window), of the mode's own processes "
    "(tunnel daemons) and of the ksoftirqd threads (/proc/<pid>/stat). On kernels with tick-based CPU "
    "accounting (no CONFIG_IRQ_TIME_ACCOUNTING, like this one) softirq work is charged to the task it "
    "interrupted, so it is already in those figures and /proc/stat's softirq is not added (it would count "
    "twice); with IRQ time accounting, /proc/stat irq+softirq is added instead of ksoftirqd. "
    "machine_cpu_s_per_gb: all non-idle CPU time of the machine in the same window (includes unrelated load).")


@dataclass(frozen=True)
class Figure:
    key: str
    title: str
    higher_is_better: bool


FIGURES = (
    Figure("tcp1_gbit_s", "TCP 1 stream Gbit/s", True),
    Figure("tcp4_gbit_s", "TCP 4 streams Gbit/s", True),
    Figure("udp64_kpps", "64 B UDP kpps", True),
    Figure("rtt_p50_us", "RTT p50 µs", False),
    Figure("rtt_p99_us", "RTT p99 µs", False),
    Figure("rtt_p999_us", "RTT p99.9 µs", False),
    Figure("rtt1_p50_us", "RTT p50 on 1 CPU µs", False),
    Figure("loaded_p50_us", "loaded RTT p50 µs", False),
    Figure("loaded_p99_us", "loaded RTT p99 µs", False),
    Figure("loaded_p999_us", "loaded RTT p99.9 µs", False),
    Figure("cpu_s_per_gb", "CPU s/GB", False),
)
PROFILE_TEXT = {"wire": "real-wire profile: TSO/GSO/GRO off on the underlay, every underlay frame ≤ MTU",
                "veth": "veth profile: default veth offloads, 64 KB frames on the underlay"}


@dataclass(frozen=True)
class Mode:
    pod_mtu: int
    wire: str  # what its a->b frames look like on the underlay: see _classify()
    start: Callable[[Testbed], Running]
    requires: Callable[[], dict[str, str]] = dict  # {command or path: Debian package}


def _plain(tb: Testbed) -> Running:
    tb.add_plain_routes()
    return Running()


def _ipipfast(tb: Testbed, workers: int = 1) -> Running:
    tunnels = start_tunnels(tb, workers=workers)

    def stop() -> None:
        for t in tunnels:
            t.stop()
    return Running([t.proc.pid for t in tunnels], stop)


MODES = {
    "plain": Mode(1500, "plain", _plain),
    "plain-1480": Mode(1480, "plain", _plain),
    "vxlan": Mode(vxlan.POD_MTU, "vxlan", vxlan.start),
    "kernel-ipip": Mode(kernel_ipip.POD_MTU, "ipip", kernel_ipip.start, kernel_ipip.requires),
    "wireguard-go": Mode(wireguard.POD_MTU, "wireguard", wireguard.start, lambda: wireguard.REQUIRES),
    "naive": Mode(naive.POD_MTU, "ipip", naive.start),
    "ipipfast": Mode(1480, "ipip", _ipipfast),
    "ipipfast-2w": Mode(1480, "ipip", lambda tb: _ipipfast(tb, workers=2)),  # multi-queue scaling
}
PROFILES = ("wire", "veth")


def _names(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        if not names or any(n not in choices for n in names):
            raise argparse.ArgumentTypeError(f"a comma-separated list of {', '.join(choices)}")
        return list(dict.fromkeys(names))
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profiles", type=_names(PROFILES), default=list(PROFILES),
                   help="underlay profiles: wire (offloads off, the one that counts), veth (default: both)")
    p.add_argument("--modes", type=_names(tuple(MODES)), default=list(MODES), help=f"default: {','.join(MODES)}")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over all modes (default 3)")
    p.add_argument("--duration", type=int, default=5, help="seconds per throughput figure (default 5)")
    p.add_argument("--quick", action="store_true", help="1 round of 2 s: a smoke test")
    p.add_argument("--load-kpps", type=float, default=LOAD_KPPS,
                   help=f"the 64-byte flood under the loaded RTT, kpps (default {LOAD_KPPS:g}; 0: flat out)")
    p.add_argument("--out", type=Path, default=HERE / "results", help="results directory (default bench/results)")
    p.add_argument("--no-install", action="store_true",
                   help="do not apt-get install missing tools: their modes are reported as skipped")


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- provisioning ----------------------------------------------------------------

def _apt_install(packages: list[str]) -> str:
    """Installs Debian packages; returns why not, or ''."""
    if os.geteuid() != 0 or not os.path.exists("/usr/bin/apt-get"):
        return "not root, or no apt-get"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]
    for cmd in (["apt-get", "update", "-qq"], install):
        _say(f"provisioning: {' '.join(cmd)}")
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        except subprocess.TimeoutExpired:
            return f"{cmd[1]} timed out"
        if r.returncode:
            return (r.stderr.strip().splitlines() or [f"{cmd[1]} exited {r.returncode}"])[-1]
    return ""


def _provision(modes: list[str], install: bool) -> dict[str, str]:
    """{mode: why it cannot run} after installing what is missing (if allowed)."""
    def lacking() -> dict[str, list[str]]:
        return {m: p for m in modes if (p := missing(HARNESS_REQUIRES | MODES[m].requires()))}
    need = lacking()
    packages = sorted({p for ps in need.values() for p in ps})
    why = "--no-install"
    if packages and install:
        why = _apt_install(packages) or "installed, still missing"
        need = lacking()
    return {m: f"needs Debian package(s) {', '.join(p)}: {why}" for m, p in need.items()}


# -- measurements ------------------------------------------------------------------

@cache
def _irq_time_accounting() -> bool:
    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            return "CONFIG_IRQ_TIME_ACCOUNTING=y" in f.read()
    except OSError:
        return False


def _ksoftirqd() -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and (p / "comm").read_text().startswith("ksoftirqd/"):
                pids.append(int(p.name))
        except OSError:
            pass
    return pids


def process_cpu(pids: list[int]) -> float:
    """Cumulative CPU seconds (user and system) of these processes, all their threads."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime
        except OSError:
            pass  # exited
    return total


def _cpu(pids: list[int]) -> tuple[float, float]:
    """Cumulative (CPU seconds of the processes involved, non-idle CPU seconds of the machine)."""
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = kids.ru_utime + kids.ru_stime + process_cpu(pids)
    user, nice, system, _idle, _iowait, irq, softirq = map(int, Path("/proc/stat").read_text().split()[1:8])
    if _irq_time_accounting():
        total += (irq + softirq) / _TICK
    return total, (user + nice + system + irq + softirq) / _TICK


def _await_line(proc: subprocess.Popen, token: bytes, timeout: float = 10) -> None:
    """Wait until a server we started prints `token`, so the client never races it."""
    assert proc.stdout is not None
    out, deadline = b"", time.monotonic() + timeout
    while token not in out and select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
        if not (byte := os.read(proc.stdout.fileno(), 1)):
            break
        out += byte
    if token not in out:
        proc.kill()
        _, err = proc.communicate()
        raise RuntimeError(f"{proc.args!r} did not start: {err.decode(errors='replace').strip() or out!r}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def _frames(pcap: Path) -> Iterator[bytes]:
    data = pcap.read_bytes()
    off = 24  # pcap global header
    while off + 16 <= len(data):
        n = int.from_bytes(data[off + 8:off + 12], "little")
        yield data[off + 16:off + 16 + n]
        off += 16 + n


def _classify(frame: bytes, a: Pod, b: Pod, na: Node, nb: Node) -> str | None:
    """How a datagram from pod a to pod b crossed the underlay; None for other frames."""
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        return None
    ip = frame[14:]
    src, dst, l4 = ip[12:16], ip[16:20], ip[(ip[0] & 0xF) * 4:]
    pod_b = bytes(map(int, b.ip.split(".")))
    if (src, dst) == (bytes(map(int, a.ip.split("."))), pod_b):
        return "plain"
    if (src, dst) != (bytes(map(int, na.ip.split("."))), bytes(map(int, nb.ip.split(".")))):
        return None
    if ip[9] == 4 and l4[16:20] == pod_b:
        return "ipip"
    if ip[9] == 17 and len(l4) >= 8:
        port = int.from_bytes(l4[2:4], "big")
        if port == vxlan.PORT and l4[46:50] == pod_b:  # UDP 8 + VXLAN 8 + Ethernet 14, then IPv4
            return "vxlan"
        if port == wireguard.PORT:  # encrypted: the port is all there is to see
            return "wireguard"
    return None


def verify(tb: Testbed, expected: str) -> dict[str, Any]:
    (na, nb), a, b = tb.nodes, tb.nodes[0].pods[0], tb.nodes[1].pods[0]
    with tempfile.TemporaryDirectory(prefix=f"{tb.prefix}-cap-") as d:
        pcap = Path(d) / "underlay.pcap"
        # On the receiving node: a sender may bypass the taps (PACKET_QDISC_BYPASS), a receiver cannot.
        cap = traffic.serve(tb, nb, "capture", "--iface", nb.interface, "--out", pcap, "--seconds", 120)
        try:
            echo = traffic.udp_roundtrip(tb, a, b, count=VERIFY_ECHOES, size=SMALL, port=ECHO_PORT, timeout=0.5)
        finally:
            cap.terminate()
            traffic.collect(cap)
        seen = Counter(c for f in _frames(pcap) if (c := _classify(f, a, b, na, nb)))
    ok = (echo["received"] == VERIFY_ECHOES and seen[expected] >= VERIFY_ECHOES
          and (expected == "plain" or not seen["plain"]))
    return {"verified": ok, "echoes": echo["received"], "underlay_frames": dict(seen)}


def rtt(tb: Testbed, a: Pod, b: Pod, count: int) -> dict[str, Any]:
    r = traffic.udp_roundtrip(tb, a, b, count=count, size=SMALL, port=ECHO_PORT)
    if not r["rtt_us"]:
        raise RuntimeError("no echo came back")
    return {"rtt_p50_us": r["rtt_us"]["p50"], "rtt_p99_us": r["rtt_us"]["p99"],
            "rtt_p999_us": r["rtt_us"]["p999"], "lost": count - r["received"]}


def loaded_rtt(tb: Testbed, a: Pod, b: Pod, count: int, binary: Path, kpps: float) -> dict[str, Any]:
    """The ping-pong while a 64-byte flood at kpps (0: flat out) runs from a
    to b; with the rate the sink saw, so a mode that could not carry it shows."""
    sink = tb.popen(b, [str(binary), "sink", str(FLOOD_PORT), "600", "0.5"],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    sender = None
    try:
        _await_line(sink, b"listening")
        sender = tb.popen(a, [str(binary), "send", b.ip, str(FLOOD_PORT), str(SMALL), "600", str(kpps * 1e3)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        r = rtt(tb, a, b, count)
        sender.terminate()
        sender.communicate(timeout=10)
        out, _ = sink.communicate(timeout=15)  # it ends 0.5 s after the last datagram
    finally:
        if sender is not None:
            _stop(sender)
        _stop(sink)
    got = json.loads(out.splitlines()[-1])
    return {"loaded_p50_us": r["rtt_p50_us"], "loaded_p99_us": r["rtt_p99_us"], "loaded_p999_us": r["rtt_p999_us"],
            "lost": r["lost"], "load_kpps": got["pps"] / 1e3}


@contextmanager
def one_cpu(pids: list[int]) -> Iterator[None]:
    """Runs the block with everything on the pod-to-pod path on one CPU: this
    thread, so the tools it starts in the pods inherit it, and every thread of
    the mode's own processes (in-kernel paths run in their callers). Waking a
    thread on an idle vCPU costs 25-35 µs in this VM, and with two pods and
    four tunnel loops a round trip has six such wake-ups, whose cost depends
    on the host: plain routing's p50 was 77 µs free and 17 pinned. Pinned, the
    wakee runs when its waker sleeps, on the same CPU, so the figure is the
    path's own work."""
    cpu = min(os.sched_getaffinity(0))
    tids = [0] + [int(t.name) for pid in pids for t in Path(f"/proc/{pid}/task").iterdir()]
    saved = {tid: os.sched_getaffinity(tid) for tid in tids}
    try:
        for tid in tids:
            os.sched_setaffinity(tid, {cpu})
        yield
    finally:
        for tid, cpus in saved.items():
            try:
                os.sched_setaffinity(tid, cpus)
            except ProcessLookupError:
                pass  # a thread that ended meanwhile


def rtt_one_cpu(tb: Testbed, a: Pod, b: Pod, count: int, pids: list[int]) -> dict[str, Any]:
    with one_cpu(pids):
        return rtt(tb, a, b, count)


def iperf(tb: Testbed, a: Pod, b: Pod, streams: int, seconds: int, pids: list[int]) -> dict[str, Any]:
    server = tb.popen(b, ["iperf3", "-s", "-1", "-p", str(IPERF_PORT), "--forceflush"],
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _await_line(server, b"listening")
        before = _cpu(pids)
        client = tb.run(a, ["iperf3", "-c", b.ip, "-p", str(IPERF_PORT), "-t", str(seconds), "-P", str(streams),
                            "-J", "--connect-timeout", "3000"], timeout=seconds + 30, check=False)
        server.communicate(timeout=10)  # reaped, so its CPU time is in RUSAGE_CHILDREN now
        after = _cpu(pids)
    finally:
        _stop(server)
    try:
        result = json.loads(client.stdout)
    except json.JSONDecodeError:
        result = {"error": client.stderr.strip() or f"exit {client.returncode}"}
    if "error" in result:
        raise RuntimeError(f"iperf3: {result['error']}")
    received, gb = result["end"]["sum_received"], result["end"]["sum_received"]["bytes"] / 1e9
    return {"gbit_s": received["bits_per_second"] / 1e9, "retransmits": result["end"]["sum_sent"].get("retransmits"),
            "cpu_s_per_gb": (after[0] - before[0]) / gb, "machine_cpu_s_per_gb": (after[1] - before[1]) / gb}


def flood_binary() -> Path:
    """The 64-byte generator and sink (udpflood.c), compiled once per source text."""
    return build(["gcc", "-O2", "-Wall"], HERE / "udpflood.c", [])


def flood(tb: Testbed, a: Pod, b: Pod, seconds: int, binary: Path) -> dict[str, Any]:
    sink = tb.popen(b, [str(binary), "sink", str(FLOOD_PORT), str(seconds + 10), "0.5"],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _await_line(sink, b"listening")
        sent = json.loads(tb.run(a, [str(binary), "send", b.ip, str(FLOOD_PORT), str(SMALL), str(seconds)],
                                 timeout=seconds + 30).stdout)
        out, _ = sink.communicate(timeout=15)
    finally:
        _stop(sink)
    got = json.loads(out.splitlines()[-1])
    return {"kpps": got["pps"] / 1e3, "sent_kpps": sent["pps"] / 1e3, "received": got["received"], "sent": sent["sent"]}


def measure(mode: str, profile: str, args: argparse.Namespace, binary: Path, tag: str) -> dict[str, Any]:
    """One mode on a fresh testbed: every figure, each failure recorded, never raised."""
    spec = MODES[mode]
    rec: dict[str, Any] = {"mode": mode, "profile": profile, "pod_mtu": spec.pod_mtu, "verified": False,
                           "figures": {}, "details": {}, "errors": {},
                           "loadavg_1m": os.getloadavg()[0]}  # other load on the machine skews everything
    t0 = time.monotonic()

    def step(name: str, fn: Callable[[], dict[str, Any]], figures: dict[str, str], show: str) -> None:
        stopping.check()
        try:
            got = fn()
        except Exception as e:  # a failed figure is recorded; the others still run
            rec["errors"][name] = f"{type(e).__name__}: {e}"[:400]
            _say(f"{tag} {name}: FAILED {rec['errors'][name]}")
            return
        rec["details"][name] = got
        rec["figures"].update({fig: got[key] for fig, key in figures.items()})
        _say(f"{tag} {name}: {show.format(**got)}")

    try:
        with Testbed(profile=profile, pod_mtu=spec.pod_mtu) as tb:
            running = spec.start(tb)
            try:
                a, b = tb.nodes[0].pods[0], tb.nodes[1].pods[0]
                pids = running.pids + ([] if _irq_time_accounting() else _ksoftirqd())
                step("verify", lambda: verify(tb, spec.wire), {}, "verified={verified} {underlay_frames}")
                rec["verified"] = rec["details"].get("verify", {}).get("verified", False)
                if rec["details"].get("verify", {}).get("echoes"):
                    step("rtt", lambda: rtt(tb, a, b, args.pings),
                         {k: k for k in ("rtt_p50_us", "rtt_p99_us", "rtt_p999_us")},
                         "p50 {rtt_p50_us:.0f} µs, p99 {rtt_p99_us:.0f} µs, p99.9 {rtt_p999_us:.0f} µs")
                    step("rtt1", lambda: rtt_one_cpu(tb, a, b, args.pings, running.pids),
                         {"rtt1_p50_us": "rtt_p50_us"}, "on 1 CPU: p50 {rtt_p50_us:.0f} µs")
                    step("loaded", lambda: loaded_rtt(tb, a, b, args.pings, binary, args.load_kpps),
                         {k: k for k in ("loaded_p50_us", "loaded_p99_us", "loaded_p999_us")},
                         "under {load_kpps:.0f} kpps: p50 {loaded_p50_us:.0f} µs, p99 {loaded_p99_us:.0f} µs, "
                         "p99.9 {loaded_p999_us:.0f} µs")
                    step("tcp1", lambda: iperf(tb, a, b, 1, args.duration, pids),
                         {"tcp1_gbit_s": "gbit_s", "cpu_s_per_gb": "cpu_s_per_gb"},
                         "{gbit_s:.2f} Gbit/s, {cpu_s_per_gb:.2f} CPU s/GB")
                    step("tcp4", lambda: iperf(tb, a, b, 4, args.duration, pids), {"tcp4_gbit_s": "gbit_s"},
                         "{gbit_s:.2f} Gbit/s")
                    step("udp64", lambda: flood(tb, a, b, args.duration, binary), {"udp64_kpps": "kpps"},
                         "{kpps:.0f} kpps received (sent {sent_kpps:.0f})")
                else:  # dead: the other figures would only time out
                    rec["errors"]["figures"] = "not measured: no echo crossed the tunnel"
            finally:
                running.stop()
    except Exception as e:  # setup failed: the mode is reported as failed for this round
        rec["errors"]["setup"] = f"{type(e).__name__}: {e}"[:400]
        _say(f"{tag} setup: FAILED {rec['errors']['setup']}")
    rec["seconds"] = round(time.monotonic() - t0, 1)
    return rec


# -- reporting -------------------------------------------------------------------

def summarize(runs: list[dict[str, Any]], profiles: list[str], modes: list[str]) -> dict[str, Any]:
    """Per profile and mode: median/min/max per figure, and ratios to plain routing."""
    summary: dict[str, Any] = {}
    for profile in profiles:
        rows: dict[str, dict[str, Any]] = {}
        for mode in modes:
            rs = [r for r in runs if (r["profile"], r["mode"]) == (profile, mode)]
            figures = {}
            for f in FIGURES:
                if vals := [r["figures"][f.key] for r in rs if f.key in r["figures"]]:
                    figures[f.key] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals),
                                      "spread": max(vals) / min(vals) if min(vals) > 0 else None,
                                      "n": len(vals)}
            floods = [r["details"]["udp64"] for r in rs if "udp64" in r["details"]]
            rows[mode] = {"figures": figures, "verified": bool(rs) and all(r["verified"] for r in rs),
                          "errors": sorted({f"{k}: {v}" for r in rs for k, v in r["errors"].items()}),
                          # the sink got (nearly) all that was sent: the path ran in the sender's syscalls
                          "udp64_sender_bound": bool(floods) and all(f["received"] >= 0.9 * f["sent"] for f in floods)}
        for ref in ("plain", "plain-1480"):
            base = rows.get(ref, {}).get("figures", {})
            for row in rows.values():
                for key, fig in row["figures"].items():
                    if base.get(key, {}).get("median"):
                        fig[f"vs_{ref}"] = round(fig["median"] / base[key]["median"], 3)
        summary[profile] = rows
    return summary


def _num(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def _load(kpps: float) -> str:
    return f"at {kpps:g} kpps" if kpps else "flat out"


def _label(mode: str) -> str:
    return f"kernel-ipip ({kernel_ipip.impl()})" if mode == "kernel-ipip" else mode


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    loads = [r["loadavg_1m"] for r in result["runs"]] or [0.0]
    lines = [f"`{meta['command']}` — {meta['started'][:10]}, Linux {meta['kernel']}, {meta['cpus']} CPUs "
             f"(1-min load average {min(loads):.1f}–{max(loads):.1f} during the run); "
             f"{meta['rounds']} interleaved round(s), {meta['duration']} s per throughput figure. "
             "Cells: median [min–max] over rounds, ×ratio to plain routing (pod MTU 1500) in the same run. "
             f"64 B UDP: {SMALL}-byte payloads from a sendmmsg generator, rate seen by the sink. "
             "CPU s/GB: during the 1-stream run, iperf3 + tunnel processes + ksoftirqd. "
             f"Loaded RTT: the ping-pong while a 64-byte flood runs the same way, {_load(meta['load_kpps'])}."]
    header = ["mode", "pod MTU", *(f.title for f in FIGURES), "verified"]
    for profile in meta["profiles"]:
        lines += ["", f"**{profile}** ({PROFILE_TEXT[profile]})", "",
                  "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for mode in meta["modes"]:
            cells = [_label(mode), str(MODES[mode].pod_mtu)]
            if mode in result["skipped"]:
                lines.append("| " + " | ".join(cells + ["—"] * len(FIGURES) + [f"skipped: {result['skipped'][mode]}"])
                             + " |")
                continue
            row = result["summary"][profile][mode]
            for f in FIGURES:
                fig = row["figures"].get(f.key)
                if fig is None:
                    cells.append("—")
                    continue
                cell = _num(fig["median"])
                if fig["n"] > 1:
                    cell += f" [{_num(fig['min'])}–{_num(fig['max'])}]"
                if f.key == "udp64_kpps" and row["udp64_sender_bound"]:
                    cell += " †"
                if mode != "plain" and "vs_plain" in fig:
                    cell += f" ×{fig['vs_plain']:.2f}"
                cells.append(cell)
            status = "yes" if row["verified"] else "**no**"
            if row["errors"]:
                status += f" (failed: {row['errors'][0][:80]})"
            lines.append("| " + " | ".join(cells + [status]) + " |")
        if meta["rounds"] > 1:
            lines += ["", f"Spread over rounds, {profile}: max/min of each figure.", "",
                      "| " + " | ".join(header[:1] + header[2:-1]) + " |", "|" + "---|" * (len(header) - 2)]
            for mode in meta["modes"]:
                figs = result["summary"][profile].get(mode, {}).get("figures", {})
                cells = [_label(mode)] + [f"×{g['spread']:.2f}" if (g := figs.get(f.key)) and g["spread"] else "—"
                                          for f in FIGURES]
                lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "† the sink received ≥ 90% of what the generator sent: an in-kernel path runs inside the "
              "sender's sendmmsg() calls, so this is what one sending core carries through it, not a rate "
              "the generator outran."]
    return "\n".join(lines) + "\n"


def chart(result: dict[str, Any], path: Path) -> str | None:
    """The PNG chart; returns why not if it cannot be drawn."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is missing (pip install matplotlib, in the bench extra): no chart"
    profiles, summary = result["meta"]["profiles"], result["summary"]
    fig, axes = plt.subplots(len(FIGURES), len(profiles), figsize=(6 * len(profiles), 2.4 * len(FIGURES)),
                             squeeze=False)
    for col, profile in enumerate(profiles):
        for row, f in enumerate(FIGURES):
            ax = axes[row][col]
            names = [m for m in result["meta"]["modes"] if f.key in summary[profile].get(m, {}).get("figures", {})]
            figs = [summary[profile][m]["figures"][f.key] for m in names]
            med = [g["median"] for g in figs]
            ax.barh([_label(m) for m in names], med,
                    xerr=[[g["median"] - g["min"] for g in figs], [g["max"] - g["median"] for g in figs]],
                    color=["tab:orange" if m.startswith("ipipfast") else "tab:gray" if m.startswith("plain") else "tab:blue"
                           for m in names], capsize=3)
            ax.invert_yaxis()
            ax.tick_params(labelsize=8)
            ax.set_title(f"{profile}: {f.title} ({'higher' if f.higher_is_better else 'lower'} is better)",
                         fontsize=9)
            for y, v in enumerate(med):
                ax.text(v, y, f" {_num(v)}", va="center", fontsize=7)
    fig.suptitle(result["meta"]["command"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


# -- the run ---------------------------------------------------------------------

def run(args: argparse.Namespace, command: str) -> int:
    stopping.install()
    if args.quick:
        args.rounds, args.duration = 1, 2
    args.pings = 500 if args.quick else 5000  # p99.9 is then the 5th-slowest round trip, not the slowest
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    skipped = _provision(args.modes, not args.no_install)
    for mode, why in skipped.items():
        _say(f"skipping {mode}: {why}")
    modes = [m for m in args.modes if m not in skipped]
    binary = flood_binary() if modes else Path()
    plan = [(r, p, m) for r in range(args.rounds) for p in args.profiles
            for m in modes[r % len(modes):] + modes[:r % len(modes)]]
    runs = []
    for i, (r, profile, mode) in enumerate(plan, 1):
        stopping.check()
        rec = measure(mode, profile, args, binary, f"[{i}/{len(plan)}] round {r + 1} {profile} {mode}")
        runs.append({"round": r + 1, **rec})
    result: dict[str, Any] = {
        "meta": {"command": command, "started": started, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 "kernel": platform.release(), "cpus": os.cpu_count(), "rounds": args.rounds,
                 "duration": args.duration, "profiles": args.profiles, "modes": args.modes,
                 "kernel_ipip": kernel_ipip.impl(), "small_udp_payload": SMALL, "pings": args.pings,
                 "load_kpps": args.load_kpps,
                 "cpu_method": CPU_METHOD},
        "skipped": skipped,
        "summary": summarize(runs, args.profiles, modes),
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"e2e-{time.strftime('%Y%m%d-%H%M%S')}"
    table = markdown(result)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    stem.with_suffix(".md").write_text(table)
    if no_chart := chart(result, stem.with_suffix(".png")):
        _say(no_chart)
    sys.stdout.write(table)
    _say(f"wrote {stem}.json, .md" + ("" if no_chart else ", .png"))
    ok = all(row["verified"] and len(row["figures"]) == len(FIGURES) and not row["errors"]
             for rows in result["summary"].values() for row in rows.values())
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("needs root: it builds network namespaces, tunnels and raw sockets")
    return run(args, shlex.join(["python", "-m", "bench.e2e", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
