"""Bad input at volume: a running node takes a million random and mutated
frames on its underlay while its pods' traffic goes on, and accounts for
every frame its receive rings saw.

    python -m bench.fuzz [--frames 1000000] [--seed 1] [--workers 1] [--out bench/results]

A two-node testbed with ipipfast on both; n0 is the target. From n1's
namespace, bench.inject sends the frames onto n1's end of the underlay link:
mutations of valid IPIP frames from n1 (n1's MACs, addresses and pods) and
random bytes, made 20,000 at a time and sent as fast as the socket takes
them. Meanwhile n1's pod talks to n0's pod through n0's decap loop: TCP
transfers of 2 MB back to back (bytes checked by SHA-256) and 20 echoes
after each. At the end, with the traffic stopped, 10 echoes more.

Verdict (exit 0 when all hold):
- n0's daemon lives through it and answers on its control socket after it,
  ready (its packet loops alive), and exits 0 on SIGTERM;
- every transfer matched and every echo came back uncorrupted, at least one
  transfer finished while the frames came, and the last echoes all came back;
- the accounting closes exactly, once n0 is at rest: the frames its rings
  saw (the kernel's PACKET_STATISTICS tp_packets) = those its decap loops
  took + ring_full, and those taken = decapsulated + dropped by reason;
- the injector's count agrees with the kernel's: what the rings saw is what
  the injector sent that their filter admits (by its model of the filter)
  plus n1's own tunnel frames (its tx_packets), and R more, 0 <= R <= the
  fragments the injector sent that the kernel's reassembly took (R: the
  packets it completed).
Figures (frames sent and accepted, the rate of the bursts and overall, the
ring's frames, each drop reason's count, R, the traffic's, wall time):
Markdown on stdout, JSON in bench/results/fuzz-<time>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ipipfast_lab import traffic
from ipipfast_lab.daemons import Counters, TunnelProcess, delta, start_tunnels, wait_until
from ipipfast_lab.testbed import Node, Pod, Testbed

from . import results, stopping

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
TRANSFER = 2 << 20
ECHOES = 20


def link_drops(tb: Testbed, node: Node) -> dict[str, int]:
    stats = tb.ipr(node).get_links(ifname=node.interface)[0].get_attr("IFLA_STATS64")
    return {"rx_dropped": stats["rx_dropped"], "tx_dropped": stats["tx_dropped"]}


def rx_accounted(d: Counters) -> int:
    """Frames the decap loops have an outcome for: decapsulated, or dropped for any reason but ring_full."""
    return d.get("rx_packets", 0) + sum(n for k, n in d.items() if k.startswith("rx_drop_") and k != "rx_drop_ring_full")


def closes(d: Counters) -> bool:
    """Every frame the rings saw is accounted for (counters.Ring)."""
    return (d.get("ring_seen", 0) == d.get("ring_taken", 0) + d.get("rx_drop_ring_full", 0)
            and d.get("ring_taken", 0) == rx_accounted(d))


class Alongside(threading.Thread):
    """The pods' traffic through the target's decap loop, until stopped."""

    def __init__(self, tb: Testbed, src: Pod, dst: Pod) -> None:
        super().__init__(name="alongside", daemon=True)
        self.tb, self.src, self.dst = tb, src, dst
        self.stop = threading.Event()
        self.transfers: list[dict[str, Any]] = []
        self.echoes: list[dict[str, Any]] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                r = traffic.tcp_transfer(self.tb, self.src, self.dst, TRANSFER, seed=len(self.transfers))
                self.transfers.append({"match": r["match"], "gbit_s": r["gbit_s"], "at": time.monotonic()})
                self.echoes.append(traffic.ping(self.tb, self.src, self.dst.ip, count=ECHOES, interval=0.005))
        except BaseException as e:  # reported in the verdict
            self.error = e


def campaign(frames: int, seed: int, workers: int) -> dict[str, Any]:
    with Testbed(nodes=2, pods_per_node=1) as tb:
        n0, n1 = tb.nodes
        pod, far = n0.pods[0], n1.pods[0]
        tunnels: list[TunnelProcess] = start_tunnels(tb, workers=workers)
        t0, t1 = tunnels
        try:
            before0, before1 = t0.counters(), t1.counters()
            links0, links1 = link_drops(tb, n0), link_drops(tb, n1)
            alongside = Alongside(tb, far, pod)
            alongside.start()
            argv = [sys.executable, "-m", "bench.inject", "--iface", n1.interface, "--frames", str(frames),
                    "--seed", str(seed), "--src-mac", mac(tb, n1), "--dst-mac", mac(tb, n0), "--src", n1.ip,
                    "--dst", n0.ip, "--src-pod", far.ip, "--dst-pod", pod.ip]
            started = time.monotonic()
            try:
                out = tb.run(n1, argv, timeout=max(300, frames / 2000), cwd=ROOT).stdout
            finally:
                injected = time.monotonic()
                alongside.stop.set()
                alongside.join()
            stopping.check()
            injector = json.loads(out.splitlines()[-1])
            # At rest: the transfers and the injector are done; the rings
            # drain and every frame gets its outcome.
            try:
                wait_until(lambda: closes(delta(before0, t0.counters())), timeout=10, what="n0 at rest")
            except TimeoutError:
                pass
            d0, d1 = delta(before0, t0.counters()), delta(before1, t1.counters())
            answered = t0.status()
            last = traffic.ping(tb, far, pod.ip, count=10, interval=0.01)
            alive = t0.proc.poll() is None
            drops0 = {k: after - links0[k] for k, after in link_drops(tb, n0).items()}
            drops1 = {k: after - links1[k] for k, after in link_drops(tb, n1).items()}
        finally:
            codes = [t.stop() for t in tunnels]
    legit = d1.get("tx_packets", 0)
    seen = d0.get("ring_seen", 0)
    reassembled = seen - injector["admitted"] - legit
    during = [t for t in alongside.transfers if t["at"] <= injected]
    checks = {
        "n0's daemon lived through it": alive,
        "n0 answered on its control socket after it, its loops alive": answered["ready"],
        "both daemons exit 0 on SIGTERM": codes == [0, 0],
        "every transfer matched, every echo came back uncorrupted": (
            alongside.error is None and bool(alongside.transfers) and all(t["match"] for t in alongside.transfers)
            and all(e["received"] == e["sent"] and e["corrupt"] == 0 for e in alongside.echoes)),
        "a transfer finished while the frames came": bool(during),
        "the last echoes came back": last["received"] == last["sent"],
        "seen = taken + ring_full, taken = decapsulated + dropped by reason": closes(d0),
        "seen = admitted + n1's tunnel frames + R, 0 <= R <= defragmented": 0 <= reassembled <= injector["defragmented"],
    }
    return {
        "frames": frames, "seed": seed, "workers": workers,
        "seconds": {"injection": injected - started, "sending": injector["sending_seconds"]},
        "injector": injector, "n1_tunnel_frames": legit, "reassembled": reassembled,
        "n0": {"ring": {"seen": seen, "taken": d0.get("ring_taken", 0)},
               "rx_packets": d0.get("rx_packets", 0), "tx_packets": d0.get("tx_packets", 0),
               "drops": {k[len("rx_drop_"):]: n for k, n in sorted(d0.items()) if k.startswith("rx_drop_")}},
        "link_drops": {"n0": drops0, "n1": drops1},
        "traffic": {"transfers": len(alongside.transfers), "during": len(during),
                    "gbit_s": [round(t["gbit_s"], 3) for t in alongside.transfers],
                    "echoes": {k: sum(e[k] for e in alongside.echoes) for k in ("sent", "received", "corrupt")},
                    "last": {k: last[k] for k in ("sent", "received")},
                    "error": repr(alongside.error) if alongside.error else None},
        "checks": checks,
    }


def mac(tb: Testbed, node: Node) -> str:
    return tb.ipr(node).get_links(ifname=node.interface)[0].get_attr("IFLA_ADDRESS")


def markdown(r: dict[str, Any], command: str) -> str:
    inj, s = r["injector"], r["seconds"]
    rates = (f"{inj['accepted'] / s['sending']:,.0f} frames/s in its bursts, "
             f"{inj['accepted'] / s['injection']:,.0f} overall")
    refused = ", ".join(f"{k} {n:,}" for k, n in inj["refused"].items()) or "none"
    lines = [f"`{command}` — {time.strftime('%Y-%m-%d')}, Linux {os.uname().release}, {os.cpu_count()} CPUs, "
             f"{r['workers']} worker(s).", "",
             f"- {inj['frames']:,} frames in {s['injection']:.1f} s, {inj['accepted']:,} accepted by the socket "
             f"(refused: {refused}): {rates}",
             f"- n0's rings saw {r['n0']['ring']['seen']:,} frames: {inj['admitted']:,} the filter admits of the "
             f"injected, {r['n1_tunnel_frames']:,} of n1's tunnel, {r['reassembled']:,} reassembled from "
             f"{inj['defragmented']:,} fragments; {r['n0']['ring']['taken']:,} taken, "
             f"{r['n0']['rx_packets']:,} decapsulated",
             f"- alongside: {r['traffic']['transfers']} transfers of 2 MB ({r['traffic']['during']} while the frames "
             f"came), {r['traffic']['echoes']['received']:,}/{r['traffic']['echoes']['sent']:,} echoes, "
             f"{r['traffic']['last']['received']}/{r['traffic']['last']['sent']} after", "",
             "| rx drop reason | frames |", "|---|---|"]
    lines += [f"| {reason} | {n:,} |" for reason, n in r["n0"]["drops"].items()]
    lines += [""] + [f"- {'ok' if ok else 'FAILED'}: {name}" for name, ok in r["checks"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=1_000_000, help="frames to inject (default 1,000,000)")
    p.add_argument("--seed", type=int, default=1, help="the mutations' seed (default 1)")
    p.add_argument("--workers", type=int, default=1, help="n0's workers (default 1)")
    p.add_argument("--out", type=Path, default=HERE / "results", help="results directory")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        p.error("needs root: it builds network namespaces")
    stopping.install()
    command = shlex.join(["python", "-m", "bench.fuzz", *(sys.argv[1:] if argv is None else argv)])
    result = campaign(args.frames, args.seed, args.workers)
    result["command"] = command
    path = results.save(args.out, "fuzz", result)
    sys.stdout.write(markdown(result, command))
    print(f"wrote {path}", file=sys.stderr)
    return 0 if all(result["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
