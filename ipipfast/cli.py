"""`ipipfast …`: run a node's tunnel, check a config, run the demo or the benchmarks."""
from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ipipfast", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run a node's tunnel in the foreground until SIGINT/SIGTERM")
    p.add_argument("--config", required=True, help="the node's YAML config")
    p.add_argument("--status-file", help="write counters and next hops as JSON here, twice a second")

    p = sub.add_parser("check-config", help="validate a config file; errors name the line")
    p.add_argument("path")

    p = sub.add_parser("demo", help="two nodes and two pods in network namespaces, traffic through ipipfast")
    p.add_argument("--megabytes", type=int, default=8, help="TCP transfer size (default 8)")
    p.add_argument("--keep", action="store_true", help="leave the testbed up until Enter is pressed")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")

    if args.command == "check-config":
        from .config import ConfigError, load_config
        try:
            cfg = load_config(args.path)
        except ConfigError as e:
            print(e, file=sys.stderr)
            return 1
        except OSError as e:
            print(f"{args.path}: {e.strerror}", file=sys.stderr)
            return 1
        for w in cfg.warnings:
            print(f"warning: {w}", file=sys.stderr)
        enc, direct = cfg.routes.split(cfg.tunnel.mode, cfg.node.ip)
        print(f"{args.path}: ok ({len(cfg.routes.routes)} routes: {len(enc.routes)} encapsulated, "
              f"{len(direct.routes)} direct; {len(cfg.routes.peers)} peers; mode {cfg.tunnel.mode.value})")
        return 0
    if args.command == "run":
        from .config import ConfigError
        from .daemon import run
        try:
            return run(args.config, args.status_file)
        except ConfigError as e:
            print(e, file=sys.stderr)
            return 1
    if args.command == "demo":
        from .demo import demo
        return demo(megabytes=args.megabytes, keep=args.keep)
    return 2


if __name__ == "__main__":
    sys.exit(main())
