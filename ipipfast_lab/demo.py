"""`ipipfast demo`: two Calico-style nodes with a pod each, in network
namespaces, joined by ipipfast; pings and a TCP transfer pod to pod, with
the counters that show the traffic crossed the tunnel, and a node's routes as
`ipipfast show` gives them."""
from __future__ import annotations

import os
import sys

from . import traffic
from .testbed import Testbed
from .daemons import running_tunnels

PINGS = 20


def _say(text: str = "") -> None:
    print(text, flush=True)


def demo(megabytes: int = 8, keep: bool = False) -> int:
    if os.geteuid() != 0:
        print("ipipfast demo needs root: it builds network namespaces, a TUN and AF_PACKET sockets",
              file=sys.stderr)
        return 1
    with Testbed(nodes=2, pods_per_node=1) as tb:
        a, b = tb.nodes
        pa, pb = a.pods[0], b.pods[0]
        _say(f"testbed {tb.prefix}: underlay 198.18.0.0/24 on a veth pair")
        for n in tb.nodes:
            _say(f"  node {n.name}  {n.ip}  pods {n.pod_cidr}  pod {n.pods[0].ip}")
        with running_tunnels(tb) as tunnels:
            _say("ipipfast is up on both nodes; remote pod CIDRs route into its TUN "
                 "(blackhole at metric 4000 behind it)")
            before = [t.counters() for t in tunnels]
            ok = True
            for src, dst in ((pa, pb), (pb, pa)):
                r = traffic.ping(tb, src, dst.ip, count=PINGS, interval=0.02)
                rtt = r["rtt_us"]
                ok &= r["received"] == PINGS
                _say(f"ping {src.ip} -> {dst.ip}: {r['received']}/{r['sent']} replies"
                     + (f", rtt p50 {rtt['p50']:.0f} us, p99 {rtt['p99']:.0f} us" if rtt else ""))
            t = traffic.tcp_transfer(tb, pa, pb, megabytes << 20)
            ok &= t["match"]
            _say(f"tcp {pa.ip} -> {pb.ip}: {megabytes} MB at {t['gbit_s']:.2f} Gbit/s, "
                 f"sha256 {'matches' if t['match'] else 'DIFFERS'}")
            after = [tun.counters() for tun in tunnels]
            _say()
            _say(f"{'counter':<24}{'node ' + a.ip:>20}{'node ' + b.ip:>20}")
            for key in ("tx_packets", "tx_bytes", "rx_packets", "rx_bytes"):
                _say(f"{key:<24}" + "".join(f"{aft[key] - bef[key]:>20,}" for bef, aft in zip(before, after)))
            drops = {k for c in after for k, v in c.items() if "drop" in k and v}
            for key in sorted(drops):
                _say(f"{key:<24}" + "".join(f"{c[key]:>20,}" for c in after))
            crossed = all(aft["tx_packets"] > bef["tx_packets"] and aft["rx_packets"] > bef["rx_packets"]
                          for bef, aft in zip(before, after))
            ok &= crossed
            _say()
            _say("the traffic crossed the tunnel both ways" if crossed else "the tunnel counters did not move")
            _say()
            _say(f"ipipfast show routes, on {a.name}:")
            _say(tb.python(a, "-m", "ipipfast", "show", "routes").stdout.rstrip())
            if keep:
                input(f"testbed {tb.prefix} is up (ip netns list); press Enter to tear it down ")
    _say("torn down")
    return 0 if ok else 1
