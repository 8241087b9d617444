"""The node's Prometheus metrics on prometheus-client: a collector that reads
one snapshot per scrape, beside the client's process and platform metrics."""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .config import StatsConfig
from .counters import PeerCounts, Snapshot

PREFIX = "ipipfast"
ROUTE_KINDS = ("encapsulated", "direct")
OTHER = "other"  # the peer label of the peers summed together


@dataclass(frozen=True)
class Reading:
    """What one scrape reads of the node."""
    snapshot: Snapshot
    routes: Mapping[tuple[str, str], int]  # (source, kind) -> how many
    reloads: Mapping[str, int]             # result: applied | unchanged | refused -> how many
    kernel: Mapping[str, int]              # the kernel route source's and writer's counters (Routing.counters)


def _counter(name: str, help: str, labels: tuple[str, ...] = (),
             samples: Mapping[tuple[str, ...], int] | None = None) -> CounterMetricFamily:
    family = CounterMetricFamily(f"{PREFIX}_{name}", help, labels=labels)
    for values, n in (samples or {}).items():
        family.add_metric(list(values), n)
    return family


class PeerSeries:
    """Which peers have a series of their own, by the rule of
    StatsConfig.peer_series: placed once, at the first scrape that finds a
    peer's traffic, for the daemon's life."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.own: set[str] = set()
        self.other: set[str] = set()
        self.lock = threading.Lock()  # scrapes may come at once

    def split(self, peers: Mapping[str, PeerCounts]) -> tuple[dict[str, PeerCounts], PeerCounts | None]:
        """The peers with their own series, and the sum of the others
        (None while there are none)."""
        with self.lock:
            new = sorted((p for p in peers if p not in self.own and p not in self.other),
                         key=lambda p: (-peers[p].bytes, p))
            for p in new:
                (self.own if len(self.own) < self.cap else self.other).add(p)
            own = {p: peers[p] for p in sorted(self.own) if p in peers}
            other = [peers[p] for p in self.other if p in peers]
        return own, sum(other, PeerCounts()) if other else None


class NodeCollector(Collector):
    def __init__(self, read: Callable[[], Reading], peer_series: int = StatsConfig.peer_series) -> None:
        self.read = read
        self.peers = PeerSeries(peer_series)

    def collect(self) -> Iterator[Metric]:
        r = self.read()
        s = r.snapshot
        tx, rx = s.tx, s.rx  # each sums the workers
        directions = (("tx", tx), ("rx", rx))
        yield _counter("packets", "Packets through the tunnel (tx: encapsulated, rx: decapsulated).",
                       ("direction",), {(d,): c.packets for d, c in directions})
        yield _counter("bytes", "Bytes of inner packets through the tunnel (tx: encapsulated, rx: decapsulated).",
                       ("direction",), {(d,): c.bytes for d, c in directions})
        yield _counter("dropped_packets", "Packets dropped, by direction and reason.", ("direction", "reason"),
                       {(d, reason): n for d, c in directions for reason, n in c.drops.items()})
        own, other = self.peers.split(s.peers)
        by_peer = {**own, **({OTHER: other} if other else {})}
        yield _counter("peer_packets", "Packets through the tunnel by peer (its underlay address; "
                       f'"{OTHER}": the peers past stats.peer_series, summed) and direction (tx: encapsulated '
                       "toward it and queued to the device, rx: decapsulated from it).", ("peer", "direction"),
                       {k: v for p, c in by_peer.items()
                        for k, v in (((p, "tx"), c.tx_packets), ((p, "rx"), c.rx_packets))})
        yield _counter("peer_bytes", "Inner bytes through the tunnel by peer and direction, as "
                       "ipipfast_peer_packets counts them.", ("peer", "direction"),
                       {k: v for p, c in by_peer.items()
                        for k, v in (((p, "tx"), c.tx_bytes), ((p, "rx"), c.rx_bytes))})
        yield _counter("rx_ring_frames", "Frames of the receive rings: seen by the kernel past the socket filter "
                       "(those it dropped for want of a slot, rx ring_full, included) and taken by the decap "
                       "loops. At rest seen = taken + ring_full, and taken = rx packets + the other rx drops.",
                       ("stage",), {("seen",): s.ring.seen, ("taken",): s.ring.taken})
        yield _counter("gso_packets", "GSO super-packets read from the TUN and segmented for the underlay.",
                       samples={(): tx.offloaded})
        yield _counter("gro_packets", "Coalesced packets (more than one segment) written to the TUN.",
                       samples={(): rx.offloaded})
        yield _counter("icmp_errors_sent", "ICMP errors the datapath sent to inner senders "
                       "(net unreachable for no route, fragmentation needed for too big).", samples={(): s.icmp.sent})
        yield _counter("icmp_errors_ratelimited", "ICMP errors held back by the rate limits "
                       "(per destination, and the node's 1000/s).", samples={(): s.icmp.ratelimited})
        yield _counter("icmp_errors_relayed", "ICMP errors about outer packets relayed to the inner sender.",
                       samples={(): s.icmp.relayed})
        yield _counter("pmtu_updates", "Path MTUs toward peers learned from fragmentation-needed errors.",
                       samples={(): s.icmp.pmtu_updates})
        yield _counter("foreign_ipip_dropped_packets", "IPIP packets the node tried to send on the underlay "
                       "that ipipfast did not make (a pod's, masqueraded to the node's address, which every "
                       "other node would accept), dropped by the tc egress filter.", samples={(): s.foreign_ipip})
        yield _counter("reloads", "Config reloads (SIGHUP or an edit of the file) by result: applied, unchanged "
                       "(the same file), or refused for a bad file (the running table stays).", ("result",),
                       {(k,): n for k, n in r.reloads.items()})
        k = r.kernel
        yield _counter("kernel_route_writes", "Route messages ipipfast sent the kernel (its own routes: into the "
                       "TUN, and direct ones on the underlay).", samples={(): k["kernel_route_writes"]})
        yield _counter("kernel_route_write_errors", "Route writes the kernel refused for another reason than "
                       "the route being held by someone else (tried again at the next resync).",
                       samples={(): k["kernel_route_write_errors"]})
        yield _counter("kernel_resyncs", "Full dumps of the kernel's routes (at start, every kernel.resync "
                       "seconds, after lost notifications), by whether they found the mirror wrong.", ("changed",),
                       {("false",): k["kernel_resyncs"] - k["kernel_resyncs_changed"],
                        ("true",): k["kernel_resyncs_changed"]})
        yield _counter("kernel_notifications_lost", "Times the route notifications overflowed (ENOBUFS) and a "
                       "dump repaired the mirror.", samples={(): k["kernel_notifications_lost"]})
        yield _counter("kernel_routes_refused", "Routes into the TUN that ipipfast cannot follow, by reason "
                       "(no_gateway, multipath, bad_gateway, tos), counted once each.", ("reason",),
                       {(key.removeprefix("kernel_routes_refused_"),): n for key, n in k.items()
                        if key.startswith("kernel_routes_refused_")})
        routes = GaugeMetricFamily(f"{PREFIX}_routes", "Routes in the running table, by where they came from "
                                   "and whether they go through the tunnel or directly on the underlay.",
                                   labels=("source", "kind"))
        for (source, kind), n in r.routes.items():
            routes.add_metric([source, kind], n)
        yield routes
        yield GaugeMetricFamily(f"{PREFIX}_table_generation", "Forwarding tables published since the start; "
                                "moves on at every route reload and next-hop change.", value=s.generation)


def registry(read: Callable[[], Reading], peer_series: int = StatsConfig.peer_series) -> CollectorRegistry:
    reg = CollectorRegistry()
    reg.register(NodeCollector(read, peer_series))
    ProcessCollector(registry=reg)   # RSS, CPU, open fds
    PlatformCollector(registry=reg)  # the Python build
    return reg


def serve(read: Callable[[], Reading], host: str, port: int,
          peer_series: int = StatsConfig.peer_series) -> WSGIServer:
    """Serves the metrics from a daemon thread (any path; port 0 picks a
    free one, server_port tells which); stop with shutdown() and server_close()."""
    server, _ = start_http_server(port, host or "0.0.0.0", registry(read, peer_series))
    return server
