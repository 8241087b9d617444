"""`ipipfast demo --scenario crosssubnet`: the seed's experiment. Three
nodes on two underlay subnets joined by a router that knows no pod routes;
ipipfast on each node in Calico's three ipipModes in turn (the mode changed
by a file edit, as a reload does): Never (BGP mode: plain routes on the
underlay), Always (IPIP), CrossSubnet. For each mode and pair of pods, a
ping with a capture on every underlay: whether it arrived, and how its
request went on the wire (plain IP to a node or to the router; IPIP with
its outer header)."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from ipipfast.routes import Mode
from ipipfast.routing import RTPROT_IPIPFAST

from . import traffic
from .bird import kernel_routes
from .daemons import TunnelProcess, start_tunnels, wait_until
from .testbed import Node, Testbed
from .wire import Capture, Frame, IPPROTO_IPIP

PINGS = 3
SUBNETS = [1, 1, 2]
MODES = ((Mode.NEVER, "BGP mode: plain routes on the underlay, no tunnel"),
         (Mode.ALWAYS, "IPIP to every node"),
         (Mode.CROSS_SUBNET, "direct inside a subnet, IPIP across"))


def _say(text: str = "") -> None:
    print(text, flush=True)


def expected(tb: Testbed, mode: Mode, a: Node, b: Node) -> str:
    """What Calico's mode does for a pair here: "direct", "encapsulated", or "lost" (at the router)."""
    same = tb.subnets[a.index] == tb.subnets[b.index]
    if mode is Mode.ALWAYS or (mode is Mode.CROSS_SUBNET and not same):
        return "encapsulated"
    return "direct" if same else "lost"


def _programmed(t: TunnelProcess, mode: Mode) -> bool:
    """The daemon runs mode, every route of its table is in the kernel, and
    each encapsulated one's next hop has a MAC: what a ping needs."""
    answer = t.request("routes")
    return t.status()["mode"] == mode and all(
        r["kernel"] == "ours" and (r["kind"] == "direct" or r["mac_state"] == "resolved") for r in answer["routes"])


def _route_text(r) -> str:
    return f"{r.cidr} via {r.via} dev {r.dev}{' onlink' if r.onlink else ''}"


def _request_frames(frames: list[Frame], src: str, dst: str) -> tuple[list[Frame], list[Frame]]:
    """The frames that carried src -> dst: plain, and IPIP."""
    plain, ipip = [], []
    for f in frames:
        ip = f.ip
        if ip is None:
            continue
        if ip.proto != IPPROTO_IPIP and (ip.src, ip.dst) == (src, dst):
            plain.append(f)
        elif ip.inner is not None and (ip.inner.src, ip.inner.dst) == (src, dst):
            ipip.append(f)
    return plain, ipip


def _pair(tb: Testbed, mode: Mode, a: Node, b: Node, received: int, frames: dict[int, list[Frame]],
          names: dict[str, str]) -> bool:
    """Says how a's ping to b went; True when as Calico's mode would have it."""
    pa, pb = a.pods[0].ip, b.pods[0].ip
    plain, ipip = _request_frames(frames[a.index], pa, pb)
    at_b = sum(map(len, _request_frames(frames[b.index], pa, pb)))
    arrived = received == PINGS
    if ipip and not plain:
        f = ipip[0]
        seen = "encapsulated"
        how = (f"IPIP, outer {f.ip.src} -> {f.ip.dst} protocol {f.ip.proto} (inner {pa} -> {pb}), "
               f"to {names.get(f.dst_mac, f.dst_mac)}")
    elif plain and not ipip:
        seen, to = "direct", names.get(plain[0].dst_mac, plain[0].dst_mac)
        how = f"plain IP {pa} -> {pb} to {to}"
        if not arrived and to.startswith("the router"):
            how += f", which has no route to {b.pod_cidr}"
    else:
        seen = "none" if not plain else "both"
        how = "no frame on the wire" if not plain else "both plain and IPIP frames"
    if not arrived:
        how += f"; {'nothing' if not at_b else f'{at_b} frames'} reached {b.name.split('-')[-1]}"
    want = expected(tb, mode, a, b)
    ok = (arrived, seen) == ((want != "lost"), "direct" if want == "lost" else want)
    _say(f"  {a.name.split('-')[-1]} -> {b.name.split('-')[-1]}  {'arrived' if arrived else 'LOST   '}  {how}"
         + ("" if ok else f"  [Calico's {mode}: {want}]"))
    return ok


def _router_knows(tb: Testbed, pod: str) -> str:
    got = tb.run(tb.router, ["ip", "route", "get", pod], check=False)
    return got.stdout.split("\n")[0].strip() if got.returncode == 0 else got.stderr.strip().removeprefix(
        "RTNETLINK answers: ")


def crosssubnet(keep: bool = False) -> int:
    if os.geteuid() != 0:
        print("ipipfast demo needs root: it builds network namespaces, TUNs and AF_PACKET sockets", file=sys.stderr)
        return 1
    ok = True
    with Testbed(nodes=3, pods_per_node=1, underlay="routed", subnets=SUBNETS) as tb, \
            tempfile.TemporaryDirectory(prefix=f"{tb.prefix}-demo-") as tmp:
        assert tb.router is not None
        short = {n.index: n.name.split("-")[-1] for n in tb.nodes}
        names = {tb.mac(n): f"{short[n.index]}'s MAC" for n in tb.nodes}
        names.update({tb.mac(tb.router, link): f"the router's MAC (198.18.{x}.1)"
                      for x, link in tb.router_links.items()})
        _say(f"testbed {tb.prefix}: three nodes on two underlay subnets, joined by a router ({tb.router})")
        for n in tb.nodes:
            _say(f"  {short[n.index]}  {n.ip}/{n.prefixlen}  default via {n.gateway}  "
                 f"pods {n.pod_cidr}  pod {n.pods[0].ip}")
        far = tb.nodes[2].pods[0].ip
        _say(f"  the router knows the two subnets and no pod CIDR: ip route get {far} there says "
             f"\"{_router_knows(tb, far)}\"")
        pairs = [(a, b) for a in tb.nodes for b in tb.nodes if a.index < b.index]
        tunnels = start_tunnels(tb, configs=[tb.node_config(n, mode=str(MODES[0][0])) for n in tb.nodes])
        try:
            for mode, what in MODES:
                for n, t in zip(tb.nodes, tunnels):
                    if t.status()["mode"] != mode:
                        t.reload(tb.node_config(n, mode=str(mode)))
                for t in tunnels:
                    wait_until(lambda t=t: _programmed(t, mode), 10, f"{t.node.name}'s daemon in {mode}")
                _say()
                _say(f"mode {mode} ({what})")
                _say(f"  {short[0]}'s routes: " + "; ".join(
                    _route_text(r) for r in sorted(kernel_routes(tb, tb.nodes[0], RTPROT_IPIPFAST), key=str)))
                caps = [Capture(tb, n, Path(tmp)) for n in tb.nodes]
                for cap in caps:
                    cap.__enter__()
                try:
                    received = [traffic.ping(tb, a.pods[0], b.pods[0].ip, count=PINGS, interval=0.01,
                                             timeout=0.3)["received"] for a, b in pairs]
                finally:
                    for cap in caps:
                        cap.__exit__(None, None, None)
                frames = {n.index: cap.records for n, cap in zip(tb.nodes, caps)}
                for (a, b), got in zip(pairs, received):
                    ok &= _pair(tb, mode, a, b, got, frames, names)
            _say()
            _say("every pair went as Calico's modes have it" if ok else "some pairs did NOT go as Calico's modes "
                 "have it (marked)")
            if keep:
                input(f"testbed {tb.prefix} is up (ip netns list); press Enter to tear it down ")
        finally:
            for t in tunnels:
                t.stop()
    _say("torn down")
    return 0 if ok else 1
