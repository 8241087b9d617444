"""The lab's `ipipfast` subcommands, registered through the `ipipfast.commands`
entry point. Imports nothing heavy: the CLI loads it on every start."""
from __future__ import annotations

import argparse
from typing import Any

SCENARIOS = {
    "two-nodes": "two nodes and two pods, traffic through ipipfast, its counters and routes (the default)",
    "crosssubnet": "three nodes on two subnets behind a router without pod routes: Never (BGP mode), Always and "
                   "CrossSubnet, each pair's path captured on the wire",
}


def demo(sub: Any) -> Any:
    p = sub.add_parser("demo", help="Calico-style nodes and pods in network namespaces, traffic through ipipfast",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="scenarios:\n" + "".join(f"  {k}: {v}\n" for k, v in SCENARIOS.items()))
    p.add_argument("--scenario", choices=SCENARIOS, default="two-nodes", help="what to show (default two-nodes)")
    p.add_argument("--megabytes", type=int, default=8, help="two-nodes: the TCP transfer's size (default 8)")
    p.add_argument("--keep", action="store_true", help="leave the testbed up until Enter is pressed")

    def run(args: argparse.Namespace) -> int:
        if args.scenario == "crosssubnet":
            from .demo_crosssubnet import crosssubnet
            return crosssubnet(keep=args.keep)
        from .demo import demo
        return demo(megabytes=args.megabytes, keep=args.keep)
    return run
