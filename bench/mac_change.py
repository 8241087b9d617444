"""A peer's MAC changes: how long until the tunnel's frames go to the new one.

    python -m bench.mac_change [--rounds 10] [--interval 0.0005] [--cwd DIR]

One two-node testbed with ipipfast on both nodes; a pod pings the other
node's pod every INTERVAL throughout, and once per round the receiving node's
underlay interface takes a new MAC (two, in turn), announced by a gratuitous
ARP (arp_notify=1), as a migrated VM or a bond failing over does. A capture on
that interface times each change against the first IPIP frame from the
sending node to the new MAC: the change on the wall clock just before its
netlink call, the frame as the capture reads it (so within about INTERVAL
plus the capture's read latency). --cwd DIR runs the daemons from another
checkout's build, a worktree of an older revision built in place, for the
figure before a change. Median and range over rounds on stdout, as Markdown;
the JSON in bench/results/mac-change-<time>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ipipfast_lab import traffic
from ipipfast_lab.daemons import start_tunnels
from ipipfast_lab.testbed import Testbed
from ipipfast_lab.wire import read_pcap

from . import stopping

MACS = ("02:00:5e:10:00:01", "02:00:5e:10:00:02")  # locally administered
SPACING = 1.5  # seconds between changes: longer than the daemon's periodic check (1 s)
HERE = Path(__file__).resolve().parent


def frames_to(pcap: Path, src: str) -> list[tuple[float, str]]:
    """(time, destination MAC) of every IPIP frame from src in a pcap file
    (read by hand: scapy takes seconds for the tens of thousands here)."""
    want = bytes(int(x) for x in src.split("."))
    return [(t, frame[:6].hex(":")) for t, frame in read_pcap(pcap)
            if len(frame) >= 34 and frame[12:14] == b"\x08\x00" and frame[23] == 4 and frame[26:30] == want]


def measure(rounds: int, interval: float, cwd: Path | None) -> list[float]:
    """Milliseconds from each change to the first frame to the new MAC."""
    with Testbed(nodes=2, pods_per_node=1) as tb:
        n0, n1 = tb.nodes
        a, b = n0.pods[0], n1.pods[0]
        tb.sysctl(n1, f"net.ipv4.conf.{n1.interface}.arp_notify", "1")
        tmp = Path(tempfile.mkdtemp(prefix=f"{tb.prefix}-mac-"))
        tunnels = start_tunnels(tb, cwd=cwd)
        try:
            seconds = (rounds + 1) * SPACING
            pinger = tb.popen(a, [sys.executable, "-m", "ipipfast_lab.traffic", "ping", "--dst", b.ip,
                                  "--count", str(int(seconds / interval)), "--interval", str(interval)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            capture = traffic.serve(tb, n1, "capture", "--iface", n1.interface, "--out", tmp / "n1.pcap",
                                    "--seconds", seconds + 30)
            ipr = tb.ipr(n1)
            index = ipr.link_lookup(ifname=n1.interface)[0]
            changes = []
            time.sleep(SPACING / 2)
            for i in range(rounds):
                stopping.check()
                changes.append((time.time(), MACS[i % 2]))
                ipr.link("set", index=index, address=MACS[i % 2])
                time.sleep(SPACING)
            capture.terminate()
            traffic.collect(capture)
            pinger.kill()
            pinger.wait()
            frames = frames_to(tmp / "n1.pcap", n0.ip)
        finally:
            for t in tunnels:
                t.stop()
            shutil.rmtree(tmp, ignore_errors=True)
    out = []
    for at, mac in changes:
        first = next((t for t, dst in frames if t >= at and dst == mac), None)
        if first is None:
            raise RuntimeError(f"no frame to {mac} after the change at {at}")
        out.append((first - at) * 1e3)
    return out


def markdown(ms: list[float], command: str) -> str:
    return (f"`{command}` — {time.strftime('%Y-%m-%d')}, Linux {os.uname().release}, {os.cpu_count()} CPUs; "
            f"{len(ms)} changes.\n\n| figure | median [min–max] |\n|---|---|\n"
            f"| MAC change -> first frame to the new MAC, ms | "
            f"{statistics.median(ms):.3g} [{min(ms):.3g}–{max(ms):.3g}] |\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.mac_change", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=10, help="MAC changes (default 10)")
    p.add_argument("--interval", type=float, default=0.0005, help="seconds between echoes (default 0.0005)")
    p.add_argument("--cwd", type=Path, help="run the daemons from this checkout's build")
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        p.error("needs root: it builds network namespaces")
    stopping.install()
    ms = measure(args.rounds, args.interval, args.cwd)
    print("changes: " + ", ".join(f"{m:.3g}" for m in ms) + " ms", file=sys.stderr)
    command = shlex.join(["python", "-m", "bench.mac_change", *(sys.argv[1:] if argv is None else argv)])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"mac-change-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(
        json.dumps({"command": command, "ms": ms}, indent=1) + "\n")
    sys.stdout.write(markdown(ms, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
