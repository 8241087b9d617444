"""One node's tunnel: wires the config, the kernel and the datapath
together, keeps next-hop MACs fresh, reloads routes on SIGHUP and cleans up
on SIGINT/SIGTERM."""
from __future__ import annotations

import gc
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from ipaddress import IPv4Address
from pathlib import Path
from wsgiref.simple_server import WSGIServer

from . import _datapath, metrics, tc_drops
from .config import Config, ConfigError, load_config
from .control import RUN_DIR, ControlServer, socket_path
from .counters import Snapshot, to_json
from .icmp import IcmpErrors
from .kernel import EventsLost, Kernel, Link, LinkAddress, NeighbourEvents, NextHop, ipip_module_loaded
from .routes import RouteTable
from .service import Service
from .tun import open_tun

log = logging.getLogger(__name__)

NEIGHBOUR_INTERVAL = 1.0   # seconds between next-hop MAC checks (a tenth while any is missing)
SOLICIT_EVERY = 30         # checks between re-confirmations of every next hop
STATUS_INTERVAL = 0.5      # seconds between status-file writes
GC_INTERVAL = 60.0         # seconds between full garbage collections (see run_forever)
ROUTE_SOURCE = "file"      # where routes come from: the config file (kernel routes and etcd are to come)


@dataclass(frozen=True)
class Plan:
    """What a route table means for this node under its ipipMode."""
    table: RouteTable         # everything the config names
    encapsulated: RouteTable  # into the TUN, through the datapath
    direct: RouteTable        # routed on the underlay unencapsulated (CrossSubnet, Never)

    @classmethod
    def of(cls, config: Config) -> Plan:
        enc, direct = config.routes.split(config.tunnel.mode, config.node.ip)
        return cls(config.routes, enc, direct)

    def datapath_peers(self) -> list[IPv4Address]:
        """The encapsulated table's peers (its route entries index them)
        followed by the other known nodes: IPIP is accepted from all of them."""
        extra = sorted(set(self.table.peers) - set(self.encapsulated.peers))
        return list(self.encapsulated.peers) + extra


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
                 remove_device: bool = False, ready_file: str | None = None, run_dir: Path = RUN_DIR) -> None:
        self.config = config
        self.service = Service(self.healthy, ready_file)
        self.remove_device = remove_device  # at exit, remove what this run created (run --remove-device)
        self.config_path = config_path
        self.overrides = overrides or {}
        self.status_file = Path(status_file) if status_file else None
        self.socket_path = socket_path(config.tunnel.name, run_dir)
        self.kernel = Kernel()
        self.stopping = threading.Event()
        self.reload_requested = threading.Event()
        self.plan = Plan.of(config)
        self.macs: dict[IPv4Address, bytes | None] = {}
        self.nexthops: dict[IPv4Address, NextHop] = {}
        self.lock = threading.RLock()  # plan, next hops and MACs: main and neighbour threads
        self.threads: list[threading.Thread] = []
        self.loop_threads: list[threading.Thread] = []  # encap and decap of every worker
        self.errors: list[BaseException] = []
        self.metrics: WSGIServer | None = None
        self.control: ControlServer | None = None
        self.ready = False
        self.reloads = {"applied": 0, "refused": 0}
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
            ring_frames=cfg.tunnel.ring_frames, mark=tc_drops.MARK, check_source_mac=cfg.tunnel.check_source_mac)
        workers = self.datapath.add_workers(self.tun_fds)
        self.ring_frames = workers[0].ring_frames
        self.icmp = IcmpErrors(self.datapath, cfg.node.ip.ip)
        try:
            self.tc = tc_drops.attach(self.underlay.index, cfg.node.ip.ip)
        except OSError as e:  # NetlinkError is an OSError too
            log.warning("tc drops not attached (%s): the kernel also processes every IPIP frame, which costs "
                        "CPU, and IPIP that pods send leaves the node unchecked", e)
        with self.lock:
            self._apply(self.plan, previous=None)
        self._await_nexthops(timeout=2.0)
        loops: list[tuple[str, Callable[[], None]]] = []
        for i, w in enumerate(workers):
            loops += [(f"encap{i}", partial(w.run_encap, f"ipf-encap{i}")),
                      (f"decap{i}", partial(w.run_decap, f"ipf-decap{i}"))]
        loops += [("neighbours", self._neighbour_loop), ("neighbour-events", self._neighbour_event_loop),
                  ("status", self._status_loop),
                  ("icmp", lambda: self.icmp.run(self.stopping))]
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
            self.metrics = metrics.serve(self.reading, *cfg.stats.listen)
            log.info("metrics on http://%s:%d/metrics", *self.metrics.server_address[:2])
        self.ready = True
        self.control.serve()
        self._write_status()  # its appearance tells a supervisor that the tunnel is up
        log.info("ready: %s on %s (%s), mtu %d, mode %s, %d routes encapsulated, %d direct, "
                 "inner checksums %s", cfg.tunnel.name, self.underlay.name, cfg.node.ip.ip, self.tun.mtu,
                 cfg.tunnel.mode.value, len(self.plan.encapsulated.routes), len(self.plan.direct.routes),
                 "left to the underlay device" if self.csum_offload else "computed here")

    def healthy(self) -> bool:
        """Every packet loop runs (the watchdog's keep-alive depends on it)."""
        return not self.stopping.is_set() and all(t.is_alive() for t in self.loop_threads)

    def _status_text(self) -> str:
        return (f"{self.config.tunnel.mode.value}: {len(self.plan.encapsulated.routes)} routes encapsulated, "
                f"{len(self.plan.direct.routes)} direct")

    def _guard(self, target: Callable[[], None], entered: threading.Event) -> Callable[[], None]:
        def run() -> None:
            entered.set()
            try:
                target()
            except BaseException as e:  # a dead loop must take the daemon down, not linger
                log.exception("%s failed", threading.current_thread().name)
                self.errors.append(e)
                self.stopping.set()
        return run

    def stop(self) -> None:
        self.stopping.set()
        self.ready = False
        self.service.stopping()
        if self.datapath is not None:
            self.datapath.stop()
        for t in self.threads:
            t.join(timeout=5)
        if self.metrics:
            self.metrics.shutdown()
            self.metrics.server_close()
        if self.control:
            self.control.close()
        try:
            if self.remove_device:
                self._withdraw(self.plan)
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

    def run_forever(self) -> int:
        """Runs until SIGINT/SIGTERM; SIGHUP reloads the routes."""
        signal.signal(signal.SIGINT, lambda *_: self.stopping.set())
        signal.signal(signal.SIGTERM, lambda *_: self.stopping.set())
        signal.signal(signal.SIGHUP, lambda *_: self.reload_requested.set())
        self.start()
        self.service.ready(self._status_text())
        next_gc = time.monotonic() + GC_INTERVAL
        try:
            while not self.stopping.wait(0.2):
                if self.reload_requested.is_set():
                    self.reload_requested.clear()
                    self.service.reloading()
                    self.reload()
                    self.service.reloaded(self._status_text())
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

    # ---- routes ---------------------------------------------------------------

    def reload(self) -> bool:
        """Re-reads the config file's routes. A bad file is refused with its
        line and the running table stays."""
        if not self.config_path:
            return False
        try:
            new = load_config(self.config_path, self.overrides)
        except (ConfigError, OSError) as e:
            log.error("reload refused, keeping the running table: %s", e)
            self.reloads["refused"] += 1
            return False
        if (new.node, new.tunnel) != (self.config.node, self.config.tunnel):
            log.warning("reload: node and tunnel settings change only on restart; routes reloaded")
        plan = Plan(new.routes, *new.routes.split(self.config.tunnel.mode, self.config.node.ip))
        with self.lock:
            previous, self.plan = self.plan, plan
            self._apply(plan, previous)
            self.reloads["applied"] += 1  # after the table it publishes: its generation has moved on
        log.info("reloaded: %d routes encapsulated, %d direct",
                 len(plan.encapsulated.routes), len(plan.direct.routes))
        return True

    def _apply(self, plan: Plan, previous: Plan | None) -> None:
        """Programs the datapath first, then the kernel routes that lead to
        it, so that no packet reaches the TUN before its table entry."""
        self._resolve_nexthops(plan)
        self._push_table()
        old_enc = previous.encapsulated if previous else RouteTable()
        old_dir = previous.direct if previous else RouteTable()
        added, removed = old_enc.diff(plan.encapsulated)
        self.kernel.remove_routes(self.tun.index, [r.cidr for r in removed - added])
        self.kernel.replace_routes(self.tun.index, [r.cidr for r in added], self.config.node.ip.ip)
        added, removed = old_dir.diff(plan.direct)
        self.kernel.remove_direct_routes([r.cidr for r in removed - added], self.underlay.index)
        self.kernel.replace_direct_routes([(r.cidr, r.via) for r in added], self.underlay.index)

    def _withdraw(self, plan: Plan) -> None:
        """Removes the tc drops and our direct routes (routes into the TUN go
        with it, when it is removed)."""
        if self.tc:
            tc_drops.detach(self.underlay.index)
        self.kernel.remove_direct_routes([r.cidr for r in plan.direct.routes], self.underlay.index)

    def _push_table(self) -> None:
        assert self.datapath is not None
        peers = self.plan.datapath_peers()
        self.datapath.set_table(self.plan.encapsulated.datapath_entries(),
                                [(int(p), self.macs.get(p), self.icmp.pmtu(p)) for p in peers], self.underlay.mac)

    # ---- next hops ------------------------------------------------------------

    def _resolve_nexthops(self, plan: Plan) -> None:
        # Every peer's, those we only take IPIP from too: decap checks a
        # frame's source MAC against it.
        self.nexthops = {}
        for peer in plan.datapath_peers():
            hop = self.kernel.nexthop(peer)
            if hop.ifindex != self.underlay.index:
                log.warning("peer %s is reached through ifindex %d, not the underlay %s: "
                            "its packets are dropped (no_neigh)", peer, hop.ifindex, self.underlay.name)
                continue
            self.nexthops[peer] = hop
        self._refresh_macs(push=False)

    def _refresh_macs(self, push: bool = True) -> None:
        """Reads every next hop's MAC, and the underlay's own; asks the kernel
        to resolve the missing ones; pushes a new table when any changed."""
        macs: dict[IPv4Address, bytes | None] = {}
        for peer, hop in self.nexthops.items():
            mac = self.kernel.neighbour_mac(hop.ip, hop.ifindex)
            if mac is None:
                self.kernel.solicit(hop.ip, hop.ifindex)
            macs[peer] = mac
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
            for peer, mac in macs.items():
                if mac != self.macs.get(peer):
                    log.info("next hop of %s: %s", peer, mac.hex(":") if mac else "unresolved")
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
                        for hop in self.nexthops.values():
                            self.kernel.solicit(hop.ip, hop.ifindex)
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
                        got = events.read(timeout=0.2)
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
        with self.lock:
            plan = self.plan
        routes = {(ROUTE_SOURCE, "encapsulated"): len(plan.encapsulated.routes),
                  (ROUTE_SOURCE, "direct"): len(plan.direct.routes)}
        return metrics.Reading(self.snapshot(), routes, dict(self.reloads))

    def status(self) -> dict:
        """What the status file and the control socket's status say: the
        node's state and one snapshot of its counters."""
        with self.lock:
            plan, macs = self.plan, dict(self.macs)
        snap = self.snapshot()
        return {
            "pid": os.getpid(),
            "tunnel": self.config.tunnel.name,
            "ready": self.ready,
            "mode": self.config.tunnel.mode.value,
            "generation": snap.generation,
            "reloads": dict(self.reloads),
            "csum_offload": self.csum_offload,
            "ring_frames": self.ring_frames,
            "routes_encapsulated": len(plan.encapsulated.routes),
            "routes_direct": len(plan.direct.routes),
            "next_hops": {str(p): (m.hex(":") if m else None) for p, m in macs.items()},
            "path_mtu": self.icmp.pmtus(),
            "counters": to_json(snap),
        }

    def routes(self) -> dict:
        """Each route with its next hop as the datapath sees it."""
        with self.lock:
            plan, macs, generation = self.plan, dict(self.macs), self.datapath.snapshot().generation
        pmtus = self.icmp.pmtus()
        out = []
        for kind, table in (("encapsulated", plan.encapsulated), ("direct", plan.direct)):
            for r in table.routes:
                if kind == "direct":
                    mac, state = None, "kernel"  # the kernel's own neighbour table resolves it
                elif r.via not in macs:
                    mac, state = None, "not_on_underlay"  # its packets drop (no_neigh): see _resolve_nexthops
                else:
                    mac = macs[r.via].hex(":") if macs[r.via] else None
                    state = "resolved" if mac else "unresolved"
                out.append({"cidr": str(r.cidr), "node": str(r.via), "kind": kind, "source": ROUTE_SOURCE,
                            "mac": mac, "mac_state": state, "path_mtu": pmtus.get(str(r.via))})
        return {"tunnel": self.config.tunnel.name, "generation": generation, "routes": out}

    def _write_status(self) -> None:
        if not self.status_file:
            return
        tmp = self.status_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.status()))
        tmp.replace(self.status_file)

    def _status_loop(self) -> None:
        while not self.stopping.wait(STATUS_INTERVAL):
            self._write_status()


def run(config_path: str, status_file: str | None = None, overrides: dict | None = None,
        remove_device: bool = False, ready_file: str | None = None, run_dir: Path = RUN_DIR) -> int:
    """Runs the node in config_path; overrides: tunnel options from the command line."""
    config = load_config(config_path, overrides)
    for w in config.warnings:
        log.warning("%s", w)
    return Daemon(config, config_path, status_file, overrides, remove_device=remove_device, ready_file=ready_file,
                  run_dir=run_dir).run_forever()


def down(config: Config) -> list[str]:
    """Removes what ipipfast puts on a node: its TUN (and with it every route
    into it), its direct routes on the underlay, the tc drops. Returns what
    it removed; refuses, removing nothing, while a daemon holds the device
    (its tc egress drop is what keeps pods' IPIP in)."""
    kernel = Kernel()
    removed: list[str] = []
    try:
        underlay = kernel.link(config.node.interface)
        try:
            tun: Link | None = kernel.link(config.tunnel.name)
        except LookupError:
            tun = None
        if tun and kernel.tun_attached(tun.name):
            raise StartError(f"{tun.name} is held by a running ipipfast: stop it first")
        hooks = tc_drops.detach(underlay.index)
        if hooks:
            removed.append(f"the tc {' and '.join(hooks)} drops on {underlay.name}")
        n = kernel.remove_own_routes(underlay.index)
        if n:
            removed.append(f"{n} direct routes on {underlay.name}")
        if tun:
            kernel.remove_link(tun.index)
            removed.append(f"{tun.name} and the routes into it")
        return removed
    finally:
        kernel.close()
