"""Routes at the scale of a large cluster: one ipipfast on a two-node testbed
with 100,000 routes (/32s towards one node), measured as an operator sees it.

    python -m bench.routes [--routes 100000] [--reloads 100] [--events 300] [--base /work/main]

Each case on a fresh testbed and daemon:
  file_start     exec to ready with the routes in the file; RSS at ready
  kernel_start   exec to ready with the routes already in the kernel (proto 80
                 into a persistent TUN, as after a restart under BIRD/felix)
  restart        exec to ready on a persistent TUN where the previous run left
                 its routes: the route writes it needed (none, if it diffs)
  reload_same    SIGHUP with the file unchanged (recognised by its digest)
  reload_comment the file rewritten with only a comment changed (parsed again)
  reload_one     one route changed: route writes and netlink batches
  rss_reloads    RSS after each of --reloads comment-only reloads (a full
                 parse each): at ready, after the first, the largest, the last
  event_latency  a route written into the TUN (CLOCK_MONOTONIC before the
                 write) to the daemon's publication of the datapath table that
                 holds it (CLOCK_MONOTONIC, from its status): p50/p99/max, with
                 nothing else and with 10,000 kernel routes present
--base DIR runs file_start and the reloads with the daemon of another
checkout too (e.g. main), for the before/after; it may lack the newer cases.
Results: bench/results/routes-<time>.json, and a Markdown table on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ipipfast import rtnl
from ipipfast.config import digest
from ipipfast_lab.daemons import TunnelProcess
from ipipfast_lab.testbed import Node, Testbed

from . import results

HERE = Path(__file__).resolve().parent
FIRST, END = 198 << 24 | 18 << 16 | 16 << 8, 198 << 24 | 20 << 16  # 198.18.16.0 .. 198.19.255.255
PODS = range(198 << 24 | 19 << 16, 198 << 24 | 19 << 16 | 2 << 8)  # the testbed's pod CIDRs: left out
EVENT_GAP = 0.05  # seconds between the latency probe's routes
LATENCY_BASE = 10_000


def addresses(n: int, skip: int = 0) -> list[str]:
    """n /32 destinations inside 198.18.0.0/15, clear of the underlay and the pods."""
    out: list[str] = []
    a = FIRST
    while len(out) < n + skip:
        if a >= END:
            raise ValueError(f"198.18.16.0-198.19.255.255 holds fewer than {n + skip} /32s")
        if a not in PODS:
            out.append(f"{a >> 24}.{a >> 16 & 255}.{a >> 8 & 255}.{a & 255}")
        a += 1
    return out[skip:]


def config_text(tb: Testbed, node: Node, dsts: list[str], via: str, comment: str = "") -> str:
    """The node's config with one route per destination, written as text (yaml.safe_dump of 100k
    dicts takes longer than the daemon it feeds)."""
    head = (f"node: {{ip: {node.ip}/{node.prefixlen}, interface: {node.interface}}}\n"
            f"tunnel: {{name: {tb.prefix}t{node.index}}}\nroutes:\n")
    return head + "".join(f"  - {{cidr: {d}/32, via: {via}}}\n" for d in dsts) + (f"# {comment}\n" if comment else "")


def rss_mb(t: TunnelProcess) -> float:
    for line in Path(f"/proc/{t.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise LookupError("VmRSS")


def start(tb: Testbed, node: Node, config: str, cwd: Path | None = None, timeout: float = 300) -> tuple[TunnelProcess, float]:
    """A daemon, and the seconds from its exec to its status file (ready)."""
    t0 = time.monotonic()
    t = TunnelProcess(tb, node, config, cwd=cwd, tunnel=f"{tb.prefix}t{node.index}")
    while not t.status_path.exists():
        if t.proc.poll() is not None or time.monotonic() - t0 > timeout:
            raise RuntimeError(f"daemon did not become ready:\n{t.log()[-3000:]}")
        time.sleep(0.005)
    return t, time.monotonic() - t0


def persistent_tun(tb: Testbed, node: Node) -> str:
    """The node's TUN made ahead of the daemon and left by it, as another
    helper's persistence will: the daemon attaches to it."""
    name = f"{tb.prefix}t{node.index}"
    tb.run(node, ["ip", "tuntap", "add", "dev", name, "mode", "tun"])
    tb.run(node, ["ip", "link", "set", name, "up"])
    return name


def kernel_routes(tb: Testbed, node: Node, tun: str, dsts: list[str], via: str, tmp: Path) -> None:
    batch = tmp / f"{tb.prefix}-routes"
    batch.write_text("".join(f"route replace {d}/32 via {via} dev {tun} onlink proto 80\n" for d in dsts))
    tb.run(node, ["ip", "-batch", str(batch)], timeout=600)
    batch.unlink()


def counters(t: TunnelProcess) -> dict[str, int]:
    return t.counters()


def reload(t: TunnelProcess, text: str | None) -> dict[str, Any]:
    """The file rewritten (the daemon's inotify watch sees it), or with text
    None a SIGHUP over the same file; the daemon's own record of the reload."""
    before = sum(t.status()["reloads"].values())
    if text is None:
        t.proc.send_signal(signal.SIGHUP)
        status = t.wait_for(lambda s: sum(s["reloads"].values()) > before, timeout=600)
    else:
        t.write_config(text)
        want = digest(text).hex()
        status = t.wait_for(lambda s: s["config_digest"] == want and sum(s["reloads"].values()) > before, timeout=600)
    return status["last_reload"]


def reload_by_log(t: TunnelProcess, text: str) -> float:
    """For a daemon without last_reload: SIGHUP to its "reloaded" log line."""
    before = t.log().count("reloaded")
    t0 = time.monotonic()
    t.reload(text)
    while t.log().count("reloaded") == before:
        if time.monotonic() - t0 > 600:
            raise TimeoutError("no reload")
        time.sleep(0.01)
    return time.monotonic() - t0


@contextmanager
def bed(nodes: int = 2) -> Iterator[Testbed]:
    with Testbed(nodes=nodes, pods_per_node=1) as tb:
        yield tb


def case_file(args: argparse.Namespace, tmp: Path, cwd: Path | None = None) -> dict[str, Any]:
    dsts = addresses(args.routes)
    out: dict[str, Any] = {}
    with bed(nodes=3) as tb:
        n0, n1, n2 = tb.nodes
        text = config_text(tb, n0, dsts, n1.ip)
        t, out["start_s"] = start(tb, n0, text, cwd)
        try:
            out["rss_ready_mb"] = rss_mb(t)
            if cwd is not None:  # another checkout: what its log can tell
                out["reload_comment_s"] = [reload_by_log(t, text + f"# {i}\n") for i in range(args.base_reloads)]
                out["rss_after_reloads_mb"] = rss_mb(t)
                return out
            c0 = counters(t)
            out["start_route_writes"], out["start_route_batches"] = c0["kernel_route_writes"], c0["kernel_route_batches"]
            out["reload_same"] = reload(t, None)
            out["reload_same"]["rss_mb"] = rss_mb(t)
            out["reload_comment"] = reload(t, text + "# a comment\n")
            out["reload_comment"]["rss_mb"] = rss_mb(t)
            c1 = counters(t)
            one = text.replace(f"{{cidr: {dsts[-1]}/32, via: {n1.ip}}}", f"{{cidr: {dsts[-1]}/32, via: {n2.ip}}}")
            out["reload_one"] = reload(t, one)  # the last route re-pointed to the third node
            out["reload_one"]["rss_mb"] = rss_mb(t)
            c2 = counters(t)
            out["reload_one"]["route_batches"] = c2["kernel_route_batches"] - c1["kernel_route_batches"]
            rss = [rss_mb(t)]
            for i in range(args.reloads):
                reload(t, one + f"# reload {i}\n")
                rss.append(rss_mb(t))
            out["rss_reloads_mb"] = {"before": rss[0], "after_first": rss[1] if len(rss) > 1 else None,
                                     "max": max(rss), "last": rss[-1], "n": len(rss) - 1,
                                     "growth_after_first": (rss[-1] - rss[1]) if len(rss) > 1 else None,
                                     "series": rss}
        finally:
            t.stop()
    return out


def case_kernel(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    dsts = addresses(args.routes)
    out: dict[str, Any] = {}
    with bed() as tb:
        n0, n1 = tb.nodes
        tun = persistent_tun(tb, n0)
        t0 = time.monotonic()
        kernel_routes(tb, n0, tun, dsts, n1.ip, tmp)
        out["iproute2_batch_s"] = time.monotonic() - t0
        t, out["start_s"] = start(tb, n0, config_text(tb, n0, [], n1.ip))
        try:
            status = t.wait_for(lambda s: s["routes_encapsulated"] == args.routes, timeout=60)
            out["rss_ready_mb"] = rss_mb(t)
            out["route_writes"] = status["kernel_routes"]["kernel_route_writes"]
        finally:
            t.stop()
    return out


def case_restart(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    dsts = addresses(args.routes)
    out: dict[str, Any] = {}
    with bed() as tb:
        n0, n1 = tb.nodes
        persistent_tun(tb, n0)
        text = config_text(tb, n0, dsts, n1.ip)
        first, out["first_start_s"] = start(tb, n0, text)
        out["first_route_writes"] = counters(first)["kernel_route_writes"]
        first.stop()
        t, out["start_s"] = start(tb, n0, text)
        try:
            out["route_writes"] = counters(t)["kernel_route_writes"]
        finally:
            t.stop()
    return out


def _probe(dsts: list[str], tun: str, via: str, result: dict[str, Any]) -> None:
    """In the node's namespace: one route at a time into the TUN, each
    with the CLOCK_MONOTONIC time just before its write."""
    import socket
    sock = rtnl.RouteSocket(80)
    oif = socket.if_nametoindex(tun)
    gw = int.from_bytes(socket.inet_aton(via), "big")
    times = []
    for d in dsts:
        dst = int.from_bytes(socket.inet_aton(d), "big")
        times.append(time.monotonic_ns())
        if sock.write([rtnl.RouteOp("add", dst, 32, oif, gw, onlink=True)]):
            raise RuntimeError(f"route {d} refused")
        time.sleep(EVENT_GAP)
    Path(result["path"]).write_text(json.dumps(times))


def case_latency(args: argparse.Namespace, tmp: Path, present: int) -> dict[str, Any]:
    with bed() as tb:
        n0, n1 = tb.nodes
        t, _ = start(tb, n0, config_text(tb, n0, [], n1.ip))
        try:
            tun = f"{tb.prefix}t0"
            if present:
                kernel_routes(tb, n0, tun, addresses(present), n1.ip, tmp)
            base = t.wait_for(lambda s: s["routes_encapsulated"] == present, timeout=120)["routes_encapsulated"]
            probe = addresses(args.events, skip=present)
            path = tmp / f"{tb.prefix}-probe.json"
            published: dict[int, tuple[int, int]] = {}
            writer = threading.Thread(target=tb.in_netns, args=(n0, _probe, probe, tun, n1.ip, {"path": str(path)}))
            writer.start()
            deadline = time.monotonic() + args.events * EVENT_GAP * 4 + 60
            while time.monotonic() < deadline:
                for g, ns, n, _ in t.status()["table"]["published"]:
                    published[g] = (ns, n)
                if not writer.is_alive() and max(n for _, n in published.values()) >= base + args.events:
                    break
                time.sleep(0.1)
            writer.join()
            times = json.loads(path.read_text())
        finally:
            t.stop()
    pubs = sorted(published.values())
    lat = []
    for k, t_write in enumerate(times):
        want = base + k + 1
        t_pub = next((ns for ns, n in pubs if n >= want and ns >= t_write), None)
        if t_pub is None:
            raise RuntimeError(f"route {k}: no publication with {want} entries after {t_write}: {pubs}")
        lat.append((t_pub - t_write) / 1e6)
    lat.sort()
    return {"present": present, "samples": len(lat), "p50_ms": statistics.median(lat),
            "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))], "max_ms": lat[-1]}


def markdown(r: dict[str, Any]) -> str:
    f, k, s = r["file"], r["kernel"], r["restart"]
    lines = ["| case | figure |", "|---|---|",
             f"| start, {r['routes']} routes in the file | {f['start_s']:.2f} s, RSS {f['rss_ready_mb']:.1f} MB, "
             f"{f['start_route_writes']} route writes in {f['start_route_batches']} batches |",
             f"| start, {r['routes']} routes already in the kernel | {k['start_s']:.2f} s, RSS {k['rss_ready_mb']:.1f} MB, "
             f"{k['route_writes']} route writes |",
             f"| restart on a persistent TUN with its routes in place | {s['start_s']:.2f} s, "
             f"{s['route_writes']} route writes (first start: {s['first_route_writes']}) |"]
    for name in ("reload_same", "reload_comment", "reload_one"):
        x = f[name]
        lines.append(f"| {name} | {x['seconds']:.3f} s, {x['route_writes']} route writes"
                     + (f" in {x['route_batches']} batch(es)" if "route_batches" in x else "")
                     + (", parsed" if x["parsed"] else ", not parsed") + f"; RSS after {x['rss_mb']:.1f} MB |")
    m = f["rss_reloads_mb"]
    if m["n"]:
        lines.append(f"| RSS over {m['n']} reloads | {m['before']:.1f} MB before, {m['after_first']:.1f} after the "
                     f"first, max {m['max']:.1f}, last {m['last']:.1f} (growth after the first "
                     f"{m['growth_after_first']:+.1f}) |")
    for lat in r["latency"]:
        lines.append(f"| event -> datapath, {lat['present']} kernel routes present | p50 {lat['p50_ms']:.1f} ms, "
                     f"p99 {lat['p99_ms']:.1f} ms, max {lat['max_ms']:.1f} ms ({lat['samples']} samples) |")
    if "base" in r:
        b = r["base"]
        lines.append(f"| base ({r['base_dir']}): start, {r['routes']} routes in the file | {b['start_s']:.2f} s, "
                     f"RSS {b['rss_ready_mb']:.1f} MB |")
        if b["reload_comment_s"]:
            lines.append(f"| base: reloads (comment changed) | {', '.join(f'{x:.2f}' for x in b['reload_comment_s'])}"
                         f" s; RSS after them {b['rss_after_reloads_mb']:.1f} MB |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.routes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--routes", type=int, default=100_000)
    p.add_argument("--reloads", type=int, default=100, help="comment-only reloads for the RSS series")
    p.add_argument("--events", type=int, default=300, help="routes written one by one for the latency")
    p.add_argument("--base", type=Path, help="another checkout whose daemon to measure too (file start, reloads)")
    p.add_argument("--base-reloads", type=int, default=3)
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces)")
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    r: dict[str, Any] = {"routes": args.routes, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    r["file"] = case_file(args, tmp)
    r["kernel"] = case_kernel(args, tmp)
    r["restart"] = case_restart(args, tmp)
    r["latency"] = [case_latency(args, tmp, 0), case_latency(args, tmp, LATENCY_BASE)]
    if args.base:
        os.environ["PYTHONDONTWRITEBYTECODE"] = "1"  # leave the other checkout as it is
        r["base_dir"] = str(args.base)
        r["base"] = case_file(args, tmp, cwd=args.base)
    path = results.save(args.out, "routes", r)
    print(markdown(r))
    print(f"\n{path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
