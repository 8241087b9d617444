"""The node's Prometheus metrics on prometheus-client: a collector that reads
one snapshot per scrape, beside the client's process and platform metrics."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .counters import Snapshot

PREFIX = "ipipfast"
ROUTE_KINDS = ("encapsulated", "direct")


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


class NodeCollector(Collector):
    def __init__(self, read: Callable[[], Reading]) -> None:
        self.read = read

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


def registry(read: Callable[[], Reading]) -> CollectorRegistry:
    reg = CollectorRegistry()
    reg.register(NodeCollector(read))
    ProcessCollector(registry=reg)   # RSS, CPU, open fds
    PlatformCollector(registry=reg)  # the Python build
    return reg


def serve(read: Callable[[], Reading], host: str, port: int) -> WSGIServer:
    """Serves the metrics from a daemon thread (any path; port 0 picks a
    free one, server_port tells which); stop with shutdown() and server_close()."""
    server, _ = start_http_server(port, host or "0.0.0.0", registry(read))
    return server
