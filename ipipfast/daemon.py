"""One node's tunnel: wires the config, the kernel and the datapath
together, keeps next-hop MACs fresh, follows the routes (the config file on
SIGHUP or when it changes, the kernel's routes into the TUN as they change,
the node leases in etcd as they change), answers on its control socket and
tells the service manager how it is."""
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
from dataclasses import dataclass, replace
from functools import partial
from ipaddress import IPv4Address
from pathlib import Path
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

from . import _datapath, heap, metrics, tc_drops
from .config import Config, ConfigError, NodeConfig, digest, parse_config, read_config_text
from .control import RUN_DIR, ControlServer, socket_path
from .counters import Snapshot, to_json
from .icmp import IcmpErrors
from .inotify import ConfigWatcher
from .kernel import EventsLost, Kernel, Link, LinkAddress, NeighbourEvents, NextHop, ipip_module_loaded
from .kernel_routes import remove_own_routes
from .peer_hops import NO_HOP
from .routes import DatapathEntries, Kind, Table
from .routing import RTPROT_IPIPFAST, Routing
from .service import Service
from .tun import open_tun
from .underlay import UnderlayError, find_underlay
from .wake_pipe import WakePipe

if TYPE_CHECKING:
    from .etcd import EtcdSource

log = logging.getLogger(__name__)

NEIGHBOUR_INTERVAL = 1.0   # seconds between next-hop MAC checks (a tenth while any is missing)
SOLICIT_EVERY = 30         # checks between re-confirmations of every next hop
STATUS_INTERVAL = 0.5      # seconds between status-file writes
GC_INTERVAL = 60.0         # seconds between full garbage collections (see run_forever)
PUBLISHED_KEPT = 64        # table publications the status keeps (see Daemon.published)


@dataclass(frozen=True)
class Plan:
    """A merged table and what the datapath needs of it."""
    table: Table
    encapsulated: tuple[IPv4Address, ...]  # the peers its entries index, in that order
    peers: tuple[IPv4Address, ...]         # those, then every other node: IPIP is accepted from all
    addresses: tuple[int, ...]             # the peers as ints
    index: dict[int, int]                  # an encapsulated peer's position

    @classmethod
    def of(cls, table: Table, previous: Plan | None = None) -> Plan:
        """The plan of a table; with the peers of `previous` (the same
        objects) when they are the same nodes, as after most route changes:
        whatever is kept per peer then needs no second look."""
        enc = table.encapsulated_peers()
        addresses = tuple(enc + sorted(set(table.routes.vias) - set(enc)))
        if previous is not None and previous.addresses == addresses and len(previous.encapsulated) == len(enc):
            return replace(previous, table=table)
        peers = tuple(map(IPv4Address, addresses))
        return cls(table, peers[:len(enc)], peers, addresses, {p: i for i, p in enumerate(enc)})

    def entries(self) -> DatapathEntries:
        return self.table.datapath_entries(self.index)


IPIP_MODULE_LOADED = (
    "the kernel's ipip module is loaded: it owns IP protocol 4 and the name tunl0 in every network namespace, "
    "so it would take or answer the frames ipipfast handles. Remove its tunnels and unload it "
    "(modprobe -r ipip), keep it from loading again (echo 'blacklist ipip' > /etc/modprobe.d/ipipfast.conf), "
    "and start ipipfast again")


class StartError(RuntimeError):
    """The node cannot run ipipfast as it is; the message says what to do."""


class Daemon:
    def __init__(self, config: Config, config_path: str | None = None,
                 status_file: str | None = None, overrides: dict | None = None,
                 remove_device: bool = False, ready_file: str | None = None, run_dir: Path = RUN_DIR,
                 node_ip: str | None = None) -> None:
        self.config = config
        self.node_as_read = config.node  # config.node is completed from the kernel at start
        self.node_ip = node_ip  # run --node-ip, over the file's node.ip at every read
        self.service = Service(self.healthy, ready_file)
        self.remove_device = remove_device  # at exit, remove what this run created (run --remove-device)
        self.config_path = config_path
        self.overrides = overrides or {}
        self.status_file = Path(status_file) if status_file else None
        self.socket_path = socket_path(config.tunnel.name, run_dir)
        self.kernel = Kernel()
        self.stopping = threading.Event()
        self.wake = WakePipe()  # the main thread's: a source changed, a signal came
        self.stop_wake = WakePipe()  # the reader threads': set at stop
        self.reload_requested = self.stop_requested = False  # set by signal handlers: no lock (see WakePipe)
        self.routing: Routing | None = None
        self.watcher: ConfigWatcher | None = None
        self.config_digest = b""
        self.plan = Plan.of(Table.build({}, config.tunnel.mode, config.node.ip))
        self.generation = 0  # of the table the datapath has
        # Each publication: generation, CLOCK_MONOTONIC ns once the datapath has it, entries, and
        # the etcd revision its routes are as of (0 without etcd): what a put's propagation is timed by.
        self.published: deque[tuple[int, int, int, int]] = deque(maxlen=PUBLISHED_KEPT)
        self.etcd: EtcdSource | None = None
        self.etcd_revision = 0  # of the etcd routes in the table
        self._etcd_changed = False  # set by the source's thread (a plain flag, as the signal handlers')
        self.reloads: Counter[str] = Counter(applied=0, unchanged=0, refused=0)  # SIGHUP or an edit, by result
        self.last_reload: dict = {}
        self._peer_rows: tuple[object, object, dict, list] | None = None  # (peers, macs, pmtus, set_table's rows)
        self.macs: dict[IPv4Address, bytes | None] = {}
        self._macs_shown: tuple[object, dict[str, str | None]] = (None, {})  # (macs, as status shows them)
        self.nexthops: dict[IPv4Address, NextHop] = {}
        self.lock = threading.RLock()  # plan, next hops and MACs: main and neighbour threads
        self.threads: list[threading.Thread] = []
        self.loop_threads: list[threading.Thread] = []  # encap and decap of every worker
        self.errors: list[BaseException] = []
        self.metrics: WSGIServer | None = None
        self.control: ControlServer | None = None
        self.ready = False
        self.tun_fds: list[int] = []
        self.tun_created = False
        self.tc: tc_drops.Drops | None = None  # the tc drops on the underlay, once attached
        self.datapath: _datapath.Datapath | None = None
        self.csum_offload = False
        self.ring_frames = 0
        self.tun_drops_at_start = 0  # the TUN's tx_dropped when we attached (see snapshot)

    # ---- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        # First, so that a second daemon for this tunnel stops here.
        self.control = ControlServer(self.socket_path, {"status": self.status, "routes": self.routes})
        try:
            self._start()
        except BaseException:
            self.control.close()
            raise

    def _start(self) -> None:
        cfg = self.config
        if ipip_module_loaded():
            raise StartError(IPIP_MODULE_LOADED)
        cfg = self.config = replace(cfg, node=_underlay_node(self.kernel, cfg))
        self.underlay: Link = self.kernel.link(cfg.node.interface)
        if cfg.tunnel.mtu and cfg.tunnel.mtu + 20 > self.underlay.mtu:
            raise ConfigError("<config>", None, f"tunnel.mtu {cfg.tunnel.mtu} + 20 exceeds the underlay MTU "
                              f"{self.underlay.mtu} of {self.underlay.name}")
        try:
            tun = open_tun(cfg.tunnel.name, offload=cfg.tunnel.offload, queues=cfg.tunnel.workers, persist=True)
        except OSError as e:
            raise StartError(f"{cfg.tunnel.name}: {e.strerror}") from None
        self.tun_fds, self.tun_created = tun.fds, tun.created
        # A device from an earlier run (or one felix configured, as it does
        # tunl0) keeps its MTU unless the config sets one.
        mtu = cfg.tunnel.mtu or (self.underlay.mtu - 20 if tun.created else None)
        self.tun = self.kernel.setup_tun(cfg.tunnel.name, mtu)
        log.info("%s %s (mtu %d)", "created" if tun.created else "attached to the existing", self.tun.name,
                 self.tun.mtu)
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
            busy_poll_budget=cfg.tunnel.busy_poll_budget, ring_frames=cfg.tunnel.ring_frames,
            mark=tc_drops.MARK, check_source_mac=cfg.tunnel.check_source_mac)
        workers = self.datapath.add_workers(self.tun_fds)
        self.ring_frames = workers[0].ring_frames
        self.icmp = IcmpErrors(self.datapath, cfg.node.ip.ip)
        try:
            self.tc = tc_drops.attach(self.underlay.index, cfg.node.ip.ip)
        except OSError as e:  # NetlinkError is an OSError too
            log.warning("tc drops not attached (%s): the kernel also processes every IPIP frame, which costs "
                        "CPU, and IPIP that pods send leaves the node unchecked", e)
        self.outer_mtu = self.underlay.mtu  # what the datapath sends at most (see _follow_mtus)
        if cfg.etcd is not None:
            from .etcd import EtcdSource  # its client (etcd3gw, requests) costs 9 MB: only where it is used
            self.etcd = EtcdSource.from_config(cfg, on_change=self._etcd_change)
        self.routing = Routing(self.tun.index, self.underlay.index, cfg.node.ip, cfg.tunnel.mode,
                               cfg.kernel.learn, cfg.kernel.resync, self.config_path, self.wake.set,
                               etcd_key=self.etcd.key if self.etcd else None)
        # Link notifications tell every MTU change from here on; one made
        # before the subscription is read now.
        self._follow_mtus({link.index: link.mtu for link in map(self.kernel.link, (self.underlay.name, self.tun.name))})
        self.routing.set_file(cfg.routes)
        if self.etcd is not None:
            self.etcd.start()  # its first list runs beside the kernel's first dump
        self._reconcile()  # the first dump of the kernel's routes, the table, our routes
        heap.trim()  # what parsing the file and the dump left
        self._await_nexthops(timeout=2.0)
        loops: list[tuple[str, Callable[[], None]]] = []
        for i, w in enumerate(workers):
            loops += [(f"encap{i}", partial(w.run_encap, f"ipf-encap{i}")),
                      (f"decap{i}", partial(w.run_decap, f"ipf-decap{i}"))]
        loops += [("neighbours", self._neighbour_loop), ("neighbour-events", self._neighbour_event_loop),
                  ("icmp", lambda: self.icmp.run(self.stop_wake)), ("routes", self.routing.monitor.run)]
        if self.status_file:
            loops.append(("status", self._status_loop))
        if self.config_path:
            self.watcher = ConfigWatcher(self.config_path, self._config_changed)
            loops.append(("config", self.watcher.run))
        started: list[threading.Event] = []
        for name, target in loops:
            entered = threading.Event()
            t = threading.Thread(target=self._guard(target, entered), name=f"ipipfast-{name}", daemon=True)
            t.start()
            self.threads.append(t)
            started.append(entered)
        self.loop_threads = self.threads[:2 * len(workers)]
        for entered in started[:2 * len(workers)]:  # "ready" means the packet loops run
            entered.wait()
        if cfg.stats.listen:
            self.metrics = metrics.serve(self.reading, *cfg.stats.listen, peer_series=cfg.stats.peer_series)
            log.info("metrics on http://%s:%d/metrics", *self.metrics.server_address[:2])
        self.ready = True
        self.control.serve()
        self._write_status()  # its appearance tells a supervisor that the tunnel is up
        log.info("ready: %s on %s (%s), mtu %d, mode %s, %d routes encapsulated, %d direct, "
                 "inner checksums %s", cfg.tunnel.name, self.underlay.name, cfg.node.ip.ip, self.tun.mtu,
                 cfg.tunnel.mode.value, *self._route_totals(),
                 "left to the underlay device" if self.csum_offload else "computed here")

    def healthy(self) -> bool:
        """Every packet loop runs (the watchdog's keep-alive depends on it)."""
        return not self.stopping.is_set() and all(t.is_alive() for t in self.loop_threads)

    def _status_text(self) -> str:
        enc, direct = self._route_totals()
        return f"{self.config.tunnel.mode.value}: {enc} routes encapsulated, {direct} direct"

    def _guard(self, target: Callable[[], None], entered: threading.Event) -> Callable[[], None]:
        def run() -> None:
            entered.set()
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
        self.stop_wake.set()
        self.ready = False
        self.service.stopping()
        if self.etcd is not None:
            self.etcd.stop()  # its lease is left to expire: the others forward on until the TTL
        if self.datapath is not None:
            self.datapath.stop()
        if self.routing is not None:
            self.routing.monitor.stop()
        if self.watcher is not None:
            self.watcher.stop()
        for t in self.threads:
            t.join(timeout=5)
        if self.metrics:
            self.metrics.shutdown()
            self.metrics.server_close()
        if self.control:
            self.control.close()
        try:
            if self.remove_device:
                self._withdraw()
        finally:
            self._write_status()
            self.datapath = None  # frees the rings and sockets once the loops have returned
            if self.tc:
                self.tc.close()  # the filters stay (see below) and count on, unread
            # The TUN is persistent: it stays, with every route into it (ours,
            # BIRD's, felix's), as tunl0 outlives any daemon; the tc drops stay
            # too, so the kernel does not answer IPIP until the next run and
            # pods' IPIP stays in.
            for fd in self.tun_fds:
                os.close(fd)
            self.tun_fds = []
            if self.remove_device and self.tun_created:
                self.kernel.remove_link(self.tun.index)
            self.kernel.close()
            if self.routing is not None:
                self.routing.close()
            if self.watcher is not None:
                self.watcher.close()
            self.wake.close()
            self.stop_wake.close()

    def run_forever(self) -> int:
        """Runs until SIGINT/SIGTERM; SIGHUP (or an edit of the file) reloads
        the routes. The main thread reconciles: whatever changed wakes it."""
        # The kernel hands a process's signal to any of its threads, most often
        # a packet loop's; Python runs the handler in the main thread only once
        # that thread next runs bytecode, so it must be woken: the C-level
        # handler writes to the wake pipe, whichever thread it ran in.
        signal.set_wakeup_fd(self.wake.fileno_write(), warn_on_full_buffer=False)
        signal.signal(signal.SIGINT, self._stop_signal)
        signal.signal(signal.SIGTERM, self._stop_signal)
        signal.signal(signal.SIGHUP, lambda *_: self._config_changed())
        self.start()
        self.service.ready(self._status_text())
        next_gc = time.monotonic() + GC_INTERVAL
        try:
            while not (self.stop_requested or self.stopping.is_set()):
                self.wake.wait(min(next_gc, self._next_resync()) - time.monotonic())
                self.wake.clear()
                if self.stop_requested or self.stopping.is_set():
                    break
                if self.reload_requested:
                    self.reload_requested = False  # before the file is read: an edit after it asks again
                    self.service.reloading()
                    self.reload()
                    self.service.reloaded(self._status_text())
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
            signal.set_wakeup_fd(-1)  # before stop() closes the pipe
            self.stop()
        return 1 if self.errors else 0

    def _stop_signal(self, *_: object) -> None:
        self.stop_requested = True
        self.wake.set()

    def _config_changed(self) -> None:
        self.reload_requested = True
        self.wake.set()

    def _etcd_change(self) -> None:
        self._etcd_changed = True
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
                new = parse_config(text, self.config_path, self.overrides, self.node_ip)
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
        changed = [f.name for f in dataclasses.fields(new.tunnel)
                   if f.name != "mode" and getattr(new.tunnel, f.name) != getattr(self.config.tunnel, f.name)]
        changed += [name for name in ("kernel", "stats", "etcd") if getattr(new, name) != getattr(self.config, name)]
        changed += ["node"] if new.node != self.node_as_read else []
        if changed:
            log.warning("reload: %s change only on restart; the routes and the mode are reloaded",
                        ", ".join(changed))
        if new.tunnel.mode is not self.config.tunnel.mode:
            log.info("reload: mode %s -> %s", self.config.tunnel.mode, new.tunnel.mode)
        self.routing.set_file(new.routes)
        # The routing's RouteSet, which it keeps when the file's routes are the same: one copy, not two
        self.config = dataclasses.replace(self.config, routes=self.routing.file,
                                          tunnel=dataclasses.replace(self.config.tunnel, mode=new.tunnel.mode))
        self.routing.set_mode(new.tunnel.mode)
        log.info("reloaded: %d routes from the file, mode %s", len(new.routes), new.tunnel.mode)

    def _reconcile(self) -> None:
        """One pass: the kernel's changes, then the table if a source
        changed and the next hops of peers that are new or whose route
        changed, to the datapath first and then to the kernel, so that no
        packet reaches the TUN before its entry."""
        assert self.routing is not None
        self.routing.take_kernel()
        self._follow_mtus(self.routing.take_mtus())
        if self._etcd_changed and self.etcd is not None:
            self._etcd_changed = False  # before the take: a change after it asks again
            routes, self.etcd_revision, changed = self.etcd.take()
            self.routing.set_etcd(routes, changed)
        table = self.routing.build()
        moved = self.routing.resolve()
        peers = self.plan.peers  # only this thread replaces the plan: read without the lock
        peer_moved = any(int(p) in moved for p in peers)
        if table is not None or peer_moved:
            with self.lock:
                if table is not None:
                    self.plan = Plan.of(table, self.plan)  # keeps the peers' tuple when they are the same
                if self.plan.peers is not peers or peer_moved:
                    self._resolve_nexthops(self.plan)
                self._push_table()
        self.routing.program()

    def _follow_mtus(self, mtus: dict[int, int]) -> None:
        """MTUs of the underlay and the TUN that changed while running. The
        underlay's is the largest outer packet: the datapath sends no larger
        one from then on (a raise stops at what its rings' slots hold). The
        TUN's is the inner MTU, someone else's to set (felix sets tunl0's):
        taken as it is."""
        assert self.datapath is not None
        underlay, tun = mtus.get(self.underlay.index, self.underlay.mtu), mtus.get(self.tun.index, self.tun.mtu)
        if underlay == self.underlay.mtu and tun == self.tun.mtu:
            return
        if underlay != self.underlay.mtu:
            old, self.outer_mtu = self.underlay.mtu, self.datapath.set_mtu(underlay)
            self.underlay = replace(self.underlay, mtu=underlay)
            if self.outer_mtu < underlay:
                log.warning("%s: MTU %d -> %d, but the tunnel sends outer packets up to %d bytes only, what its "
                            "rings' slots (sized for the MTU at start) hold, until a restart", self.underlay.name,
                            old, underlay, self.outer_mtu)
            else:
                log.info("%s: MTU %d -> %d: outer packets up to %d bytes", self.underlay.name, old, underlay,
                         underlay)
        if tun != self.tun.mtu:
            log.info("%s: MTU %d -> %d", self.tun.name, self.tun.mtu, tun)
            self.tun = replace(self.tun, mtu=tun)
        if self.tun.mtu + 20 > self.outer_mtu:
            log.warning("%s's MTU %d does not fit in the underlay's %d: inner packets over %d bytes are answered "
                        "with fragmentation needed when they have DF, and dropped (too_big) when not",
                        self.tun.name, self.tun.mtu, self.outer_mtu, self.outer_mtu - 20)

    def _route_totals(self) -> tuple[int, int]:
        """(encapsulated, direct) routes in the table."""
        direct = self.plan.table.kinds.count(Kind.DIRECT)
        return len(self.plan.table) - direct, direct

    def _withdraw(self) -> None:
        """Removes the tc drops and our direct routes (routes into the TUN go
        with it, when it is removed)."""
        if self.tc:
            tc_drops.detach(self.underlay.index)
        if self.routing is not None:
            self.routing.withdraw_direct()

    def _push_table(self) -> None:
        assert self.datapath is not None
        plan, pmtus = self.plan, self.icmp.learned()
        cached = self._peer_rows
        if cached is not None and cached[0] is plan.peers and cached[1] is self.macs and cached[2] == pmtus:
            peers = cached[3]  # a thousand peers' rows cost more than a route change
        else:
            peers = [(a, self.macs.get(p), pmtus.get(p, 0)) for a, p in zip(plan.addresses, plan.peers)]
            self._peer_rows = (plan.peers, self.macs, pmtus, peers)
        entries = plan.entries()
        self.generation = self.datapath.set_table(entries, peers, self.underlay.mac)
        self.published.append((self.generation, time.monotonic_ns(), len(entries), self.etcd_revision))

    # ---- next hops ------------------------------------------------------------

    def _resolve_nexthops(self, plan: Plan) -> None:
        """The underlay next hop of every peer, as routing has it from the
        kernel's route to the peer: of those we only take IPIP from too,
        since decap checks a frame's source MAC against it. A peer the
        underlay does not reach has none: its packets drop (no_neigh)."""
        assert self.routing is not None
        nexthops = {}
        for peer in plan.peers:
            hop = self.routing.next_hop(int(peer))
            if hop != NO_HOP:
                nexthops[peer] = NextHop(peer, IPv4Address(hop), self.underlay.index)
        self.nexthops = nexthops
        self._refresh_macs(push=False)

    def _refresh_macs(self, push: bool = True) -> None:
        """Reads every next hop's MAC (one read of the underlay's neighbour
        table: a thousand peers behind one router share one next hop), and
        the underlay's own; asks the kernel to resolve the missing ones;
        pushes a new table when any changed."""
        known = self.kernel.neighbour_macs(self.underlay.index)  # every hop is on the underlay
        macs = {peer: known.get(hop.ip) for peer, hop in self.nexthops.items()}
        for ip in {hop.ip for peer, hop in self.nexthops.items() if macs[peer] is None}:
            self.kernel.solicit(ip, self.underlay.index)
        self._set_macs(macs, self.kernel.link(self.underlay.name).mac, push)

    def _set_macs(self, macs: dict[IPv4Address, bytes | None], own: bytes | None = None, push: bool = True) -> None:
        """Takes the next hops' MACs and the underlay's own (own: None, as it
        was): a frame's source must be the MAC the underlay has now, which a
        peer checks its frames against."""
        changed = False
        if own is not None and own != self.underlay.mac:
            log.info("%s's MAC: %s", self.underlay.name, own.hex(":"))
            self.underlay = replace(self.underlay, mac=own)
            changed = True
        if macs != self.macs:
            moved: dict[bytes | None, list[IPv4Address]] = {}
            for peer, mac in macs.items():
                if mac != self.macs.get(peer):
                    moved.setdefault(mac, []).append(peer)
            for mac, peers in moved.items():  # a line per MAC, not per peer: a router's is a thousand peers'
                more = f" and {len(peers) - 3} more" if len(peers) > 3 else ""
                log.info("next hop of %s%s: %s", ", ".join(map(str, peers[:3])), more,
                         mac.hex(":") if mac else "unresolved")
            self.macs = macs
            changed = True
        if changed and push:
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
                        for ip, ifindex in {(hop.ip, hop.ifindex) for hop in self.nexthops.values()}:
                            self.kernel.solicit(ip, ifindex)
                    self._refresh_macs()
        finally:
            self.kernel.close_thread()

    def _neighbour_event_loop(self) -> None:
        """Follows a next hop's new MAC as soon as the kernel learns it (a
        peer that moved announces itself with a gratuitous ARP), and the
        underlay's own when it takes a new one, instead of at the next
        periodic check. Only usable MACs are taken from events: an entry
        that fails or goes is the periodic check's to handle."""
        try:
            with NeighbourEvents() as events:
                while not self.stopping.is_set():
                    try:
                        got = events.read(stop=self.stop_wake)
                    except EventsLost:
                        with self.lock:
                            self._refresh_macs()
                        continue
                    own = [e.mac for e in got if isinstance(e, LinkAddress) and e.ifindex == self.underlay.index]
                    learned = {(n.ip, n.ifindex): n.mac for n in got if not isinstance(n, LinkAddress) and n.mac}
                    if learned or own:
                        with self.lock:
                            self._set_macs({p: learned.get((h.ip, h.ifindex), self.macs.get(p))
                                            for p, h in self.nexthops.items()}, own[-1] if own else None)
        finally:
            self.kernel.close_thread()

    # ---- observability ----------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """Every counter, read once; cheap enough for any thread (a scrape,
        the control socket)."""
        assert self.datapath is not None
        queue_full = self.kernel.tx_dropped(self.tun.name) - self.tun_drops_at_start
        foreign_ipip = self.tc.foreign_ipip() if self.tc else 0
        return replace(self.datapath.snapshot(), queue_full=queue_full, foreign_ipip=foreign_ipip)

    def reading(self) -> metrics.Reading:
        assert self.routing is not None
        etcd = conflicts = None
        if self.etcd is not None:
            etcd = self.etcd.counters()
            conflicts = [(str(cidr), c.key, c.holder) for cidr, c in self.etcd.conflicts().items()]
        return metrics.Reading(self.snapshot(), self.routing.counts(), dict(self.reloads), self.routing.counters(),
                               etcd, conflicts or ())

    def status(self) -> dict:
        """What the status file and the control socket's status say: the
        node's state and one snapshot of its counters."""
        with self.lock:
            macs = self.macs  # replaced whole, never changed in place
            enc, direct = self._route_totals()
        shown = self._macs_shown
        if shown[0] is not macs:  # a thousand peers' MACs are rendered once, not at every status
            shown = self._macs_shown = (macs, {str(p): (m.hex(":") if m else None) for p, m in macs.items()})
        snap = self.snapshot()
        return {
            "pid": os.getpid(),
            "tunnel": self.config.tunnel.name,
            "ready": self.ready,
            "mode": self.config.tunnel.mode.value,
            "generation": snap.generation,
            "reloads": dict(self.reloads),
            "config_digest": self.config_digest.hex(),  # of the file last read: what a reload waits for
            "last_reload": self.last_reload,
            "csum_offload": self.csum_offload,
            "ring_frames": self.ring_frames,
            # The TUN's (the inner MTU), the underlay's, and the largest outer packet the datapath sends.
            "mtu": {"tun": self.tun.mtu, "underlay": self.underlay.mtu, "outer": self.outer_mtu},
            "routes_encapsulated": enc,
            "routes_direct": direct,
            "table": {"generation": self.generation, "published": list(self.published),
                      "etcd_revision": self.etcd_revision, **(self.routing.summary() if self.routing else {})},
            **({"etcd": {**self.etcd.status(), "counters": self.etcd.counters()}} if self.etcd else {}),
            "kernel_routes": self.routing.counters() if self.routing else {},
            "next_hops": shown[1],
            "path_mtu": self.icmp.pmtus(),
            "counters": to_json(snap),
        }

    def routes(self) -> dict:
        """Each route with its source and how it is carried, its next hop as
        the datapath sees it; the conflicts and the refused kernel routes."""
        assert self.routing is not None
        with self.lock:
            macs = dict(self.macs)
        pmtus = self.icmp.pmtus()
        shown = self.routing.show()
        for r in shown["routes"]:
            via = IPv4Address(r["node"])
            if r["kind"] == "direct":
                mac, state = None, "kernel"  # the kernel's own neighbour table resolves it
            elif via not in macs:
                mac, state = None, "not_on_underlay"  # its packets drop (no_neigh): see _resolve_nexthops
            else:
                mac = macs[via].hex(":") if macs[via] else None
                state = "resolved" if mac else "unresolved"
            r.update(mac=mac, mac_state=state, path_mtu=pmtus.get(r["node"]))
        return {"tunnel": self.config.tunnel.name, "generation": self.generation, **shown}

    def _write_status(self) -> None:
        if not self.status_file:
            return
        tmp = self.status_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.status()))
        tmp.replace(self.status_file)

    def _status_loop(self) -> None:
        while not self.stopping.wait(STATUS_INTERVAL):
            self._write_status()


def _underlay_node(kernel: Kernel, config: Config) -> NodeConfig:
    """config.node with the underlay's interface and prefix length found."""
    try:
        return find_underlay(config.node, kernel.holders(config.node.ip.ip), config.tunnel.mode)
    except UnderlayError as e:
        raise StartError(str(e)) from None


def run(config_path: str, status_file: str | None = None, overrides: dict | None = None,
        remove_device: bool = False, ready_file: str | None = None, run_dir: Path = RUN_DIR,
        node_ip: str | None = None) -> int:
    """Runs the node in config_path; overrides: tunnel options from the
    command line; node_ip: its --node-ip."""
    heap.keep_big_blocks_mapped()
    text = read_config_text(config_path)
    daemon = Daemon(parse_config(text, config_path, overrides, node_ip), config_path, status_file, overrides,
                    remove_device=remove_device, ready_file=ready_file, run_dir=run_dir, node_ip=node_ip)
    daemon.config_digest = digest(text)
    del text  # the file's text (4.6 MB at 100k routes) is not needed while the daemon runs
    return daemon.run_forever()


def down(config: Config) -> list[str]:
    """Removes what ipipfast puts on a node: its TUN (and with it every route
    into it), its direct routes on the underlay, the tc drops. Returns what
    it removed; refuses, removing nothing, while a daemon holds the device
    (its tc egress drop is what keeps pods' IPIP in)."""
    kernel = Kernel()
    removed: list[str] = []
    try:
        underlay = kernel.link(_underlay_node(kernel, config).interface)
        try:
            tun: Link | None = kernel.link(config.tunnel.name)
        except LookupError:
            tun = None
        if tun and kernel.tun_attached(tun.name):
            raise StartError(f"{tun.name} is held by a running ipipfast: stop it first")
        hooks = tc_drops.detach(underlay.index)
        if hooks:
            removed.append(f"the tc {' and '.join(hooks)} drops on {underlay.name}")
        n = remove_own_routes(underlay.index, RTPROT_IPIPFAST)
        if n:
            removed.append(f"{n} direct routes on {underlay.name}")
        if tun:
            kernel.remove_link(tun.index)
            removed.append(f"{tun.name} and the routes into it")
        return removed
    finally:
        kernel.close()
