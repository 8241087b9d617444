"""The node's counters as one typed snapshot, read once from the datapath's C
structs: a metrics scrape, the status file and `ipipfast show` all render the
same read, so they never disagree and nothing is parsed back from strings."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from types import MappingProxyType


@dataclass(frozen=True)
class Direction:
    """One direction of one worker, or their sum. tx: encapsulated (TUN ->
    underlay); rx: decapsulated (underlay -> TUN)."""
    packets: int = 0
    bytes: int = 0
    # tx: GSO super-packets segmented; rx: coalesced (GRO) packets written.
    offloaded: int = 0
    # Every reason of the direction, in the datapath's order, with its count.
    drops: Mapping[str, int] = field(default_factory=dict)

    def __add__(self, other: Direction) -> Direction:
        return Direction(self.packets + other.packets, self.bytes + other.bytes, self.offloaded + other.offloaded,
                         MappingProxyType({r: n + other.drops.get(r, 0) for r, n in self.drops.items()}))

    @property
    def dropped(self) -> int:
        return sum(self.drops.values())


@dataclass(frozen=True)
class Ring:
    """The frames of a receive ring, or of all of them: seen by the kernel
    (PACKET_STATISTICS tp_packets: every frame past the socket filter, those
    it dropped for want of a slot, ring_full, included) and taken by the
    decap loop. At rest, seen == taken + rx ring_full, and taken == rx
    packets + every other rx drop: each frame the ring saw is accounted for."""
    seen: int = 0
    taken: int = 0

    def __add__(self, other: Ring) -> Ring:
        return Ring(self.seen + other.seen, self.taken + other.taken)


@dataclass(frozen=True)
class Worker:
    tx: Direction
    rx: Direction
    ring: Ring = Ring()


@dataclass(frozen=True)
class Icmp:
    sent: int = 0           # errors the datapath sent (no route, too big, relayed)
    ratelimited: int = 0    # errors held back by the node's budget
    relayed: int = 0        # errors about outer packets relayed to the inner sender
    pmtu_updates: int = 0   # path MTUs learned from fragmentation-needed


@dataclass(frozen=True)
class PeerCounts:
    """What the tunnel carried toward one peer and from it, every worker and
    every table since the start summed. tx: frames queued to the device
    (the direction's packets plus those the device then refused,
    send_failed); rx: frames decapsulated (the direction's packets plus the
    inner ones that the TUN then refused, write_failed). Bytes are inner
    bytes, as the directions count them."""
    tx_packets: int = 0
    tx_bytes: int = 0
    rx_packets: int = 0
    rx_bytes: int = 0

    def __add__(self, other: PeerCounts) -> PeerCounts:
        return PeerCounts(self.tx_packets + other.tx_packets, self.tx_bytes + other.tx_bytes,
                          self.rx_packets + other.rx_packets, self.rx_bytes + other.rx_bytes)

    @property
    def bytes(self) -> int:
        return self.tx_bytes + self.rx_bytes


@dataclass(frozen=True)
class Snapshot:
    workers: tuple[Worker, ...]
    icmp: Icmp
    generation: int  # of the forwarding table the loops read
    # Packets the kernel dropped at the TUN's full queue before any worker
    # read them (its tx_dropped since the daemon started): not the
    # datapath's to count, so the daemon adds them; `tx` includes them.
    queue_full: int = 0
    # IPIP frames the node tried to send that the datapath did not make (a
    # pod's, masqueraded), dropped by the underlay's tc egress (tc_drops.py):
    # no direction of the tunnel, so counted beside them.
    foreign_ipip: int = 0
    # Peer IPv4 -> its counts, for every peer that has any (also a peer no
    # longer in the table), in address order.
    peers: Mapping[str, PeerCounts] = field(default_factory=dict)

    @property
    def tx(self) -> Direction:
        total = _sum(w.tx for w in self.workers)
        return replace(total, drops=MappingProxyType({**total.drops, "queue_full": self.queue_full}))

    @property
    def rx(self) -> Direction:
        return _sum(w.rx for w in self.workers)

    @property
    def ring(self) -> Ring:
        return sum((w.ring for w in self.workers), Ring())


def _sum(directions: Iterable[Direction]) -> Direction:
    total: Direction | None = None
    for d in directions:
        total = d if total is None else total + d
    return total or Direction()


def to_json(snapshot: Snapshot) -> dict:
    """The snapshot as the status file and the control socket give it:
    totals per direction (workers summed), ICMP, each worker, and each
    peer's counts."""
    def direction(d: Direction) -> dict:
        return {"packets": d.packets, "bytes": d.bytes, "offloaded": d.offloaded, "drops": dict(d.drops)}
    return {"tx": direction(snapshot.tx), "rx": direction(snapshot.rx), "ring": asdict(snapshot.ring),
            "icmp": asdict(snapshot.icmp), "foreign_ipip": snapshot.foreign_ipip,
            "workers": [{"tx": direction(w.tx), "rx": direction(w.rx), "ring": asdict(w.ring)}
                        for w in snapshot.workers],
            "peers": {ip: asdict(p) for ip, p in snapshot.peers.items()}}
