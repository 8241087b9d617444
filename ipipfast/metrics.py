"""The node's Prometheus metrics on prometheus-client: a collector that reads
one snapshot per scrape, beside the client's process and platform metrics."""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .config import StatsConfig
from .counters import PeerCounts, Snapshot

PREFIX = "ipipfast"
ROUTE_KINDS = ("encapsulated", "direct")
# The etcd source's totals: EtcdSource.counters() key, metric name, help.
ETCD_COUNTERS = (
    ("etcd_errors", "etcd_errors", "Requests to etcd that failed (down, unreachable, or answering an error); "
     "each is retried with backoff, and the routes stay."),
    ("etcd_lists", "etcd_lists", "Full reads of the subnet prefix (at start, after a compaction the watch fell "
     "behind, after the store's revision went back)."),
    ("etcd_compacted", "etcd_watch_compacted", "Watches etcd cancelled because they fell behind a compaction."),
    ("etcd_watch_events", "etcd_watch_events", "Key changes the watch delivered."),
    ("etcd_route_changes", "etcd_route_changes", "Times the routes from etcd changed (a CIDR came, went or moved)."),
    ("etcd_lease_grants", "etcd_lease_grants", "Leases granted to this node (at start, and after one expired)."),
    ("etcd_lease_expired", "etcd_lease_expired", "Times this node's lease expired (etcd away for longer than "
     "its TTL) and it registered again."),
    ("etcd_registrations", "etcd_registrations", "This node's pod CIDRs registered (claimed, or taken over)."),
)
OTHER = "other"  # the peer label of the peers summed together


@dataclass(frozen=True)
class Reading:
    """What one scrape reads of the node."""
    snapshot: Snapshot
    routes: Mapping[tuple[str, str], int]  # (source, kind) -> how many
    reloads: Mapping[str, int]             # result: applied | unchanged | refused -> how many
    kernel: Mapping[str, int]              # the kernel route source's and writer's counters (Routing.counters)
    etcd: Mapping[str, int] | None = None  # the etcd source's (EtcdSource.counters), when there is one
    etcd_conflicts: Sequence[tuple[str, str, str]] = ()  # (cidr, key, holder) of this node's refused CIDRs


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
        if r.etcd is not None:
            yield from _etcd(r.etcd, r.etcd_conflicts)
        yield GaugeMetricFamily(f"{PREFIX}_table_generation", "Forwarding tables published since the start; "
                                "moves on at every route reload and next-hop change.", value=s.generation)


def _etcd(e: Mapping[str, int], conflicts: Sequence[tuple[str, str, str]]) -> Iterator[Metric]:
    yield GaugeMetricFamily(f"{PREFIX}_etcd_connected", "1 while etcd answers; 0 while it is away (the last "
                            "table forwards on) or before it first answered.", value=e["etcd_connected"])
    yield GaugeMetricFamily(f"{PREFIX}_etcd_revision", "The etcd revision the source's view is as of.",
                            value=e["etcd_revision"])
    yield GaugeMetricFamily(f"{PREFIX}_etcd_registered", "This node's pod CIDRs registered in etcd.",
                            value=e["etcd_registered"])
    refused = GaugeMetricFamily(f"{PREFIX}_etcd_conflicts", "This node's pod CIDRs that another node holds in "
                                "etcd, by the key and its holder (PublicIP): not registered, claimed when freed.",
                                labels=("cidr", "key", "holder"))
    for cidr, key, holder in conflicts:
        refused.add_metric([cidr, key, holder], 1)
    yield refused
    for key, name, help in ETCD_COUNTERS:
        yield _counter(name, help, samples={(): e[key]})


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
