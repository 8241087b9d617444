"""The node's routing: route sources in, the merged table out to the
datapath and our routes out to the kernel. Everything here runs on the
daemon's main thread, which the sources wake (RouteMonitor, SIGHUP, the
config watcher); one pass there is: take the kernel's notifications (after a
dump when one is due), rebuild the table if a source changed, ask the kernel
for the next hops of the peers that are new or whose route changed
(peer_hops), push the table to the datapath (the daemon does that, under its
lock), then write only the kernel routes that differ.

Our routes carry rtm_protocol 0xbf, so `ip route` shows whose they are
("proto 191", or a name given in /etc/iproute2/rt_protos.d/):
    <cidr> via <node> dev <tun> proto 191 src <node ip> onlink  (encapsulated)
    <cidr> via <node> dev <underlay> proto 191                 (direct, the node on the link)
    <cidr> via <gateway> dev <underlay> proto 191 onlink       (direct, the node behind a router)
A direct route follows the kernel's route to its node, as BIRD resolves a
next hop that is not on-link: a node in another subnet is reached through
the gateway of the route to it (whose router must know the pod CIDR, as in
Calico's BGP mode), and one the underlay does not reach gets no route.
A route someone else holds at the key we would write (the same CIDR at
metric 0) is never replaced or deleted: an add is exclusive, a delete
matches our protocol only; the CIDR is shown as held by that route. A move
between the TUN and the underlay is one replace.
"""
from __future__ import annotations

import errno
import logging
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path

from . import heap, rtnl
from .intmap import IntMap
from .kernel_routes import DEV_TUN, DEV_UNDERLAY, KernelRoutes, RouteMonitor, protocol_name
from .peer_hops import NO_HOP, PeerHops
from .routes import Kind, Mode, RouteSet, Side, Source, Table, cidr_text, network_of

log = logging.getLogger(__name__)

# Routes we install carry this protocol number, so that they are ours to
# remove (and recognisable in `ip route`: "proto 191"). Values above 0xbf
# are unassigned in rt_protos; Calico's bird routes use "proto bird" (12).
RTPROT_IPIPFAST = 0xBF
RETRY_AFTER = 10.0  # seconds before a resync retries writes the kernel refused
_KIND_NAMES = {Kind.ENCAPSULATED: "encapsulated", Kind.DIRECT: "direct", Kind.FOREIGN: "encapsulated"}


class Routing:
    def __init__(self, tun: int, underlay: int, node: IPv4Interface, mode: Mode, learn: bool, resync: int,
                 config_path: str | None, wake: Callable[[], None],
                 etcd_key: Callable[[int], str] | None = None) -> None:
        """etcd_key: with an etcd source, the key (CIDR key -> etcd key) that
        show names as the origin of its routes."""
        self.tun, self.underlay, self.node = tun, underlay, node
        self.mode, self.learn, self.resync_interval = mode, learn, resync
        self.config_name = Path(config_path).name if config_path else "<config>"
        self.writer = rtnl.RouteSocket(RTPROT_IPIPFAST)
        self.mirror = KernelRoutes(tun, underlay, int(node.ip), RTPROT_IPIPFAST)
        self.hops = PeerHops(underlay)
        # Subscribed before the first dump: every change after it is queued.
        self.monitor = RouteMonitor(self.writer, wake)
        self.file = RouteSet()
        self.etcd = RouteSet()
        self.etcd_key = etcd_key
        self.table = Table.build({}, mode, node)
        self._dirty = True           # a source or the mode changed since the table was built
        self._full = True            # diff every route of ours next time (start, file or mode change)
        self._candidates: set[int] = set()  # else only these CIDR keys
        self._retry: set[int] = set()       # keys whose write failed: tried again after the next dump
        self._next_resync = 0.0      # monotonic; 0: at once
        self.write_errors = 0        # route writes the kernel refused for another reason than EEXIST/ESRCH

    def close(self) -> None:
        self.monitor.close()
        self.writer.close()

    # ---- sources -------------------------------------------------------------------

    def set_file(self, routes: RouteSet) -> None:
        """The file's routes (after a reload: every peer's next hop is asked again)."""
        self.hops.all_stale()
        if routes != self.file or routes.details != self.file.details:  # arrays: no 100k ints at once
            self.file = routes
            self._dirty = self._full = True

    def set_etcd(self, routes: RouteSet, changed: Iterable[int] | None = None) -> None:
        """etcd's routes (details: their mod revisions); changed: the CIDR
        keys that may differ from the last set (None: any), so that only
        those of our kernel routes are compared."""
        if routes is self.etcd:
            return
        self.etcd = routes
        self._dirty = True
        if changed is None:
            self._full = True
        else:
            self._candidates.update(changed)

    def set_mode(self, mode: Mode) -> None:
        if mode is not self.mode:
            self.mode = mode
            self._dirty = self._full = True

    def take_kernel(self, now: float | None = None) -> None:
        """The kernel's notifications since the last pass, after a full dump
        when one is due: at start, every kernel.resync seconds, after lost
        notifications and after one of our links went down or up (IPv4
        flushes a down device's routes without telling)."""
        queue, lost = self.monitor.take()
        now = time.monotonic() if now is None else now
        if lost or now >= self._next_resync:
            # Queued notifications are newer than the last dump (and, after a
            # loss, than the drain), so replaying them over this one is right.
            self.mirror.load(self.writer.dump)
            self.hops.all_stale()
            heap.trim()
            self._next_resync = now + self.resync_interval if self.resync_interval else float("inf")
            self._candidates |= self._retry
            self._retry = set()
        self.hops.routes_changed(queue)
        if self.mirror.apply(queue):
            self._next_resync = 0.0
            self.monitor.wake()
        changed = self.mirror.foreign_changed | self.mirror.own_changed
        if changed:
            self._candidates |= changed
            self.mirror.own_changed = set()
            self._dirty |= bool(self.mirror.foreign_changed) and self.learn

    def take_mtus(self) -> dict[int, int]:
        """The TUN's and the underlay's MTUs (by ifindex) that link
        notifications told since the last call."""
        mtus, self.mirror.mtus = self.mirror.mtus, {}
        return mtus

    def next_resync(self) -> float:
        """When the next dump is due (monotonic seconds)."""
        return self._next_resync

    # ---- the table -------------------------------------------------------------------

    def build(self) -> Table | None:
        """The merged table if a source changed since the last one, else None."""
        if not self._dirty:
            return None
        sources = {Source.FILE: self.file, Source.ETCD: self.etcd}
        kernel = self.mirror.source()  # consumes the foreign changes
        if self.learn:
            sources[Source.KERNEL] = kernel
        self.table = Table.build(sources, self.mode, self.node)
        self._dirty = False
        self.hops.track(self.table.routes.vias)
        return self.table

    def resolve(self) -> set[int]:
        """Asks the kernel for the next hops of the peers that are new or
        whose route may have changed; returns the peers whose next hop
        changed. Their direct routes are written again at program()."""
        moved = self.hops.resolve(self.writer.lookup)
        if moved and not self._full:
            t = self.table
            self._candidates.update(key for key, via, kind in zip(t.routes.keys, t.routes.vias, t.kinds)
                                    if kind == Kind.DIRECT and via in moved)
        return moved

    def next_hop(self, peer: int) -> int:
        """Where packets to peer go on the underlay (the peer, or the gateway
        of the kernel's route to it), or NO_HOP."""
        return self.hops.get(peer)

    # ---- our kernel routes -------------------------------------------------------------

    def program(self) -> None:
        """Writes the kernel routes of ours that differ from the table: after
        the datapath has the table, so no packet enters the TUN before its entry."""
        if self._full:
            self._program_all()
        elif self._candidates:
            self._program_keys(self._candidates)
        self._full, self._candidates = False, set()

    def _desired(self) -> tuple[array, array]:
        """Our routes as the table wants them: CIDR keys and via | device << 32."""
        t = self.table
        if Kind.FOREIGN not in t.kinds and Kind.DIRECT not in t.kinds:
            return t.routes.keys, array("Q", t.routes.vias)  # all into the TUN (DEV_TUN is 0)
        keys, values = array("Q"), array("Q")
        for key, via, kind in zip(t.routes.keys, t.routes.vias, t.kinds):
            want = self._want(via, kind)
            if want is not None:
                keys.append(key)
                values.append(want)
        return keys, values

    def _program_all(self) -> None:
        """The whole table against the mirror: a walk of both in key order
        whose writes go out as it yields them; then the desired arrays become
        the mirror's base, and only what failed is told apart."""
        keys, values = self._desired()
        own, blocked = self.mirror.state.own, self.mirror.blocked
        if own.same(keys, values) and not blocked:
            return
        failures = self.writer.write(self._walk(keys, values, own, blocked))
        before = {op.dst << 6 | op.dst_len: own.get(op.dst << 6 | op.dst_len) for op, _, _ in failures}
        own.replace(keys, values)
        for key in blocked:
            own.pop(key)
        self._failed(failures, before)

    def _walk(self, keys: array, values: array, own: IntMap, blocked: set[int]) -> Iterator[rtnl.RouteOp]:
        have = own.items()
        h = next(have, None)
        for key, want in zip(keys, values):
            while h is not None and h[0] < key:
                yield self._op(h[0], None, h[1])
                h = next(have, None)
            current = None
            if h is not None and h[0] == key:
                current = h[1]
                h = next(have, None)
            if current != want and key not in blocked:
                yield self._op(key, want, current)
        while h is not None:
            yield self._op(h[0], None, h[1])
            h = next(have, None)

    def _program_keys(self, keys: set[int]) -> None:
        t, own, blocked = self.table, self.mirror.state.own, self.mirror.blocked
        ops = []
        for key in sorted(keys):
            i = t.routes.index(key)
            want = None if i < 0 else self._want(t.routes.vias[i], t.kinds[i])
            have = own.get(key)
            if want != have and (want is None or key not in blocked):
                ops.append(self._op(key, want, have))
        if not ops:
            return
        failures = self.writer.write(ops)
        failed = {op for op, _, _ in failures}
        before = {op.dst << 6 | op.dst_len: own.get(op.dst << 6 | op.dst_len) for op in failed}
        for op in ops:
            if op not in failed:
                self.mirror.wrote(op.dst << 6 | op.dst_len, self._value(op))
        self._failed(failures, before)

    def _value(self, op: rtnl.RouteOp) -> int | None:
        """What our route is once op is done."""
        if op.op == "delete":
            return None
        return op.gateway | (DEV_TUN if op.oif == self.tun else DEV_UNDERLAY) << 32

    def _failed(self, failures: list[tuple[rtnl.RouteOp, int, str]], before: dict[int, int | None]) -> None:
        """Puts the mirror right for the writes the kernel refused, and says so."""
        problems: Counter[str] = Counter()
        own = self.mirror.state.own
        for op, code, text in failures:
            key = op.dst << 6 | op.dst_len
            if op.op == "add" and code == errno.EEXIST:
                if not self.mirror.held(key):
                    continue  # still held, as before the dump
                what = "another route holds it in the kernel: left as it is"
            elif op.op == "delete" and code == errno.ESRCH:
                own.pop(key)  # gone already
                continue
            else:
                self.write_errors += 1
                what = f"{text or errno.errorcode.get(code, str(code))} (tried again at the next resync)"
                self._retry.add(key)
                self._next_resync = min(self._next_resync, time.monotonic() + RETRY_AFTER)
                if before.get(key) is None:
                    own.pop(key)
                else:
                    own[key] = before[key]
            if problems[what] < 3:
                log.warning("kernel route %s %s via %s: %s", op.op, cidr_text(key), IPv4Address(op.gateway), what)
            problems[what] += 1
        for what, n in problems.items():
            if n > 3:
                log.warning("... and %d more: %s", n - 3, what)

    def withdraw_direct(self) -> None:
        """Deletes our routes on the underlay (at exit: those into the TUN go with it)."""
        self.writer.write([rtnl.RouteOp("delete", *network_of(k))
                           for k, v in self.mirror.state.own.items() if v >> 32 == DEV_UNDERLAY])

    def _want(self, via: int, kind: int) -> int | None:
        """Our kernel route for a CIDR of the table, as via | device << 32,
        or None: none (someone else's route leads into the TUN, or the
        underlay does not reach the node of a direct one)."""
        if kind == Kind.ENCAPSULATED:
            return via  # | DEV_TUN << 32, which is 0
        if kind == Kind.DIRECT:
            hop = self.hops.get(via)
            return None if hop == NO_HOP else hop | DEV_UNDERLAY << 32
        return None

    def _op(self, key: int, want: int | None, have: int | None) -> rtnl.RouteOp:
        dst, plen = network_of(key)
        if want is None:
            return rtnl.RouteOp("delete", dst, plen)
        via, tun = want & 0xFFFFFFFF, want >> 32 == DEV_TUN
        # A gateway taken from the route to a node is on the link by the
        # kernel's own account (that route may be onlink itself, as a /32
        # node's default route is): onlink skips the check that would refuse it.
        return rtnl.RouteOp("add" if have is None else "replace", dst, plen, self.tun if tun else self.underlay,
                            via, onlink=tun or via in self.hops.gateways, prefsrc=int(self.node.ip) if tun else 0)

    # ---- what it looks like ----------------------------------------------------------------

    def detail(self, source: Source, detail: int, key: int) -> str:
        """Where a route of `source` for CIDR `key` comes from: the file's
        line, the kernel route's protocol, the etcd key at its mod revision."""
        if source is Source.FILE:
            return f"{self.config_name}:{detail}" if detail else self.config_name
        if source is Source.KERNEL:
            return f"proto {protocol_name(detail)}"
        return f"{self.etcd_key(key) if self.etcd_key else 'etcd'}@{detail}"

    def _side(self, side: Side, key: int) -> dict:
        return {"source": str(side.source), "node": str(IPv4Address(side.via)),
                "detail": self.detail(side.source, side.detail, key)}

    def routes(self) -> Iterator[dict]:
        """Each route of the table: CIDR, node, source and its detail, how
        it is carried, its next hop on the underlay, and what holds it in
        the kernel. Safe from another thread: the table is immutable, the
        mirror and the next hops only looked up."""
        t, own, blocked = self.table, self.mirror.state.own, self.mirror.blocked
        foreign, hops = self.mirror.state.foreign, self.hops.hops
        for key, via, src, detail, kind in zip(t.routes.keys, t.routes.vias, t.sources, t.routes.details, t.kinds):
            source = Source(src)
            hop = hops.get(via)  # None: not asked yet
            if kind == Kind.FOREIGN:
                holder = foreign.get(key)
                kernel = "none" if holder is None else f"proto {protocol_name(holder >> 32 & 0xFF)}"
            elif key in blocked:
                kernel = "held by another route"
            elif own.get(key) is not None:
                kernel = "ours"
            else:
                kernel = "no route to its node" if kind == Kind.DIRECT and hop == NO_HOP else "pending"
            yield {"cidr": cidr_text(key), "node": str(IPv4Address(via)), "source": str(source),
                   "detail": self.detail(source, detail, key), "kind": _KIND_NAMES[Kind(kind)],
                   "next_hop": str(IPv4Address(hop)) if hop else None, "kernel": kernel}

    def show(self) -> dict:
        """Everything about the table, as plain data (for the control socket):
        the routes, the conflicts with both sides, the refused kernel routes."""
        return {"routes": list(self.routes()), **self.summary(limit=None)}

    def summary(self, limit: int | None = 100) -> dict:
        """The table without its routes (for the status file): counts by
        source and kind, and the first `limit` conflicts and refusals. Safe
        from another thread: what it copies, C copies under the GIL."""
        conflicts = self.table.conflicts[:limit]
        refused = sorted(self.mirror.refused().items())[:limit]
        return {
            "mode": str(self.mode),
            "learn": self.learn,
            "routes_by": [[source, kind, n] for (source, kind), n in sorted(self.counts().items())],
            "conflicts": [{"cidr": cidr_text(c.key), "winner": self._side(c.winner, c.key),
                           "loser": self._side(c.loser, c.key)}
                          for c in conflicts],
            "refused": [{"cidr": cidr_text(kkey >> 32), "metric": kkey & 0xFFFFFFFF, "reason": r.reason,
                         "detail": f"proto {protocol_name(r.protocol)}",
                         "via": str(IPv4Address(r.gateway)) if r.gateway else None} for kkey, r in refused],
            "held": len(self.mirror.blocked),
        }

    def counts(self) -> dict[tuple[str, str], int]:
        """Routes by (source, kind), for ipipfast_routes{source,kind}: every
        series a source in use can have, 0 where there are none (a kernel
        route into the TUN is always encapsulated)."""
        out: Counter[tuple[str, str]] = Counter({("file", "encapsulated"): 0, ("file", "direct"): 0})
        if self.learn:
            out["kernel", "encapsulated"] = 0
        if self.etcd_key is not None:
            out["etcd", "encapsulated"] = out["etcd", "direct"] = 0
        for (src, kind), n in self.table.counts.items():
            out[str(Source(src)), _KIND_NAMES[Kind(kind)]] += n
        return dict(out)

    def counters(self) -> dict[str, int]:
        m = self.mirror
        return {
            "kernel_route_writes": self.writer.writes,
            "kernel_route_batches": self.writer.batches,
            "kernel_route_write_errors": self.write_errors,
            "kernel_resyncs": m.resyncs,
            "kernel_resyncs_changed": m.resyncs_changed,
            "kernel_notifications_lost": self.monitor.losses,
            **{f"kernel_routes_refused_{reason}": n for reason, n in m.refused_total.items()},
        }
