"""One node's tunnel: wires the config, the kernel and the datapath
together, keeps next-hop MACs fresh, follows the routes (the config file on
SIGHUP or when it changes, the kernel's routes into the TUN as they change)
and cleans up on SIGINT/SIGTERM."""
from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from ipaddress import IPv4Address
from pathlib import Path

from . import _datapath, heap, ingress
from .config import Config, ConfigError, digest, parse_config, read_config_text
from .icmp import IcmpErrors
from .inotify import ConfigWatcher
from .kernel import Kernel, Link, NextHop
from .routes import DatapathEntries, Kind, Table
from .routing import Routing
from .stats import MetricsServer
from .tun import open_tun
from .wake_pipe import WakePipe

log = logging.getLogger(__name__)

NEIGHBOUR_INTERVAL = 1.0   # seconds between next-hop MAC checks (a tenth while any is missing)
SOLICIT_EVERY = 30         # checks between re-confirmations of every next hop
STATUS_INTERVAL = 0.5      # seconds between status-file writes
GC_INTERVAL = 60.0         # seconds between full garbage collections (see run_forever)
WORKER_KEYS = ("tx_packets", "rx_packets", "tx_gso", "rx_gro")  # per worker in the status file
PUBLISHED_KEPT = 64        # table publications the status keeps (generation, CLOCK_MONOTONIC ns, entries)


@dataclass(frozen=True)
class Plan:
    """A merged table and what the datapath needs of it."""
    table: Table
    encapsulated: tuple[IPv4Address, ...]  # the peers its entries index, in that order
    peers: tuple[IPv4Address, ...]         # those, then every other node: IPIP is accepted from all

    @classmethod
    def of(cls, table: Table) -> Plan:
        enc = table.encapsulated_peers()
        extra = sorted(set(table.routes.vias) - set(enc))
        return cls(table, tuple(map(IPv4Address, enc)), tuple(map(IPv4Address, enc + extra)))

    def entries(self) -> DatapathEntries:
        return self.table.datapath_entries({int(p): i for i, p in enumerate(self.encapsulated)})


class Daemon:
    def __init__(self, config: Config, config_path: str | None = None,
                 status_file: str | None = None, overrides: dict | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.overrides = overrides or {}
        self.status_file = Path(status_file) if status_file else None
        self.kernel = Kernel()
        self.stopping = threading.Event()
        self.wake = WakePipe()  # the main thread's: a source changed, a signal came
        self.reload_requested = self.stop_requested = False  # set by signal handlers: no lock (see WakePipe)
        self.routing: Routing | None = None
        self.watcher: ConfigWatcher | None = None
        self.config_digest = b""
        self.plan = Plan.of(Table.build({}, config.tunnel.mode, config.node.ip))
        self.generation = 0  # of the table pushed to the datapath (its set_table count)
        self.published: deque[tuple[int, int, int]] = deque(maxlen=PUBLISHED_KEPT)
        self.reloads: Counter[str] = Counter(applied=0, unchanged=0, refused=0)  # SIGHUP or an edit, by result
        self.last_reload: dict = {}
        self._resolve_all = False  # next time, ask the kernel for every peer's next hop again
        self.macs: dict[IPv4Address, bytes | None] = {}
        self.nexthops: dict[IPv4Address, NextHop] = {}
        self.lock = threading.RLock()  # plan, next hops and MACs: main and neighbour threads
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []
        self.metrics: MetricsServer | None = None
        self.tun_fds: list[int] = []
        self.ingress_attached = False
        self.datapath: _datapath.Datapath | None = None
        self.csum_offload = False
        self.ring_frames = 0
        self.tun_drops_at_start = self.tun_queue_full = 0  # the TUN's tx_dropped (see _status_loop)

    # ---- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        cfg = self.config
        if Path("/sys/module/ipip").exists():
            log.warning("the kernel's ipip module is loaded: it handles IPIP too (tunl0) and "
                        "answers what it cannot match; unload it (modprobe -r ipip) on ipipfast nodes")
        self.underlay: Link = self.kernel.link(cfg.node.interface)
        mtu = cfg.tunnel.mtu or self.underlay.mtu - 20
        if mtu + 20 > self.underlay.mtu:
            raise ConfigError("<config>", None, f"tunnel.mtu {mtu} + 20 exceeds the underlay MTU "
                              f"{self.underlay.mtu} of {self.underlay.name}")
        tun = open_tun(cfg.tunnel.name, offload=cfg.tunnel.offload, queues=cfg.tunnel.workers)
        self.tun_fds = tun.fds
        self.tun = self.kernel.setup_tun(cfg.tunnel.name, mtu)
        self.tun_drops_at_start = self.kernel.tx_dropped(self.tun.name)  # an attached TUN has a past
        # Segments and partial checksums from the TUN leave with their inner
        # checksum for the underlay device to fill in, where it can.
        self.csum_offload = cfg.tunnel.offload and self.kernel.completes_any_checksum(self.underlay.name)
        self.datapath = _datapath.Datapath(
            self.underlay.index, str(cfg.node.ip.ip), self.underlay.mac,
            mtu=self.underlay.mtu, ttl=cfg.tunnel.ttl, tos=cfg.tunnel.tos,
            pmtudisc=cfg.tunnel.pmtudisc, ignore_df=cfg.tunnel.ignore_df, batch=cfg.tunnel.batch,
            vnet_hdr=cfg.tunnel.offload, csum_offload=self.csum_offload, udp_gso=tun.uso,
            coalesce_us=cfg.tunnel.coalesce_us, busy_poll_us=cfg.tunnel.busy_poll,
            ring_frames=cfg.tunnel.ring_frames)
        workers = self.datapath.add_workers(self.tun_fds)
        self.ring_frames = workers[0].ring_frames
        self.icmp = IcmpErrors(self.datapath, cfg.node.ip.ip)
        try:
            ingress.attach(self.underlay.index, cfg.node.ip.ip)
            self.ingress_attached = True
        except OSError as e:  # NetlinkError is an OSError too
            log.warning("tc ingress drop not attached (%s): the kernel also processes every IPIP "
                        "frame, which costs CPU but nothing else", e)
        self.routing = Routing(self.tun.index, self.underlay.index, cfg.node.ip, cfg.tunnel.mode,
                               cfg.kernel.learn, cfg.kernel.resync, self.config_path, self.wake.set)
        self.routing.set_file(cfg.routes)
        self._reconcile()  # the first dump of the kernel's routes, the table, our routes
        heap.trim()  # what parsing the file and the dump left
        self._await_nexthops(timeout=2.0)
        loops: list[tuple[str, Callable[[], None]]] = []
        for i, w in enumerate(workers):
            loops += [(f"encap{i}", partial(w.run_encap, f"ipf-encap{i}")),
                      (f"decap{i}", partial(w.run_decap, f"ipf-decap{i}"))]
        loops += [("neighbours", self._neighbour_loop), ("status", self._status_loop),
                  ("icmp", lambda: self.icmp.run(self.stopping)), ("routes", self.routing.monitor.run)]
        if self.config_path:
            self.watcher = ConfigWatcher(self.config_path, self._config_changed)
            loops.append(("config", self.watcher.run))
        for name, target in loops:
            t = threading.Thread(target=self._guard(target), name=f"ipipfast-{name}", daemon=True)
            t.start()
            self.threads.append(t)
        if cfg.stats.listen:
            self.metrics = MetricsServer()
            host, port = self.metrics.start(*cfg.stats.listen, self.counters)
            log.info("metrics on http://%s:%d/metrics", host, port)
        self._write_status()  # its appearance tells a supervisor that the tunnel is up
        enc, direct = self._route_totals()
        log.info("ready: %s on %s (%s), mtu %d, mode %s, %d routes encapsulated, %d direct, "
                 "inner checksums %s", cfg.tunnel.name, self.underlay.name, cfg.node.ip.ip, mtu,
                 cfg.tunnel.mode.value, enc, direct,
                 "left to the underlay device" if self.csum_offload else "computed here")

    def _guard(self, target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except BaseException as e:  # a dead loop must take the daemon down, not linger
                log.exception("%s failed", threading.current_thread().name)
                self.errors.append(e)
                self.stopping.set()
                self.wake.set()
        return run

    def stop(self) -> None:
        self.stopping.set()
        if self.datapath is not None:
            self.datapath.stop()
        if self.routing is not None:
            self.routing.monitor.stop()
        if self.watcher is not None:
            self.watcher.stop()
        for t in self.threads:
            t.join(timeout=5)
        if self.metrics:
            self.metrics.stop()
        try:
            self._withdraw()
        finally:
            self._write_status()
            self.datapath = None  # frees the rings and sockets once the loops have returned
            for fd in self.tun_fds:
                os.close(fd)  # the TUN and its routes go with the last one
            self.tun_fds = []
            self.kernel.close()
            if self.routing is not None:
                self.routing.close()
            if self.watcher is not None:
                self.watcher.close()
            self.wake.close()

    def run_forever(self) -> int:
        """Runs until SIGINT/SIGTERM; SIGHUP (or an edit of the file) reloads
        the routes. The main thread reconciles: whatever changed wakes it."""
        signal.signal(signal.SIGINT, self._stop_signal)
        signal.signal(signal.SIGTERM, self._stop_signal)
        signal.signal(signal.SIGHUP, lambda *_: self._config_changed())
        self.start()
        next_gc = time.monotonic() + GC_INTERVAL
        try:
            while not (self.stop_requested or self.stopping.is_set()):
                self.wake.wait(min(next_gc, self._next_resync()) - time.monotonic())
                self.wake.clear()
                if self.stop_requested or self.stopping.is_set():
                    break
                if self.reload_requested:
                    self.reload_requested = False  # before the file is read: an edit after it asks again
                    self.reload()
                self._reconcile()
                if time.monotonic() >= next_gc:
                    # Each pyroute2 call leaves 30-100 objects in reference
                    # cycles. A quiet daemon makes so few objects that
                    # Python's full collection came about every 10 minutes,
                    # and the garbage in between held megabytes for hours
                    # before its size levelled off. A collection here costs
                    # a few milliseconds of the GIL, which the loops do not hold.
                    gc.collect()
                    next_gc = time.monotonic() + GC_INTERVAL
        finally:
            self.stop()
        return 1 if self.errors else 0

    def _stop_signal(self, *_: object) -> None:
        self.stop_requested = True
        self.wake.set()

    def _config_changed(self) -> None:
        self.reload_requested = True
        self.wake.set()

    def _next_resync(self) -> float:
        return self.routing.next_resync() if self.routing else float("inf")

    # ---- routes ---------------------------------------------------------------

    def reload(self) -> bool:
        """Re-reads the config file: its routes and the mode, and reconciles.
        A bad file is refused with its line and the running table stays; a
        file the same as the last one read is not parsed again. Records how
        long it took in last_reload."""
        if not self.config_path or self.routing is None:
            return False
        start, writes = time.monotonic(), self.routing.writer.writes
        try:
            text = read_config_text(self.config_path)
            if digest(text) == self.config_digest:
                log.info("reload: %s is unchanged", self.config_path)
                new = None
            else:
                new = parse_config(text, self.config_path, self.overrides)
        except ConfigError as e:
            self.reloads["refused"] += 1
            log.error("reload refused, keeping the running table: %s", e)
            return False
        if new is not None:
            self.config_digest = digest(text)
            self._take(new)
            self._reconcile()
            heap.trim()
        self.reloads["applied" if new is not None else "unchanged"] += 1
        self.last_reload = {"seconds": round(time.monotonic() - start, 6), "parsed": new is not None,
                            "route_writes": self.routing.writer.writes - writes}
        return True

    def _take(self, new: Config) -> None:
        """The routes and the mode of a new config; the rest needs a restart."""
        assert self.routing is not None
        for w in new.warnings:
            log.warning("%s", w)
        changed = [f.name for f in dataclasses.fields(new.tunnel)
                   if f.name != "mode" and getattr(new.tunnel, f.name) != getattr(self.config.tunnel, f.name)]
        changed += [name for name in ("node", "kernel", "stats") if getattr(new, name) != getattr(self.config, name)]
        if changed:
            log.warning("reload: %s change only on restart; the routes and the mode are reloaded",
                        ", ".join(changed))
        if new.tunnel.mode is not self.config.tunnel.mode:
            log.info("reload: mode %s -> %s", self.config.tunnel.mode, new.tunnel.mode)
        self.config = dataclasses.replace(self.config, routes=new.routes,
                                          tunnel=dataclasses.replace(self.config.tunnel, mode=new.tunnel.mode))
        self.routing.set_file(new.routes)
        self.routing.set_mode(new.tunnel.mode)
        self._resolve_all = True
        log.info("reloaded: %d routes from the file, mode %s", len(new.routes), new.tunnel.mode)

    def _reconcile(self) -> None:
        """One pass: the kernel's changes, then the table if a source
        changed, to the datapath first and then to the kernel, so that no
        packet reaches the TUN before its entry."""
        assert self.routing is not None
        self.routing.take_kernel()
        table = self.routing.build()
        if table is not None:
            with self.lock:
                self.plan = Plan.of(table)
                self._resolve_nexthops(self.plan)
                self._push_table()
        self.routing.program()

    def _route_totals(self) -> tuple[int, int]:
        """(encapsulated, direct) routes in the table."""
        direct = self.plan.table.kinds.count(Kind.DIRECT)
        return len(self.plan.table) - direct, direct

    def _withdraw(self) -> None:
        # Routes into the TUN vanish with it; direct routes and the tc drop
        # are ours to remove (once we stop, nothing takes those frames).
        if self.ingress_attached:
            ingress.detach(self.underlay.index)
            self.ingress_attached = False
        if self.routing is not None:
            self.routing.withdraw_direct()

    def _push_table(self) -> None:
        assert self.datapath is not None
        plan = self.plan
        peers = [(int(p), self.macs.get(p), self.icmp.pmtu(p)) for p in plan.peers]
        entries = plan.entries()
        self.datapath.set_table(entries, peers)
        self.generation += 1
        self.published.append((self.generation, time.monotonic_ns(), len(entries)))

    # ---- next hops ------------------------------------------------------------

    def _resolve_nexthops(self, plan: Plan) -> None:
        """The underlay next hop of each encapsulated peer: asked of the
        kernel for new peers (and for all after a reload), kept for the rest."""
        resolve_all, self._resolve_all = self._resolve_all, False
        nexthops = {}
        for peer in plan.encapsulated:
            if not resolve_all and peer in self.nexthops:
                nexthops[peer] = self.nexthops[peer]
                continue
            hop = self.kernel.nexthop(peer)
            if hop.ifindex != self.underlay.index:
                log.warning("peer %s is reached through ifindex %d, not the underlay %s: "
                            "its packets are dropped (no_neigh)", peer, hop.ifindex, self.underlay.name)
                continue
            nexthops[peer] = hop
        self.nexthops = nexthops
        self._refresh_macs(push=False)

    def _refresh_macs(self, push: bool = True) -> None:
        """Reads every next hop's MAC; asks the kernel to resolve the missing
        ones; pushes a new table when any changed."""
        macs: dict[IPv4Address, bytes | None] = {}
        for peer, hop in self.nexthops.items():
            mac = self.kernel.neighbour_mac(hop.ip, hop.ifindex)
            if mac is None:
                self.kernel.solicit(hop.ip, hop.ifindex)
            macs[peer] = mac
        if macs != self.macs:
            for peer, mac in macs.items():
                if mac != self.macs.get(peer):
                    log.info("next hop of %s: %s", peer, mac.hex(":") if mac else "unresolved")
            self.macs = macs
            if push:
                self._push_table()

    def _await_nexthops(self, timeout: float) -> None:
        """Gives the first resolutions a moment, so that "ready" means the
        first packets are not dropped for want of a MAC."""
        deadline = time.monotonic() + timeout
        while None in self.macs.values() and time.monotonic() < deadline:
            time.sleep(0.02)
            with self.lock:
                self._refresh_macs()
        missing = [str(p) for p, m in self.macs.items() if m is None]
        if missing:
            log.warning("no MAC yet for the next hop of %s: their packets drop (no_neigh) until resolved",
                        ", ".join(missing))

    def _neighbour_loop(self) -> None:
        # Our frames bypass the neighbour table, so nothing else keeps it
        # fresh: re-confirm every next hop now and then, and follow changes.
        ticks = 0
        try:
            while not self.stopping.wait(NEIGHBOUR_INTERVAL if all(self.macs.values())
                                         else NEIGHBOUR_INTERVAL / 10):
                ticks += 1
                with self.lock:
                    if ticks % SOLICIT_EVERY == 0:
                        for hop in self.nexthops.values():
                            self.kernel.solicit(hop.ip, hop.ifindex)
                    self._refresh_macs()
        finally:
            self.kernel.close_thread()

    # ---- observability ----------------------------------------------------------

    def counters(self) -> dict[str, int]:
        """Every counter; cheap enough for any thread (a metrics scrape):
        the TUN's drops come from the status loop's last look."""
        if not self.datapath:
            return {}
        routing = self.routing.counters() if self.routing else {}
        return {**self.datapath.counters(), "tx_drop_queue_full": self.tun_queue_full, **self.icmp.counters(),
                **routing}

    def show_routes(self) -> dict:
        """The table as plain data (for the control socket): every route with
        its source, the conflicts with both sides, the refused kernel routes."""
        if self.routing is None:
            return {}
        return {"generation": self.generation, **self.routing.show()}

    def status(self) -> dict:
        return {
            "pid": os.getpid(),
            "tunnel": self.config.tunnel.name,
            "csum_offload": self.csum_offload,
            "ring_frames": self.ring_frames,
            "routes_encapsulated": self._route_totals()[0],
            "routes_direct": self._route_totals()[1],
            "reloads": dict(self.reloads),
            "config_digest": self.config_digest.hex(),  # of the file last read: what a reload waits for
            "last_reload": self.last_reload,
            "table": {"generation": self.generation, "published": list(self.published),
                      **(self.routing.summary() if self.routing else {})},
            "next_hops": {str(p): (m.hex(":") if m else None) for p, m in self.macs.items()},
            "path_mtu": self.icmp.pmtus() if self.datapath else {},
            "counters": self.counters(),
            "workers": [{k: v for k, v in c.items() if k in WORKER_KEYS}
                        for c in self.datapath.worker_counters()] if self.datapath else [],
        }

    def _write_status(self) -> None:
        if not self.status_file:
            return
        tmp = self.status_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.status()))
        tmp.replace(self.status_file)

    def _status_loop(self) -> None:
        try:
            while not self.stopping.wait(STATUS_INTERVAL):
                self.tun_queue_full = self.kernel.tx_dropped(self.tun.name) - self.tun_drops_at_start
                self._write_status()
        finally:
            self.kernel.close_thread()


def run(config_path: str, status_file: str | None = None, overrides: dict | None = None) -> int:
    """Runs the node in config_path; overrides: tunnel options from the command line."""
    heap.keep_big_blocks_mapped()
    text = read_config_text(config_path)
    config = parse_config(text, config_path, overrides)
    for w in config.warnings:
        log.warning("%s", w)
    daemon = Daemon(config, config_path, status_file, overrides)
    daemon.config_digest = digest(text)
    return daemon.run_forever()
