"""Node leases in etcd, in flannel's schema: this node's pod CIDRs registered
under a lease that it keeps alive, every other node's read from a watch.

Keys and values are flannel's (pkg/subnet/etcd), so ipipfast and flannel's
ipip nodes read each other's leases:

    <prefix>/subnets/198.19.1.0-24 = {"PublicIP":"198.18.0.11","BackendType":"ipip","BackendData":null}

Read: the key's IPv4 part (a dual-stack key's "&<v6>-<len>" tail is
ignored), PublicIP (a string, IPv4) and BackendType (a string). Routed: keys
whose BackendType is "ipip" (flannel's ipip backend ignores other backends'
leases the same way: a vxlan or host-gw node does not decapsulate IPIP), whose
PublicIP is not this node's, and that do not claim one of this node's own pod
CIDRs. Everything else under the prefix is listed in status()["ignored"] with
the reason. BackendData is not read (flannel's ipip backend writes none).

A key attached to a lease goes when the lease expires; a key without one (a
flannel reservation) stays until deleted. A reservation naming this node is
held as it is, not moved onto the lease. stop() leaves the lease to expire,
as flannel does: a node back within its TTL moves its keys to its new lease
(the others' routes never change), one that stays away leaves the others'
tables within the TTL.

The client is etcd3gw: etcd's v3 JSON gateway over HTTP (no gRPC, no
protobuf), at /v3/ (etcd 3.4 on). Its unary calls carry registration and the
lease; the watch stream is read here, because its watch helper neither
reports a watch that etcd cancelled for compaction nor a stream that broke,
and its range helper drops the revision a watch resumes from.

Two threads. The lease thread grants the lease, claims each pod CIDR with a
transaction conditioned on Version(key) == 0 (or on the key already holding
this node's PublicIP: an earlier run's, taken over on its mod revision), keeps
the lease alive every ttl/3, and registers again when it expired (a partition
longer than the TTL). The watch thread lists the prefix, watches from the next
revision, resumes from the last revision it saw after a broken stream, and
lists again when etcd answers that revision was compacted (or the store's
revision went back: a restored or new cluster). Either thread failing marks
the source unreachable, retries with capped, jittered backoff and keeps the
routes it had: an unreachable datastore never empties the table.
"""
from __future__ import annotations

import base64
import bisect
import heapq
import json
import logging
import os
import random
import re
import socket
import threading
import time
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import etcd3gw
import requests
from etcd3gw.exceptions import Etcd3Exception

from .config import Config, EtcdConfig, EtcdTLS
from .routes import (Route, RouteSet, cidr_text, fast_address, key_of, mask_of, parse_address, parse_network,
                     route_problem)

log = logging.getLogger(__name__)

BACKEND = "ipip"
API_PATH = "/v3/"  # the JSON gateway's, etcd 3.4 on (3.4 also serves /v3beta/, which 3.5 dropped)
RETRY_FIRST = 0.1  # seconds before the first retry; doubled per failure...
RETRY_CAP = 5.0  # ...up to this (flannel's watch uses the same two)
REQUEST_TIMEOUT_CAP = 5.0  # seconds; a request also gets at most half the keep-alive interval
LIST_PAGE = 1000  # keys per range request of a list
LEASE_NOT_FOUND = "requested lease not found"  # etcd's error for a put on a lease it no longer has
IGNORED_SHOWN = 100  # keys status() names with the reason they are not routed (a vxlan cluster has thousands)
CLAIM_TRIES = 10  # transactions per CIDR before waiting for the next round (flannel: raceRetries)
_SUBNET_KEY = re.compile(r"(\d+\.\d+\.\d+\.\d+)-(\d+)(?:&[0-9a-fA-F:]+-\d+)?")
_ERRNO = re.compile(r"\[Errno -?\d+\] [^'\")]*|Read timed out|timed out")


class EtcdUnavailable(Exception):
    """A request that failed: etcd down, unreachable, or answering with an error."""


@dataclass(frozen=True)
class EtcdRoute:
    """Another node's pod CIDR, from `key` as of its `mod_revision`."""

    route: Route
    key: str
    mod_revision: int


@dataclass(frozen=True)
class Conflict:
    """One of this node's pod CIDRs that another node holds: not registered."""

    key: str
    holder: str  # its PublicIP, or what makes its value unreadable
    message: str


def subnet_key(cidr: IPv4Network) -> str:
    """The key's last part, as flannel writes it: 198.19.1.0-24."""
    return f"{cidr.network_address}-{cidr.prefixlen}"


def parse_subnet_key(tail: str) -> IPv4Network:
    """The IPv4 CIDR of a key's last part (flannel's, or a dual-stack one)."""
    m = _SUBNET_KEY.fullmatch(tail)
    if not m:
        raise ValueError(f"not a subnet key (<address>-<length>): {tail!r}")
    return parse_network(f"{m[1]}/{m[2]}")


def parse_attrs(value: bytes) -> tuple[IPv4Address, str]:
    """(PublicIP, BackendType) of a lease's JSON value."""
    try:
        attrs = json.loads(value)
    except ValueError:  # UnicodeDecodeError is one too
        raise ValueError("the value is not JSON") from None
    if not isinstance(attrs, dict):
        raise ValueError("the value is not a JSON object")
    ip, backend = attrs.get("PublicIP"), attrs.get("BackendType", "")  # flannel omits an empty BackendType
    if not isinstance(ip, str):
        raise ValueError("PublicIP is missing or not a string")
    if not isinstance(backend, str):
        raise ValueError("BackendType is not a string")
    return parse_address(ip), backend


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def _describe(e: BaseException) -> str:
    """A one-line reason: urllib3 nests the errno deep in its messages."""
    text = (e.detail_text if isinstance(e, Etcd3Exception) else None) or str(e) or type(e).__name__
    m = _ERRNO.search(text)
    return m.group(0) if m else " ".join(text.split())[:300]


class _Backoff:
    def __init__(self) -> None:
        self.delay = RETRY_FIRST

    def next(self) -> float:
        """The wait before the next try, half to all of the current delay (jitter keeps a
        thousand nodes that lost etcd together from coming back in step)."""
        delay, self.delay = self.delay, min(RETRY_CAP, self.delay * 2)
        return delay * random.uniform(0.5, 1.0)

    def reset(self) -> None:
        self.delay = RETRY_FIRST


class _Api:
    """One thread's HTTP connection to the cluster; after a failure, the next endpoint.

    The CA goes with every request: requests lets REQUESTS_CA_BUNDLE (or
    CURL_CA_BUNDLE) from the environment override a session's own CA. The
    API path is /v3/, etcd's since 3.4, rather than found by a request to
    /version that would not carry it."""

    def __init__(self, config: EtcdConfig, timeout: float) -> None:
        tls = config.tls or EtcdTLS()
        self.endpoints = config.endpoints
        self.timeout = timeout
        self._verify: str | bool = tls.ca or True
        self._clients = [
            etcd3gw.Etcd3Client(host=e.host, port=e.port, protocol=e.scheme, ca_cert=tls.ca,
                                cert_cert=tls.cert, cert_key=tls.key, timeout=timeout, api_path=API_PATH)
            for e in config.endpoints
        ]
        self._i = 0

    @property
    def endpoint(self) -> str:
        return str(self.endpoints[self._i])

    def failed(self) -> None:
        self._i = (self._i + 1) % len(self._clients)

    def _fail(self, what: str, e: BaseException) -> EtcdUnavailable:
        return EtcdUnavailable(f"{what} at {self.endpoint}: {_describe(e)}")

    def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        client = self._clients[self._i]
        try:
            return client.post(client.get_url(path), json=body, verify=self._verify)
        except (Etcd3Exception, requests.RequestException, ValueError) as e:
            raise self._fail(path.strip("/"), e) from e

    def stream(self, path: str, body: dict[str, Any]) -> requests.Response:
        """A streaming POST; its reads block until data, the stream's end or close_stream()."""
        client = self._clients[self._i]
        try:
            resp = client.session.post(client.get_url(path), json=body, stream=True, verify=self._verify,
                                       timeout=(self.timeout, None))
        except (Etcd3Exception, requests.RequestException) as e:
            raise self._fail(path.strip("/"), e) from e
        if resp.status_code != 200:
            resp.close()
            raise EtcdUnavailable(f"{path.strip('/')} at {self.endpoint}: HTTP {resp.status_code} {resp.reason}")
        return resp

    def close(self) -> None:
        for client in self._clients:
            client.session.close()


def close_stream(resp: requests.Response) -> None:
    """Ends a stream another thread is blocked reading: shut its socket down
    (closing the response from here would not wake that read)."""
    try:
        with socket.socket(fileno=os.dup(resp.raw.fileno())) as s:
            s.shutdown(socket.SHUT_RDWR)
    except (OSError, ValueError, AttributeError):
        pass  # already closed


@dataclass(frozen=True, slots=True)
class _Entry:
    """One key under <prefix>/subnets/, read."""

    key: str
    lease: int
    cidr: int  # the key (routes.key_of) of the CIDR it routes; -1: not routed
    via: int
    mod_revision: int
    reason: str | None  # why it is not routed (None when routed, or for this node's own registration)


_DECODE = json.JSONDecoder().raw_decode  # json.loads without its checks of the input's type and encoding


def _fast_attrs(value: bytes) -> tuple[int, str] | None:
    """(PublicIP, BackendType) of a value as flannel writes it (compact
    JSON), at C speed; None for anything else, which parse_attrs then reads
    or explains."""
    try:
        text = value.decode()
        attrs, end = _DECODE(text)
    except ValueError:  # UnicodeDecodeError is one too
        return None
    if end == len(text) and isinstance(attrs, dict):
        ip, backend = attrs.get("PublicIP"), attrs.get("BackendType", "")
        if isinstance(ip, str) and isinstance(backend, str):
            addr = fast_address(ip)
            if addr is not None:
                return addr, backend
    return None


def _fast_subnet_key(tail: str) -> int | None:
    """The CIDR key (routes.key_of) of a well-formed subnet key's last part;
    None for anything else, which parse_subnet_key then reads or explains."""
    m = _SUBNET_KEY.fullmatch(tail)
    if m is None or len(m[2]) > 2:
        return None
    network, prefixlen = fast_address(m[1]), int(m[2])
    if network is None or prefixlen > 32 or network & ~mask_of(prefixlen) & 0xFFFFFFFF:
        return None
    return key_of(network, prefixlen)


class EtcdSource:
    """Registers this node's pod CIDRs and follows every other node's.

    on_change() is called from the source's watch thread whenever routes()
    changed (a CIDR came, went or moved to another node); it should only
    signal, e.g. set an Event, and leave the reading to take().

    The view is indexed as it changes, so that a change costs the keys it
    touches, not the prefix: each routed CIDR's claimants (the keys that
    route it, in key order; the first wins), the keys not routed with the
    reason, and the winners as one RouteSet, updated in place.
    """

    def __init__(self, config: EtcdConfig, node_ip: IPv4Address, pod_cidrs: Iterable[IPv4Network] = (),
                 on_change: Callable[[], None] = lambda: None) -> None:
        self.config, self.node_ip = config, node_ip
        self.pod_cidrs = tuple(pod_cidrs)
        self.on_change = on_change
        self.interval = config.ttl / 3  # keep-alive period, and the health check's
        self.timeout = min(REQUEST_TIMEOUT_CAP, self.interval / 2)
        self.subnets = config.prefix + "/subnets/"
        self._range = {"key": _b64(self.subnets), "range_end": _b64(self.subnets[:-1] + "0")}  # '/' + 1
        self._value = json.dumps({"PublicIP": str(node_ip), "BackendType": BACKEND, "BackendData": None},
                                 separators=(",", ":"))
        self._wanted = {self.subnets + subnet_key(c): c for c in self.pod_cidrs}
        self._node = int(node_ip)
        self._own = {key_of(int(c.network_address), c.prefixlen) for c in self.pod_cidrs}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._wake = threading.Event()  # the lease thread: a key of ours changed
        self._threads: list[threading.Thread] = []
        self._stream: requests.Response | None = None
        self._relist = True  # the watch thread's: list before watching
        # The view, the watch thread's; read under the lock.
        self._entries: dict[str, _Entry] = {}
        self._claims: dict[int, list[str]] = {}  # routed CIDR -> the keys that route it, sorted
        self._contested: set[int] = set()  # the CIDRs of more than one key
        self._ignored: dict[str, str] = {}  # key -> why it is not routed
        self._table = RouteSet()  # each claimed CIDR's first key: (via, mod revision)
        self._taken: set[int] | None = None  # CIDRs changed since the last take(); None: all of them
        self._revision = 0
        # Registration, the lease thread's; the watch thread drops keys from _held.
        self._lease: int | None = None
        self._held: dict[IPv4Network, str] = {}  # CIDR -> "lease" or "reservation"
        self._conflicts: dict[IPv4Network, Conflict] = {}
        # Reachability: the threads whose last request failed, or that have not yet succeeded.
        self._failing = {"watch", "lease"}
        self._connected = False
        self._since = time.time()
        self._last_error: str | None = None
        self._endpoint = str(config.endpoints[0])
        self._backoffs = {"watch": _Backoff(), "lease": _Backoff()}
        self._counts = dict.fromkeys(("errors", "lists", "compacted", "watch_events", "route_changes",
                                      "lease_grants", "lease_expired", "registrations"), 0)

    @classmethod
    def from_config(cls, config: Config, on_change: Callable[[], None] = lambda: None) -> EtcdSource:
        if config.etcd is None:
            raise ValueError("the config has no etcd section")
        return cls(config.etcd, config.node.ip.ip, config.node.pod_cidrs, on_change)

    # ---- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        for name, step, wake in (("watch", self._watch_step, self._stopping),
                                 ("lease", self._lease_step, self._wake)):
            t = threading.Thread(target=self._run, args=(name, step, wake), name=f"ipipfast-etcd-{name}",
                                 daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        """Stops both threads; the lease is left to expire (see the module's doc)."""
        self._stopping.set()
        self._wake.set()
        with self._lock:
            if self._stream is not None:
                close_stream(self._stream)
        for t in self._threads:
            t.join(timeout=2 * REQUEST_TIMEOUT_CAP)
        self._threads.clear()

    # ---- what it offers ------------------------------------------------------------

    def routes(self) -> tuple[EtcdRoute, ...]:
        """Every other node's routed CIDR, in CIDR order. Of two keys for one
        CIDR (a plain and a dual-stack one), the first in key order counts."""
        with self._lock:
            t, claims, entries = self._table, self._claims, self._entries
            return tuple(EtcdRoute(Route.of(cidr, via), entries[claims[cidr][0]].key, revision)
                         for cidr, via, revision in zip(t.keys, t.vias, t.details))

    def take(self) -> tuple[RouteSet, int, set[int] | None]:
        """What a table needs of the view: the routes (details: their mod
        revisions), the revision they are as of, and the CIDR keys that
        changed since the last take (None: any may have, after a list)."""
        with self._lock:
            taken, self._taken = self._taken, set()
            return self._table, self._revision, taken

    def key(self, cidr: int) -> str:
        """The key that routes a CIDR (by its routes.key_of), or that would in flannel's form."""
        with self._lock:
            keys = self._claims.get(cidr)
        return keys[0] if keys else f"{self.subnets}{cidr_text(cidr).replace('/', '-')}"

    def status(self) -> dict[str, Any]:
        """The source's state, as JSON-able values (for `ipipfast show` and the status file)."""
        with self._lock:
            ignored = dict(self._ignored)
            for cidr in self._contested:
                for key in self._claims[cidr][1:]:
                    ignored[key] = f"another key already routes {cidr_text(cidr)}"
            return {
                "connected": self._connected,
                "since": self._since,  # time.time() of the last change of `connected`
                "last_error": self._last_error,
                "endpoint": self._endpoint,
                "revision": self._revision,
                "lease": f"{self._lease:x}" if self._lease is not None else None,  # hex, as etcdctl prints it
                "registered": {str(c): self.subnets + subnet_key(c) for c in self._held},
                "conflicts": {str(c): conflict.message for c, conflict in self._conflicts.items()},
                "routes": len(self._table),
                "ignored": dict(heapq.nsmallest(IGNORED_SHOWN, ignored.items())),  # the first by key
                "ignored_count": len(ignored),
            }

    def counters(self) -> dict[str, int]:
        """Totals since start, for the metrics: errors, lists, compacted, watch_events,
        route_changes, lease_grants, lease_expired, registrations; and as they are now:
        connected (0 or 1), registered and conflicts (CIDRs of this node's), revision."""
        with self._lock:
            return {**{f"etcd_{k}": v for k, v in self._counts.items()}, "etcd_connected": int(self._connected),
                    "etcd_registered": len(self._held), "etcd_conflicts": len(self._conflicts),
                    "etcd_revision": self._revision}

    def conflicts(self) -> dict[IPv4Network, Conflict]:
        """This node's pod CIDRs that another node holds."""
        with self._lock:
            return dict(self._conflicts)

    # ---- reachability ------------------------------------------------------------

    def _ok(self, who: str, api: _Api) -> None:
        self._backoffs[who].reset()
        with self._lock:
            self._failing.discard(who)
            self._endpoint = api.endpoint
            if not self._failing and not self._connected:
                self._connected, self._since = True, time.time()
                log.info("etcd: connected to %s (revision %d)", api.endpoint, self._revision)

    def _failed(self, who: str, api: _Api, error: EtcdUnavailable) -> float:
        """Records the failure; returns the wait before the next try."""
        api.failed()
        with self._lock:
            if who == "lease" and self._stream is not None:
                close_stream(self._stream)  # the watch may be hanging on a silent partition
            self._counts["errors"] += 1
            self._failing.add(who)
            self._last_error = str(error)
            if self._connected or self._counts["errors"] == 1:
                if self._connected:
                    self._connected, self._since = False, time.time()
                log.warning("etcd unreachable (%s); keeping the last %d keys' routes and retrying",
                            error, len(self._entries))
            else:
                log.debug("etcd: %s", error)
        return self._backoffs[who].next()

    def _run(self, who: str, step: Callable[[_Api], float], wake: threading.Event) -> None:
        """A thread's loop: step, then wait what it asks (or until `wake` is set);
        after a failure, the backoff. A step that fails unexpectedly (a bug, an
        answer we did not foresee) is retried the same way, never left dead."""
        api = _Api(self.config, self.timeout)
        try:
            while not self._stopping.is_set():
                try:
                    delay = step(api)
                except Exception as e:
                    if self._stopping.is_set():
                        break
                    error = e if isinstance(e, EtcdUnavailable) else EtcdUnavailable(f"{who}: {e!r}")
                    if error is not e:
                        log.exception("etcd: the %s thread failed", who)
                    delay = self._failed(who, api, error)
                wake.wait(delay)
        finally:
            api.close()

    # ---- the watch thread ------------------------------------------------------------

    def _watch_step(self, api: _Api) -> float:
        if self._relist:
            self._list(api)
            self._ok("watch", api)
            self._relist = False
        self._relist = self._watch(api)
        return 0

    def _list(self, api: _Api) -> None:
        """Replaces the view with the prefix's keys, read at one revision."""
        entries: dict[str, _Entry] = {}
        body: dict[str, Any] = {**self._range, "limit": LIST_PAGE}
        revision = 0
        while True:
            resp = api.call("/kv/range", body)
            try:
                revision = revision or int(resp["header"]["revision"])
                kvs = resp.get("kvs", [])
                for kv in kvs:
                    entry = self._entry(kv)
                    entries[entry.key] = entry
            except (KeyError, ValueError, TypeError) as e:
                raise EtcdUnavailable(f"kv/range at {api.endpoint}: unexpected answer: {e!r}") from e
            if not resp.get("more") or not kvs:
                break
            after = base64.b64encode(_unb64(kvs[-1]["key"]) + b"\0").decode()
            body = {**body, "key": after, "revision": revision}
        with self._lock:
            old = self._table
            self._entries, self._claims, self._ignored, self._revision = entries, {}, {}, revision
            self._contested = set()
            for entry in entries.values():
                self._index(entry, True)
            cidrs = sorted(self._claims)
            winners = [entries[self._claims[c][0]] for c in cidrs]
            self._table = RouteSet(array("Q", cidrs), array("I", (e.via for e in winners)),
                                   array("Q", (e.mod_revision for e in winners)))
            self._taken = None
            self._counts["lists"] += 1
            for key in self._wanted:
                self._check_ours(key, entries.get(key))
            changed = self._table != old
        log.info("etcd: listed %d keys under %s at revision %d", len(entries), self.subnets, revision)
        self._changed(changed)

    def _watch(self, api: _Api) -> bool:
        """Follows the prefix from the view's revision until the stream breaks
        (raises EtcdUnavailable) or a re-list is needed (returns True)."""
        start = self._revision + 1
        resp = api.stream("/watch", {"create_request": {**self._range, "start_revision": start}})
        with self._lock:
            self._stream = resp
        if self._stopping.is_set():
            close_stream(resp)
        try:
            for line in resp.iter_lines(chunk_size=1 << 16):  # chunked: each read returns what came
                if not line:
                    continue
                msg = json.loads(line)
                if "error" in msg:
                    raise EtcdUnavailable(f"watch at {api.endpoint}: {msg['error'].get('message', msg['error'])}")
                result = msg["result"]
                revision = int(result.get("header", {}).get("revision", 0))
                if result.get("created"):
                    if revision and revision < start - 1:
                        log.warning("etcd: the store's revision %d is behind ours (%d): a restored or new "
                                    "cluster; listing again", revision, start - 1)
                        return True
                    self._ok("watch", api)
                elif result.get("canceled"):
                    compacted = int(result.get("compact_revision", 0))
                    if compacted:
                        log.warning("etcd: the watch from revision %d fell behind the compaction at %d; "
                                    "listing again", start, compacted)
                        with self._lock:
                            self._counts["compacted"] += 1
                        return True
                    raise EtcdUnavailable(f"watch at {api.endpoint}: cancelled: "
                                          f"{result.get('cancel_reason') or 'no reason given'}")
                else:
                    self._apply(result.get("events", []), revision)
            raise EtcdUnavailable(f"watch at {api.endpoint}: the stream ended")
        except (requests.RequestException, ValueError, KeyError, TypeError, AttributeError) as e:
            raise EtcdUnavailable(f"watch at {api.endpoint}: {_describe(e)}") from e
        finally:
            with self._lock:
                self._stream = None
            resp.close()

    def _apply(self, events: list[dict[str, Any]], revision: int) -> None:
        touched: set[int] = set()  # the CIDRs whose claimants changed
        with self._lock:
            for event in events:
                kv = event["kv"]
                key = self._key_of(kv)
                old = self._entries.get(key)
                if old is not None:
                    self._index(old, False)
                    touched.add(old.cidr)
                new: _Entry | None = None
                if event.get("type") == "DELETE":  # proto3 JSON leaves the default, PUT, out
                    self._entries.pop(key, None)
                else:
                    new = self._entries[key] = self._entry(kv)
                    self._index(new, True)
                    touched.add(new.cidr)
                revision = max(revision, int(kv.get("mod_revision", 0)))
                if key in self._wanted:
                    self._check_ours(key, new)
            touched.discard(-1)
            changed = self._update(touched)
            self._revision = max(self._revision, revision)
            self._counts["watch_events"] += len(events)
        self._changed(changed)

    def _index(self, entry: _Entry, add: bool) -> None:
        """Under the lock: entry into (or out of) the claimants and the ignored keys."""
        if entry.reason is not None:
            if add:
                self._ignored[entry.key] = entry.reason
            else:
                self._ignored.pop(entry.key, None)
        elif entry.cidr >= 0:
            keys = self._claims.setdefault(entry.cidr, [])
            if add:
                bisect.insort(keys, entry.key)
            else:
                keys.remove(entry.key)
                if not keys:
                    del self._claims[entry.cidr]
            if len(keys) > 1:
                self._contested.add(entry.cidr)
            else:
                self._contested.discard(entry.cidr)

    def _update(self, cidrs: set[int]) -> bool:
        """Under the lock: the table's routes for these CIDRs as their first
        claimant now has them; whether a route (not only its revision) changed."""
        t, changes, moved = self._table, {}, False
        for cidr in cidrs:
            keys = self._claims.get(cidr)
            want = None
            if keys:
                first = self._entries[keys[0]]
                want = (first.via, first.mod_revision)
            i = t.index(cidr)
            have = (t.vias[i], t.details[i]) if i >= 0 else None
            if want != have:
                changes[cidr] = want
                moved |= want is None or have is None or want[0] != have[0]
        if changes:
            self._table = t.updated(changes)
            if self._taken is not None:
                self._taken.update(changes)
        return moved

    def _changed(self, changed: bool) -> None:
        if changed:
            with self._lock:
                self._counts["route_changes"] += 1
            self.on_change()

    def _check_ours(self, key: str, entry: _Entry | None) -> None:
        """Under the lock, for the key of one of our CIDRs as the view now has
        it: one we held that is gone or off our lease (expired, deleted or
        overwritten) is claimed again, and so is a conflicting one once freed."""
        cidr = self._wanted[key]
        how = self._held.get(cidr)
        if how is not None and (entry is None or entry.lease != (self._lease if how == "lease" else 0)):
            del self._held[cidr]
            self._wake.set()
        elif how is None and entry is None and cidr in self._conflicts:
            self._wake.set()

    def _key_of(self, kv: dict[str, Any]) -> str:
        return _unb64(kv["key"]).decode(errors="replace")

    def _entry(self, kv: dict[str, Any]) -> _Entry:
        key = self._key_of(kv)
        lease, revision = int(kv.get("lease", 0)), int(kv.get("mod_revision", 0))
        tail, value = key[len(self.subnets):], _unb64(kv.get("value", ""))
        try:
            cidr = _fast_subnet_key(tail)
            if cidr is None:
                network = parse_subnet_key(tail)  # raises the precise error, or
                cidr = key_of(int(network.network_address), network.prefixlen)
            attrs = _fast_attrs(value)
            if attrs is None:
                ip, backend = parse_attrs(value)  # raises the precise error
                attrs = int(ip), backend
        except ValueError as e:
            return _Entry(key, lease, -1, 0, revision, str(e))
        via, backend = attrs
        if via == self._node:
            reason = None if cidr in self._own else \
                "PublicIP is this node's own address, but node.pod_cidrs does not name it"
        elif backend != BACKEND:
            reason = f"BackendType {backend!r}: not an ipip node, so not routed"
        elif cidr in self._own:
            reason = f"this node's own pod CIDR, held by {IPv4Address(via)}"
        else:
            reason = route_problem(cidr >> 6, cidr & 63, via)
            if reason is None:
                return _Entry(key, lease, cidr, via, revision, None)
        return _Entry(key, lease, -1, 0, revision, reason)

    # ---- the lease thread --------------------------------------------------------------

    def _lease_step(self, api: _Api) -> float:
        """One round: the keep-alive (or, with nothing to register, a health
        check), a new lease if it expired, and a claim of each CIDR not held;
        the next round comes after a third of the TTL, or when woken."""
        self._wake.clear()
        if not self.pod_cidrs:
            api.call("/maintenance/status", {})
        else:
            self._keep(api)
        self._ok("lease", api)
        return self.interval

    def _keep(self, api: _Api) -> None:
        if self._lease is not None:
            ttl = int(api.call("/lease/keepalive", {"ID": self._lease}).get("result", {}).get("TTL", 0))
            if ttl <= 0:  # etcd leaves TTL out for a lease it no longer has
                self._lease_lost()
        if self._lease is None:
            lease = int(api.call("/lease/grant", {"TTL": self.config.ttl, "ID": 0})["ID"])
            with self._lock:
                self._lease = lease
                self._counts["lease_grants"] += 1
        for key, cidr in self._wanted.items():
            if cidr not in self._held:
                try:
                    self._claim(api, key, cidr)
                except EtcdUnavailable as e:
                    if LEASE_NOT_FOUND not in str(e):
                        raise
                    self._lease_lost()  # it expired since the keep-alive
                    self._wake.set()
                    return

    def _lease_lost(self) -> None:
        log.warning("etcd: lease %x expired (etcd unreachable for longer than its %d s?); registering again",
                    self._lease, self.config.ttl)
        with self._lock:
            self._lease = None
            self._held.clear()
            self._counts["lease_expired"] += 1

    def _claim(self, api: _Api, key: str, cidr: IPv4Network) -> None:
        assert self._lease is not None
        put = {"request_put": {"key": _b64(key), "value": _b64(self._value), "lease": self._lease}}
        compare: dict[str, Any] = {"key": _b64(key), "result": "EQUAL", "target": "VERSION", "version": 0}
        for _ in range(CLAIM_TRIES):
            resp = api.call("/kv/txn", {"compare": [compare], "success": [put],
                                        "failure": [{"request_range": {"key": _b64(key)}}]})
            if resp.get("succeeded"):
                self._hold(cidr, key, "lease")
                return
            kvs = resp["responses"][0]["response_range"].get("kvs", [])
            if not kvs:
                continue  # deleted since
            kv = kvs[0]
            lease = int(kv.get("lease", 0))
            try:
                holder = str(parse_attrs(_unb64(kv.get("value", "")))[0])
            except ValueError as e:
                holder = f"an unreadable value ({e})"
            if holder != str(self.node_ip):
                held_by = f"lease {lease:x}" if lease else "a reservation, without a lease"
                self._refuse(cidr, Conflict(key, holder, f"{cidr}: {key} is held by {holder} ({held_by}); "
                                                         "not registered, and claimed if it is ever freed"))
                return
            if lease == 0:
                self._hold(cidr, key, "reservation")
                return
            if lease == self._lease and _unb64(kv.get("value", "")) == self._value.encode():
                self._hold(cidr, key, "lease")
                return
            # Ours from an earlier run (or in an older form): take it over as it is now.
            compare = {"key": _b64(key), "result": "EQUAL", "target": "MOD", "mod_revision": kv["mod_revision"]}
        log.warning("etcd: %s kept changing under %d transactions; trying again in %.0f s", key, CLAIM_TRIES,
                    self.interval)

    def _hold(self, cidr: IPv4Network, key: str, how: str) -> None:
        with self._lock:
            new = self._held.get(cidr) != how
            self._held[cidr] = how
            self._conflicts.pop(cidr, None)
            self._counts["registrations"] += new
        if new:
            log.info("etcd: registered %s as %s (%s)", cidr, key,
                     f"lease {self._lease:x}, {self.config.ttl} s" if how == "lease" else "a reservation")

    def _refuse(self, cidr: IPv4Network, conflict: Conflict) -> None:
        if self._conflicts.get(cidr) != conflict:  # only this thread writes it
            log.error("etcd: %s", conflict.message)
        with self._lock:
            self._conflicts[cidr] = conflict
            self._held.pop(cidr, None)

