"""The lab's `ipipfast` subcommands, registered through the `ipipfast.commands`
entry point. Imports nothing heavy: the CLI loads it on every start."""
from __future__ import annotations

import argparse
from typing import Any


def demo(sub: Any) -> Any:
    p = sub.add_parser("demo", help="two nodes and two pods in network namespaces, traffic through ipipfast")
    p.add_argument("--megabytes", type=int, default=8, help="TCP transfer size (default 8)")
    p.add_argument("--keep", action="store_true", help="leave the testbed up until Enter is pressed")

    def run(args: argparse.Namespace) -> int:
        from .demo import demo
        return demo(megabytes=args.megabytes, keep=args.keep)
    return run
