"""`ipipfast bench`: the end-to-end benchmark harness (bench/e2e.py).

The options live here so that building the CLI imports nothing heavy; the
harness itself is imported by run(), from the source checkout this package
sits in (bench/ is not part of the installed package)."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODES = ("plain", "plain-1480", "vxlan", "kernel-ipip", "wireguard-go", "naive", "ipipfast", "ipipfast-2w")
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
    p.add_argument("--modes", type=_names(MODES), default=list(MODES), help=f"default: {','.join(MODES)}")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over all modes (default 3)")
    p.add_argument("--duration", type=int, default=5, help="seconds per throughput figure (default 5)")
    p.add_argument("--quick", action="store_true", help="1 round of 2 s: a smoke test")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results",
                   help="results directory (default bench/results)")
    p.add_argument("--no-install", action="store_true",
                   help="do not apt-get install missing tools: their modes are reported as skipped")


def add_parser(sub: Any) -> None:
    """Register `bench` on the CLI's subparsers."""
    p = sub.add_parser("bench", help="benchmark every tunnel mode side by side in network namespaces",
                       description="Every mode on the shared testbed, interleaved and repeated; writes "
                                   "JSON, a Markdown table and a PNG chart. Needs root.")
    add_arguments(p)


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("ipipfast bench needs root: it builds network namespaces, tunnels and raw sockets", file=sys.stderr)
        return 1
    if not (ROOT / "bench" / "e2e.py").exists():
        print(f"ipipfast bench runs from a source checkout: no bench/ beside {ROOT / 'ipipfast'}", file=sys.stderr)
        return 1
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from bench import e2e
    return e2e.run(args, shlex.join(["ipipfast", *sys.argv[1:]]))
