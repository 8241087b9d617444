"""The kernel's routes as this node sees them: a mirror of IPv4 table main,
loaded from a dump and kept current by notifications (RouteMonitor).

It holds three things: the routes someone else (BIRD: proto bird, felix:
proto 80, an operator: static, boot) wrote into our TUN, which are the
kernel route source; our own routes (proto 0xbf) into the TUN and onto the
underlay, against which the desired state is diffed; and the routes into
the TUN it refuses, with why:

- no_gateway: `<cidr> dev <tun>` without `via`. The kernel's tunl0 would
  send to the inner destination itself; a TUN has no next hop to give, so
  there is no node to encapsulate to.
- multipath: `nexthop via A nexthop via B` (Calico's ECMP). The kernel
  spreads such routes by a hash; the datapath keeps one node per CIDR.
- bad_gateway: a via that cannot be a node (not unicast, inside the routed
  CIDR, this node's own address, or of another address family).
- tos: a route that selects by TOS; the datapath matches by destination.

A kernel route is identified by (CIDR, TOS, metric) and holds one route
each here: `ip route append` / `prepend` aliases are not told apart, the
periodic resync puts the mirror right where that matters. The routes are
kept in IntMaps (16 bytes each at 100k, where dicts took ~115).
"""
from __future__ import annotations

import errno
import logging
import threading
from array import array
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from . import rtnl
from .intmap import IntMap
from .routes import RouteSet, cidr_text, key_of, route_problem
from .wake_pipe import WakePipe

log = logging.getLogger(__name__)

DEV_TUN, DEV_UNDERLAY, DEV_OTHER = 0, 1, 2
REFUSALS = ("no_gateway", "multipath", "bad_gateway", "tos")
# iproute2's /etc/iproute2/rt_protos names, for show ("proto bird"); felix's 80 has none.
PROTOCOLS = {0: "unspec", 1: "redirect", 2: "kernel", 3: "boot", 4: "static", 8: "gated", 9: "ra", 10: "mrt",
             11: "zebra", 12: "bird", 13: "dnrouted", 14: "xorp", 15: "ntk", 16: "dhcp", 17: "mrouted",
             18: "keepalived", 42: "babel", 99: "openr", 186: "bgp", 187: "isis", 188: "ospf", 189: "rip",
             192: "eigrp"}
_MASK32 = 0xFFFFFFFF
# A foreign route's value: via | protocol << 32 | metric << 40, the metric
# saturated at 24 bits (two routes into the TUN for one CIDR, both with
# metrics above 16.7M, are the only ones this could confuse).
_METRIC_MAX = 0xFFFFFF


def protocol_name(proto: int) -> str:
    return PROTOCOLS.get(proto, str(proto))


@dataclass(frozen=True)
class Refused:
    reason: str
    protocol: int
    gateway: int          # 0: none
    nexthops: int         # multipath: how many


def _foreign(gateway: int, protocol: int, metric: int) -> int:
    return gateway | protocol << 32 | min(metric, _METRIC_MAX) << 40


@dataclass
class _State:
    # CIDR key -> the foreign route into the TUN with the lowest metric (the
    # one the kernel uses), packed as _foreign() does.
    foreign: IntMap = field(default_factory=IntMap)
    # (CIDR key << 32 | metric) -> the same packing: further metrics of a CIDR.
    shadowed: dict[int, int] = field(default_factory=dict)
    # CIDR key -> via | device << 32: ours, at metric 0.
    own: IntMap = field(default_factory=IntMap)
    # (CIDR key << 32 | metric) -> why a route into the TUN is not used.
    refused: dict[int, Refused] = field(default_factory=dict)


class _Dump:
    """A state built from a dump: the routes appended as they come, sorted
    and sifted once at the end (no dict of 100k entries on the way)."""

    def __init__(self, mirror: KernelRoutes) -> None:
        self.mirror = mirror
        self.foreign: list[array] = [array("Q"), array("Q")]
        self.own: list[array] = [array("Q"), array("Q")]
        self.metrics = array("Q")
        self.refused: dict[int, Refused] = {}

    def add(self, msg: rtnl.RouteMsg) -> None:
        m = self.mirror
        if msg.table != rtnl.RT_TABLE_MAIN or msg.flags & rtnl.RTM_F_CLONED:
            return
        key = key_of(msg.dst, msg.dst_len)
        if msg.protocol == m.protocol:
            if msg.priority == 0 and msg.tos == 0:
                self.own[0].append(key)
                self.own[1].append(msg.gateway | m.device(msg.oif) << 32)
            return
        if not m.into_tun(msg):
            return
        reason = m.refusal(msg)
        if reason:
            self.refused[key << 32 | msg.priority] = Refused(reason, msg.protocol, msg.gateway, len(msg.nexthops))
            return
        self.foreign[0].append(key)
        self.foreign[1].append(_foreign(msg.gateway, msg.protocol, msg.priority))
        self.metrics.append(msg.priority)

    def state(self) -> _State:
        st = _State(refused=self.refused)
        keys, values = self.own
        st.own = IntMap(*_sorted(keys, values))
        keys, values = self.foreign
        if all(keys[i] < keys[i + 1] for i in range(len(keys) - 1)):  # one metric each, in order: as it comes
            st.foreign = IntMap(keys, values)
            return st
        order = sorted(range(len(keys)), key=lambda i: (keys[i], self.metrics[i]))
        fk, fv = array("Q"), array("Q")
        for i in order:  # the lowest metric of a CIDR first: it is the one in use
            if fk and fk[-1] == keys[i]:
                st.shadowed[keys[i] << 32 | self.metrics[i]] = values[i]
            else:
                fk.append(keys[i])
                fv.append(values[i])
        st.foreign = IntMap(fk, fv)
        return st


def _sorted(keys: array, values: array) -> tuple[array, array]:
    if all(keys[i] < keys[i + 1] for i in range(len(keys) - 1)):
        return keys, values  # a dump comes in trie order: usually sorted already
    pairs = dict(zip(keys, values))  # one of ours per key
    out = array("Q", sorted(pairs))
    return out, array("Q", (pairs[k] for k in out))


def _changed(old: IntMap, new: IntMap) -> set[int]:
    """Keys whose value differs between two maps (a walk of both in order)."""
    if old.same(new.keys, new.values):
        return set()
    out = set()
    a, b = old.items(), new.items()
    x, y = next(a, None), next(b, None)
    while x is not None or y is not None:
        if y is None or (x is not None and x[0] < y[0]):
            out.add(x[0])
            x = next(a, None)
        elif x is None or y[0] < x[0]:
            out.add(y[0])
            y = next(b, None)
        else:
            if x[1] != y[1]:
                out.add(x[0])
            x, y = next(a, None), next(b, None)
    return out


class KernelRoutes:
    """The mirror; used from the daemon's main thread only."""

    def __init__(self, tun: int, underlay: int, node_ip: int, protocol: int) -> None:
        self.tun, self.underlay, self.node_ip, self.protocol = tun, underlay, node_ip, protocol
        self.state = _State()
        # CIDR keys a route we do not mirror holds at our kernel key (metric 0):
        # found when an add of ours met EEXIST, or when such a route replaced ours.
        self.blocked: set[int] = set()
        self.rechecking: set[int] = set()  # those, tried again after a dump (said once: see held)
        self.foreign_changed: set[int] = set()  # CIDR keys whose kernel-source route changed
        self.own_changed: set[int] = set()      # CIDR keys whose route of ours changed under us
        self.refused_total: Counter[str] = Counter({r: 0 for r in REFUSALS})
        self.resyncs = 0          # full dumps after the first
        self.resyncs_changed = 0  # ... that found the mirror wrong
        self._source = RouteSet()
        self.loaded = False
        # The TUN's and the underlay's flags and MTU, as the link notifications tell (0: not told yet).
        self.links: dict[int, tuple[int, int]] = {tun: (rtnl.IFF_UP, 0), underlay: (rtnl.IFF_UP, 0)}
        self.mtus: dict[int, int] = {}  # MTUs told since the daemon last took them, by ifindex

    # ---- the kernel route source ---------------------------------------------------

    def source(self) -> RouteSet:
        """The foreign routes into the TUN as a route set (detail: protocol),
        updated in place of a rebuild when few changed."""
        changed = self.foreign_changed
        if changed:
            foreign = self.state.foreign
            if len(changed) * 32 > len(self._source):
                foreign.compact()
                self._source = RouteSet(foreign.keys, array("I", (v & _MASK32 for v in foreign.values)),
                                        array("Q", (v >> 32 & 0xFF for v in foreign.values)))
            else:
                self._source = self._source.updated(
                    {k: (v & _MASK32, v >> 32 & 0xFF) if (v := foreign.get(k)) is not None else None
                     for k in changed})
            self.foreign_changed = set()
        return self._source

    def device(self, oif: int) -> int:
        return DEV_TUN if oif == self.tun else DEV_UNDERLAY if oif == self.underlay else DEV_OTHER

    def into_tun(self, msg: rtnl.RouteMsg) -> bool:
        return msg.oif == self.tun or any(hop[0] == self.tun for hop in msg.nexthops)

    def refused(self) -> dict[int, Refused]:
        return self.state.refused

    # ---- what we wrote ---------------------------------------------------------------

    def wrote(self, key: int, value: int | None) -> None:
        """A route of ours the kernel accepted (value: via | device << 32),
        or removed (None). The notifications our writes cause are filtered
        out of the subscription (they could arrive after a later write to the
        same key and undo it here): the writer records."""
        if value is None:
            self.state.own.pop(key)
        else:
            self.state.own[key] = value
            self.blocked.discard(key)

    def held(self, key: int) -> bool:
        """An add of ours met EEXIST: a route we do not mirror holds the key.
        False when it was known to hold it before the last dump (no news)."""
        self.blocked.add(key)
        self.state.own.pop(key)
        return key not in self.rechecking

    # ---- dumps and notifications -------------------------------------------------------

    def load(self, dump: Callable[[Callable[[rtnl.RouteMsg], None]], bool]) -> bool:
        """Replaces the mirror with a full dump (retried while the kernel
        says a change interrupted it); True when it differed from what the
        notifications had built (never on the first load)."""
        first = not self.loaded
        for _ in range(rtnl.DUMP_ATTEMPTS):
            fresh = _Dump(self)
            if not dump(fresh.add):
                break
        new, old = fresh.state(), self.state
        changed = _changed(old.foreign, new.foreign)
        changed |= {k >> 32 for k in old.shadowed.keys() ^ new.shadowed.keys()}
        own_changed = _changed(old.own, new.own)
        refusals_changed = old.refused.keys() ^ new.refused.keys()
        for kkey in new.refused.keys() - old.refused.keys():
            self._refusal_news(kkey, new.refused[kkey])
        self.state = new
        self.foreign_changed |= changed
        self.own_changed |= own_changed
        # Keys another route held: still held if that route is there; we cannot
        # tell without mirroring every route, so let the next write find out.
        self.own_changed |= self.blocked
        self.rechecking, self.blocked = self.blocked, set()
        differed = bool(changed or own_changed or refusals_changed)
        self.loaded = True
        if not first:
            self.resyncs += 1
            self.resyncs_changed += differed
        return differed and not first

    def apply(self, messages: Iterable[rtnl.RouteMsg | rtnl.LinkMsg]) -> bool:
        """Notifications, in order; True when a link of ours changed in a way
        that may have flushed routes without a notification (IPv4 removes a
        down device's routes silently): then only a dump tells."""
        resync = False
        for msg in messages:
            if isinstance(msg, rtnl.LinkMsg):
                resync |= self._link(msg)
            else:
                self._apply(self.state, self.blocked, msg)
        return resync

    def _link(self, msg: rtnl.LinkMsg) -> bool:
        if msg.index not in self.links:
            return False
        (old_flags, old_mtu), now = self.links[msg.index], (msg.flags if msg.new else 0, msg.mtu)
        self.links[msg.index] = now
        if msg.new and msg.mtu and msg.mtu != old_mtu:
            self.mtus[msg.index] = msg.mtu
        return bool((old_flags ^ now[0]) & rtnl.IFF_UP)

    def _apply(self, st: _State, blocked: set[int], msg: rtnl.RouteMsg) -> None:
        if msg.table != rtnl.RT_TABLE_MAIN or msg.flags & rtnl.RTM_F_CLONED:
            return
        key = key_of(msg.dst, msg.dst_len)
        metric = msg.priority
        kkey = key << 32 | metric
        into_tun = self.into_tun(msg)
        ours = msg.protocol == self.protocol
        at_our_key = metric == 0 and msg.tos == 0
        if not msg.new:
            if ours:
                if at_our_key:
                    self._own_gone(st, key)
            elif into_tun:
                st.refused.pop(kkey, None)
                self._foreign_gone(st, key, metric)
            elif at_our_key and key in blocked:
                blocked.discard(key)  # the route holding our key went: ours may go in now
                self.own_changed.add(key)
            return
        # A new route at a kernel key supersedes what we knew there.
        if at_our_key and not ours and key in st.own:
            self._own_gone(st, key)
            if not into_tun:
                blocked.add(key)
        was_refused = st.refused.pop(kkey, None)
        self._foreign_gone(st, key, metric)
        if ours:
            if at_our_key:
                st.own[key] = msg.gateway | self.device(msg.oif) << 32
                self.own_changed.add(key)
            return
        if not into_tun:
            return
        reason = self.refusal(msg)
        if reason:
            refused = Refused(reason, msg.protocol, msg.gateway, len(msg.nexthops))
            if refused != was_refused:
                self._refusal_news(kkey, refused)
            st.refused[kkey] = refused
            return
        value = _foreign(msg.gateway, msg.protocol, metric)
        current = st.foreign.get(key)
        if current is None or current >> 40 >= min(metric, _METRIC_MAX):
            if current is not None and current >> 40 > metric:
                st.shadowed[key << 32 | current >> 40] = current
            st.foreign[key] = value
            self.foreign_changed.add(key)
        else:
            st.shadowed[kkey] = value

    def _own_gone(self, st: _State, key: int) -> None:
        if st.own.pop(key) is not None:
            self.own_changed.add(key)

    def _foreign_gone(self, st: _State, key: int, metric: int) -> None:
        current = st.foreign.get(key)
        if current is None or current >> 40 != min(metric, _METRIC_MAX):
            st.shadowed.pop(key << 32 | metric, None)
            return
        st.foreign.pop(key)
        self.foreign_changed.add(key)
        rest = [k for k in st.shadowed if k >> 32 == key]  # the next metric takes over
        if rest:
            st.foreign[key] = st.shadowed.pop(min(rest))

    def refusal(self, msg: rtnl.RouteMsg) -> str | None:
        if msg.tos:
            return "tos"
        if msg.nexthops:
            return "multipath"
        if msg.foreign_gateway:
            return "bad_gateway"
        if not msg.gateway:
            return "no_gateway"
        if msg.gateway == self.node_ip or route_problem(msg.dst, msg.dst_len, msg.gateway):
            return "bad_gateway"
        return None

    def _refusal_news(self, kkey: int, r: Refused) -> None:
        self.refused_total[r.reason] += 1
        why = {
            "no_gateway": "no via: a TUN gives no next hop, so there is no node to encapsulate to",
            "multipath": f"{r.nexthops} next hops: the datapath keeps one node per CIDR",
            "bad_gateway": "its via cannot be a tunnel endpoint"
                           + (f" ({IPv4Address(r.gateway)})" if r.gateway else " (not IPv4)"),
            "tos": "it selects by TOS; the datapath matches by destination only",
        }[r.reason]
        log.warning("kernel route %s metric %d proto %s into the tunnel refused (%s): %s",
                    cidr_text(kkey >> 32), kkey & _MASK32, protocol_name(r.protocol), r.reason, why)


class RouteMonitor:
    """The subscription's reader: a thread that decodes notifications as they
    come and queues them for the main thread, which it wakes. After an
    ENOBUFS (the kernel dropped some) it drains the socket, clears the queue
    and flags the loss: the main thread then dumps, and replays only what
    came after, so nothing older than the dump overwrites it."""

    def __init__(self, writer: rtnl.RouteSocket, wake: Callable[[], None]) -> None:
        self.sub = rtnl.Subscription(writer.port)
        self.wake = wake
        self._lock = threading.Lock()
        self._queue: list[rtnl.RouteMsg | rtnl.LinkMsg] = []
        self._lost = False
        self.losses = 0  # ENOBUFS seen
        self._stop = WakePipe()

    def take(self) -> tuple[list[rtnl.RouteMsg | rtnl.LinkMsg], bool]:
        """(what arrived since the last take, whether notifications were lost)."""
        with self._lock:
            queue, lost = self._queue, self._lost
            self._queue, self._lost = [], False
        return queue, lost

    def run(self) -> None:
        while self._stop.wait_for(self.sub.fileno()):
            try:
                messages = self.sub.receive()
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                self.sub.drain()
                with self._lock:
                    self._queue, self._lost = [], True
                    self.losses += 1
                log.warning("route notifications lost (ENOBUFS): re-reading the kernel's routes")
                self.wake()
                continue
            messages = [m for m in messages if not isinstance(m, rtnl.RouteMsg) or m.table == rtnl.RT_TABLE_MAIN]
            if messages:
                with self._lock:
                    self._queue.extend(messages)
                self.wake()

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self.sub.close()
        self._stop.close()



def remove_own_routes(oif: int, protocol: int) -> int:
    """Deletes every route of ours (`protocol`) through oif in table main,
    in batches; returns how many there were (`ipipfast down`)."""
    sock = rtnl.RouteSocket(protocol)
    try:
        ours: list[rtnl.RouteOp] = []
        sock.dump(lambda m: ours.append(rtnl.RouteOp("delete", m.dst, m.dst_len))
                  if m.protocol == protocol and m.oif == oif else None)
        failed = [f for f in sock.write(ours) if f[1] != errno.ESRCH]
        if failed:
            op, code, text = failed[0]
            raise OSError(code, f"deleting {cidr_text(key_of(op.dst, op.dst_len))}: {text or errno.errorcode[code]}")
        return len(ours)
    finally:
        sock.close()
