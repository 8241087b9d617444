"""`ipipfast show [routes|peers|counters] [--json]`: a running daemon's
state, asked over its control socket, in the manner of `wg show`."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .control import RUN_DIR, ControlError, NoDaemon, request, socket_path

WHAT = ("routes", "peers", "counters")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("show", help="a running daemon's routes, peers and counters, from its control socket")
    p.add_argument("what", nargs="?", choices=WHAT, help="only this part (default: all of them)")
    p.add_argument("--json", action="store_true", help="the daemon's answer as JSON")
    add_target_arguments(p)


def add_target_arguments(p: argparse.ArgumentParser) -> None:
    """Which daemon to ask: the options of `show` and `top`."""
    p.add_argument("--tunnel", help="the daemon of this tunnel (default: the only one running)")
    p.add_argument("--socket", type=Path, help="the control socket's path (default: RUN_DIR/<tunnel>.sock)")
    p.add_argument("--run-dir", type=Path, default=RUN_DIR, help=f"where daemons keep their sockets ({RUN_DIR})")


def main(args: argparse.Namespace) -> int:
    """Prints the answer; exits 1 when no daemon answers, or (but for
    `routes` and `peers`) when it is not ready: a readiness probe."""
    try:
        path = pick(args)
        answer, ready = _ask(path, args.what)
    except TimeoutError:
        print("ipipfast show: the daemon did not answer in time: starting, or stuck", file=sys.stderr)
        return 1
    except (NoDaemon, ControlError, PermissionError, LookupError) as e:
        print(f"ipipfast show: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(answer, indent=2))
    else:
        print(_TEXT[args.what](answer), end="")
    if not ready:
        print(f"ipipfast show: {answer['tunnel']} is not ready", file=sys.stderr)
        return 1
    return 0


def pick(args: argparse.Namespace) -> Path:
    """The control socket that args (add_target_arguments) point at."""
    if args.socket:
        return args.socket
    if args.tunnel:
        return socket_path(args.tunnel, args.run_dir)
    if args.run_dir.is_dir() and not os.access(args.run_dir, os.R_OK | os.X_OK):
        raise PermissionError(f"{args.run_dir} is the daemon's own (0700): run this as its user")
    found = sorted(args.run_dir.glob("*.sock")) if args.run_dir.is_dir() else []
    if not found:
        raise NoDaemon(f"no ipipfast daemon running (no socket in {args.run_dir})")
    if len(found) > 1:
        raise LookupError(f"{len(found)} daemons in {args.run_dir} "
                          f"({', '.join(p.stem for p in found)}): pick one with --tunnel")
    return found[0]


def _ask(path: Path, what: str | None) -> tuple[dict, bool]:
    """The answer, and whether the daemon says it is ready (routes and
    peers do not ask: True)."""
    if what == "routes":
        return request(path, "routes"), True
    if what == "peers":
        routes = request(path, "routes")
        return peers(routes, request(path, "status")["counters"]["peers"]), True
    status = request(path, "status")
    if what == "counters":
        return {"tunnel": status["tunnel"], "generation": status["generation"], "ready": status["ready"],
                "counters": status["counters"]}, status["ready"]
    return {**status, "routes": request(path, "routes")["routes"]}, status["ready"]


PEER_COUNTS = ("tx_packets", "tx_bytes", "rx_packets", "rx_bytes")


def peers(routes: dict, counts: dict[str, dict[str, int]]) -> dict:
    """The routes reply grouped by the node they lead to, with what the
    tunnel carried to and from each (counts: the status's counters.peers;
    a direct peer's traffic is the kernel's, not counted)."""
    out: dict[str, dict] = {}
    for r in routes["routes"]:
        peer = out.setdefault(r["node"], {"node": r["node"], "kind": r["kind"], "next_hop": r["next_hop"],
                                          "mac": r["mac"], "mac_state": r["mac_state"], "path_mtu": r["path_mtu"],
                                          "cidrs": [], **dict.fromkeys(PEER_COUNTS, 0),
                                          **counts.get(r["node"], {})})
        peer["cidrs"].append(r["cidr"])
    return {"tunnel": routes["tunnel"], "generation": routes["generation"], "peers": list(out.values())}


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "".join("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() + "\n" for row in rows)


def mac_text(r: dict) -> str:
    return r["mac"] or r["mac_state"].replace("_", " ")  # unresolved, kernel, not on underlay


def hop_text(r: dict) -> str:
    return r["next_hop"] or "none"  # the underlay does not reach the node


def mtu_text(r: dict) -> str:
    return str(r["path_mtu"]) if r["path_mtu"] else "-"


def _mtu_text(mtu: dict) -> str:
    """The TUN's (inner) and the underlay's MTU, and the outer limit where it is lower."""
    out = f"{mtu['tun']} inner (the TUN's), {mtu['underlay']} underlay"
    return out + (f", outer packets up to {mtu['outer']} (until a restart)" if mtu["outer"] < mtu["underlay"] else "")


def _routes_text(answer: dict) -> str:
    head = f"routes of {answer['tunnel']} (table generation {answer['generation']}): {len(answer['routes'])}\n"
    rows = [["cidr", "node", "kind", "next hop", "next-hop mac", "path mtu", "source", "from"]]
    rows += [[r["cidr"], r["node"], r["kind"], hop_text(r), mac_text(r), mtu_text(r), r["source"], r["detail"]]
             for r in answer["routes"]]
    return head + (_table(rows) if answer["routes"] else "")


def _peers_text(answer: dict) -> str:
    head = f"peers of {answer['tunnel']} (table generation {answer['generation']}): {len(answer['peers'])}\n"
    rows = [["node", "kind", "next hop", "next-hop mac", "path mtu", "tx packets", "tx bytes", "rx packets",
             "rx bytes", "cidrs"]]
    rows += [[p["node"], p["kind"], hop_text(p), mac_text(p), mtu_text(p), *(str(p[k]) for k in PEER_COUNTS),
              " ".join(p["cidrs"])] for p in answer["peers"]]
    return head + (_table(rows) if answer["peers"] else "")


def _counters_text(answer: dict) -> str:
    c = answer["counters"]
    lines = [f"counters of {answer['tunnel']} (table generation {answer['generation']})"]
    for d, offload in (("tx", "GSO super-packets segmented"), ("rx", "coalesced packets written")):
        x = c[d]
        drops = ", ".join(f"{r} {n}" for r, n in x["drops"].items() if n) or "none"
        lines.append(f"  {d}: {x['packets']} packets, {x['bytes']} bytes, {x['offloaded']} {offload}; "
                     f"dropped: {drops}")
    ring = c["ring"]
    lines.append(f"  rx rings: {ring['seen']} frames seen past the filter, {ring['taken']} taken by the decap loop")
    i = c["icmp"]
    lines.append(f"  icmp errors: {i['sent']} sent, {i['ratelimited']} rate-limited, {i['relayed']} relayed; "
                 f"{i['pmtu_updates']} path MTU updates")
    lines.append(f"  tc egress: {c['foreign_ipip']} IPIP packets not ipipfast's (pods') dropped")
    if len(c["workers"]) > 1:
        lines += [f"  worker {n}: tx {w['tx']['packets']} rx {w['rx']['packets']} packets"
                  for n, w in enumerate(c["workers"])]
    return "".join(line + "\n" for line in lines)


def etcd_text(e: dict) -> str:
    """The etcd source's state: one line, then one per refused CIDR."""
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["since"]))
    state = (f"connected to {e['endpoint']} since {since}" if e["connected"] else
             f"unreachable since {since}, forwarding by the last table")
    registered = ", ".join(f"{cidr} as {key}" for cidr, key in e["registered"].items()) or "nothing"
    line = (f"etcd: {state}; revision {e['revision']}, lease {e['lease'] or 'none'}, registered {registered}; "
            f"{e['routes']} routes, {e['ignored_count']} keys not routed, {len(e['conflicts'])} conflicts"
            + (f"; last error: {e['last_error']}" if e["last_error"] else ""))
    return "".join(f"{text}\n" for text in [line, *(f"  refused: {m}" for m in e["conflicts"].values())])


def _status_text(answer: dict) -> str:
    r = answer["reloads"]
    head = (f"tunnel {answer['tunnel']}: pid {answer['pid']}, {'ready' if answer['ready'] else 'starting'}, "
            f"mode {answer['mode']}, table generation {answer['generation']}, "
            f"reloads: {r['applied']} applied, {r['refused']} refused\n"
            f"mtu: {_mtu_text(answer['mtu'])}\n"
            + (etcd_text(answer["etcd"]) if "etcd" in answer else "") + "\n")
    routes = {"tunnel": answer["tunnel"], "generation": answer["generation"], "routes": answer["routes"]}
    return head + _routes_text(routes) + "\n" + _counters_text(answer)


_TEXT = {None: _status_text, "routes": _routes_text, "peers": _peers_text, "counters": _counters_text}
