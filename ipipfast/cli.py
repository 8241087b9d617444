"""`ipipfast …`: run a node's tunnel, check a config, show a running one;
other packages (the lab's `demo`) add commands through the
`ipipfast.commands` entry points."""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path

from . import logs, show
from .control import RUN_DIR

# An entry point's object is called with the subparsers and returns a
# handler for the command(s) it added: handler(args) -> exit code.
PLUGIN_GROUP = "ipipfast.commands"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ipipfast", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="json: one object per line, for log collectors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run a node's tunnel in the foreground until SIGINT/SIGTERM")
    p.add_argument("--config", required=True, help="the node's YAML config")
    p.add_argument("--status-file", help="write counters and next hops as JSON here, twice a second")
    p.add_argument("--ready-file", help="write the daemon's PID here once it forwards (and remove it at exit), "
                                        "for supervisors without systemd; under systemd, Type=notify says the same")
    p.add_argument("--remove-device", action="store_true",
                   help="at exit, remove what this run created (the TUN, its routes, the tc drop); by default "
                        "the TUN and every route into it stay, as tunl0 does, for the next run to attach to")
    p.add_argument("--run-dir", type=Path, default=RUN_DIR,
                   help=f"where the control socket <tunnel>.sock goes ({RUN_DIR})")
    _node_ip_argument(p)
    opts = p.add_argument_group("tunnel options (override the config file's tunnel section, as `ip tunnel` does)")
    opts.add_argument("--ttl", help="inherit | 1-255 (a fixed ttl sets pmtudisc)")
    opts.add_argument("--tos", help="inherit | 0-255")
    opts.add_argument("--pmtudisc", action=argparse.BooleanOptionalAction, default=None,
                      help="outer DF always set (--no-pmtudisc: copied from the inner, tunl0's default)")
    opts.add_argument("--ignore-df", action=argparse.BooleanOptionalAction, default=None)
    opts.add_argument("--workers", type=int, help="datapath workers: TUN queues and receive rings")
    opts.add_argument("--offload", action=argparse.BooleanOptionalAction, default=None,
                      help="TUN GSO and checksum offloads (default on)")
    opts.add_argument("--busy-poll", type=int, metavar="US", help="spin this long for work before sleeping")
    opts.add_argument("--busy-poll-budget", type=int, metavar="PCT",
                      help="percent of one CPU each loop may spend spinning (default 100)")
    opts.add_argument("--coalesce-us", type=int, metavar="US",
                      help="under load, nap this long between batches instead of being woken (0: off)")
    opts.add_argument("--ring-frames", type=int, metavar="N",
                      help="frames in each worker's receive ring (rounded up to a power of two)")

    p = sub.add_parser("check-config", help="validate a config file; errors name the line")
    p.add_argument("path")
    _node_ip_argument(p)

    p = sub.add_parser("down", help="remove ipipfast's TUN (with every route into it), its direct routes and "
                                    "its tc drop from this node")
    p.add_argument("--config", required=True, help="the node's YAML config (names the TUN and the underlay)")
    _node_ip_argument(p)

    show.add_parser(sub)
    p = sub.add_parser("top", help="a running daemon's rates, drops, workers and next hops, live")
    p.add_argument("--once", action="store_true",
                   help="print one frame (from two samples a second apart) and exit, for scripts")
    show.add_target_arguments(p)

    handlers: dict[str, Callable[[argparse.Namespace], int]] = {}
    for ep in entry_points(group=PLUGIN_GROUP):
        handlers[ep.name] = ep.load()(sub)

    args = parser.parse_args(argv)
    logs.configure(logging.DEBUG if args.verbose else logging.INFO, args.log_format)

    if args.command == "check-config":
        from .config import ConfigError, load_config
        try:
            cfg = load_config(args.path, node_ip=args.node_ip)
        except ConfigError as e:
            print(e, file=sys.stderr)
            return 1
        except OSError as e:
            print(f"{args.path}: {e.strerror}", file=sys.stderr)
            return 1
        from .routes import Kind, Source, Table
        table = Table.build({Source.FILE: cfg.routes}, cfg.tunnel.mode, cfg.node.ip)
        direct = table.kinds.count(Kind.DIRECT)
        print(f"{args.path}: ok ({len(table)} routes: {len(table) - direct} encapsulated, {direct} direct;"
              f" {len(cfg.routes.peers())} peers; mode {cfg.tunnel.mode.value})")
        return 0
    if args.command == "down":
        from .config import ConfigError, load_config
        from .daemon import StartError, down
        try:
            removed = down(load_config(args.config, node_ip=args.node_ip))
        except (ConfigError, StartError) as e:
            print(e, file=sys.stderr)
            return 1
        print("removed " + "; ".join(removed) if removed else "nothing of ipipfast's was there")
        return 0
    if args.command == "run":
        from .config import ConfigError
        from .daemon import StartError, run
        overrides = {k: v for k in ("ttl", "tos", "pmtudisc", "ignore_df", "workers", "offload", "busy_poll",
                                    "busy_poll_budget", "coalesce_us", "ring_frames") if (v := getattr(args, k)) is not None}
        for k in ("ttl", "tos"):  # numbers stay numbers in the config's eyes
            if k in overrides and overrides[k].isdigit():
                overrides[k] = int(overrides[k])
        try:
            return run(args.config, args.status_file, overrides, remove_device=args.remove_device,
                       ready_file=args.ready_file, run_dir=args.run_dir, node_ip=args.node_ip)
        except (ConfigError, StartError) as e:
            print(e, file=sys.stderr)
            return 1
    if args.command == "show":
        return show.main(args)
    if args.command == "top":
        from . import top
        return top.main(args)
    if args.command in handlers:
        return handlers[args.command](args)
    return 2


def _node_ip_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--node-ip", metavar="IP",
                   help="this node's underlay address, over the file's node.ip (a DaemonSet's status.hostIP: "
                        "one config for every node); without a prefix length, the interface holding it gives one")


if __name__ == "__main__":
    sys.exit(main())
