"""`ipipfast top [--once]`: a running daemon at a glance, refreshed each
second: packet, byte and drop rates per direction, per worker and for the
busiest peers, the table, the next hops. Drawn with rich, which renders the same tables live on a
terminal (in place, on the alternate screen) and as plain text into a pipe,
and sizes its columns to the content: curses would leave both to us.
Rates are the difference of two status answers over the time between them.
(Its command line is in cli.py: the daemon does not load rich.)"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .control import ControlError, NoDaemon, request
from .show import PEER_COUNTS, hop_text, mac_text, mtu_text, peers, pick

INTERVAL = 1.0   # seconds between samples
PIPE_WIDTH = 120  # columns of a frame into a pipe or file (a terminal gives its own)
TOP_PEERS = 10   # the peers shown, the busiest by byte rate


@dataclass(frozen=True)
class Sample:
    at: float          # CLOCK_MONOTONIC when the answers came
    status: dict       # the control socket's status
    peers: list[dict]  # show.peers of its routes


def sample(path: Path) -> Sample:
    status = request(path, "status")
    routes = request(path, "routes")
    return Sample(time.monotonic(), status, peers(routes, status["counters"]["peers"])["peers"])


def si(x: float) -> str:
    """A count or rate in at most four figures: 999, 12.3k, 4.56M."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}" if x and abs(x) < 10 and x != int(x) else f"{x:.0f}"


_LEFT = ("reason", "node", "peer", "kind", "next hop", "next-hop mac", "state", "cidrs")  # the words; numbers right


def _table(title: str, *columns: str) -> Table:
    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i < 1 or c in _LEFT else "right")
    return t


def frame(prev: Sample, cur: Sample) -> Group:
    """One screen: cur, with rates since prev."""
    s, c, p = cur.status, cur.status["counters"], prev.status["counters"]
    dt = cur.at - prev.at
    restarted = s["pid"] != prev.status["pid"]

    def rate(now: int, then: int) -> str:
        return "-" if restarted or dt <= 0 else si(max(0, now - then) / dt)

    head = Text.assemble(
        (f"ipipfast {s['tunnel']}", "bold"), f": pid {s['pid']}, {'ready' if s['ready'] else 'starting'}, "
        f"mode {s['mode']}; rates over {dt:.1f} s\n"
        f"table generation {s['generation']}: {s['routes_encapsulated']} routes encapsulated, "
        f"{s['routes_direct']} direct; reloads: {s['reloads']['applied']} applied, {s['reloads']['refused']} refused")

    traffic = _table("traffic", "direction", "packets/s", "Mbit/s", "offloaded/s", "packets", "bytes")
    for d, name in (("tx", "tx (encap)"), ("rx", "rx (decap)")):
        now, then = c[d], p[d]
        mbit = "-" if restarted or dt <= 0 else f"{max(0, now['bytes'] - then['bytes']) * 8 / dt / 1e6:.2f}"
        traffic.add_row(name, rate(now["packets"], then["packets"]), mbit,
                        rate(now["offloaded"], then["offloaded"]), si(now["packets"]), si(now["bytes"]))

    drops = _table("drops", "direction", "reason", "/s", "total")
    for d in ("tx", "rx"):
        for reason, n in c[d]["drops"].items():
            drops.add_row(d, reason, rate(n, p[d]["drops"].get(reason, 0)), si(n))
    drops.add_row("egress", "foreign_ipip", rate(c["foreign_ipip"], p["foreign_ipip"]), si(c["foreign_ipip"]))

    workers = _table("workers", "worker", "tx packets/s", "rx packets/s", "tx dropped/s", "rx dropped/s",
                     f"rx ring waiting (of {s['ring_frames']})")
    for i, (w, v) in enumerate(zip(c["workers"], p["workers"])):
        workers.add_row(str(i), rate(w["tx"]["packets"], v["tx"]["packets"]),
                        rate(w["rx"]["packets"], v["rx"]["packets"]),
                        rate(sum(w["tx"]["drops"].values()), sum(v["tx"]["drops"].values())),
                        rate(sum(w["rx"]["drops"].values()), sum(v["rx"]["drops"].values())),
                        si(ring_waiting(w)))

    busiest = _peer_rates(c["peers"], p["peers"], dt if not restarted else 0)
    title = "peers" if len(busiest) <= TOP_PEERS else f"peers: the {TOP_PEERS} busiest of {len(busiest)}"
    by_peer = _table(title, "peer", "tx packets/s", "tx Mbit/s", "rx packets/s", "rx Mbit/s", "packets", "bytes")
    for ip, r in busiest[:TOP_PEERS]:
        now = c["peers"][ip]
        by_peer.add_row(ip, *(("-",) * 4 if r is None else (si(r[0]), f"{r[1] * 8 / 1e6:.2f}", si(r[2]),
                                                              f"{r[3] * 8 / 1e6:.2f}")),
                        si(now["tx_packets"] + now["rx_packets"]), si(now["tx_bytes"] + now["rx_bytes"]))

    hops = _table("next hops", "node", "kind", "next hop", "next-hop mac", "state", "path mtu", "cidrs")
    for peer in cur.peers:
        hops.add_row(peer["node"], peer["kind"], hop_text(peer), mac_text(peer), peer["mac_state"], mtu_text(peer),
                     " ".join(peer["cidrs"]))
    return Group(head, *(x for t in (traffic, drops, workers, by_peer, hops) for x in (Text(), t)))


def ring_waiting(worker: dict) -> int:
    """Frames in a worker's receive ring that its decap loop has not taken
    yet: what the kernel put there (seen, less what it dropped for want of a
    slot) less what the loop took. The TUN's queue (a ring inside the
    kernel) tells nobody its length, only what overflows it: the drops'
    queue_full."""
    return max(0, worker["ring"]["seen"] - worker["rx"]["drops"].get("ring_full", 0) - worker["ring"]["taken"])


def _peer_rates(now: dict[str, dict[str, int]], then: dict[str, dict[str, int]],
                dt: float) -> list[tuple[str, tuple[float, ...] | None]]:
    """Each peer with its rates (tx packets, tx bytes, rx packets, rx bytes
    per second; None without a time between the samples), the busiest by
    bytes first (by their totals without rates)."""
    out: list[tuple[str, tuple[float, ...] | None]] = []
    for ip, c in now.items():
        before = then.get(ip, {})
        out.append((ip, tuple(max(0, c[k] - before.get(k, 0)) / dt for k in PEER_COUNTS) if dt > 0 else None))

    def busy(item: tuple[str, tuple[float, ...] | None]) -> tuple[float, float, str]:
        ip, r = item
        if r is None:
            c = now[ip]
            return -(c["tx_bytes"] + c["rx_bytes"]), -(c["tx_packets"] + c["rx_packets"]), ip
        return -(r[1] + r[3]), -(r[0] + r[2]), ip
    return sorted(out, key=busy)


def main(args: argparse.Namespace) -> int:
    try:
        path = pick(args)
        prev = sample(path)
        if args.once:
            time.sleep(INTERVAL)
            console = Console(width=None if sys.stdout.isatty() else PIPE_WIDTH)
            console.print(frame(prev, sample(path)))
            return 0
        console = Console()
        with Live(console=console, screen=True, auto_refresh=False) as live:
            while True:
                time.sleep(INTERVAL)
                cur = sample(path)
                live.update(frame(prev, cur), refresh=True)
                prev = cur
    except KeyboardInterrupt:
        return 0
    except (NoDaemon, ControlError, PermissionError, LookupError, OSError) as e:
        print(f"ipipfast top: {e}", file=sys.stderr)
        return 1
