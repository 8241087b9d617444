"""The faults bench.soak injects into a running two-node testbed while its
traffic runs, each waited out on the daemons' own state (never a sleep) and
timed on CLOCK_MONOTONIC, which every namespace shares:

  churn    kernel routes into each node's TUN, as BIRD writes them (`<cidr> via
           <peer> dev <tun> onlink proto bird`): CHURN_ADD added, CHURN_REPOINT
           re-pointed to a node address nobody answers (a drained node) and
           withdrawn again with the oldest beyond CHURN_KEEP; after each
           batch, the daemon's table (its control socket's routes) holds
           exactly the kernel's. Recovery: last write -> table converged.
  reload   the config file replaced (a spare route in or out: applied) and a
           SIGHUP over the same file (unchanged), each counted exactly in the
           daemon's reloads. Recovery: write or signal -> counted.
  flap     a node's underlay down for FLAP_DOWN s and up again (with its
           default route, as a network manager restores it); forwarding both
           ways resumes. Recovery: link up -> first echo reply.
  mac      a node's underlay takes a new MAC, announced by a gratuitous ARP;
           the peer's daemon follows and forwarding resumes. Recovery: change
           -> the peer's next hop holds the new MAC.
  restart  SIGKILL of a node's daemon under traffic and a new one at once on
           the persistent TUN (its routes stay); it learns the kernel's
           routes again. Recovery: exec -> first echo reply (bench.restart's
           gap), and the outage from the last reply before.
Every event also records what the daemons dropped meanwhile, by reason.
"""
from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any

from ipipfast_lab.daemons import Counters, TunnelProcess, delta, wait_until
from ipipfast_lab.testbed import Node, Testbed

CHURN_FIRST = int(IPv4Address("198.19.128.0"))  # /32s from here on: clear of the pods and the spare route
CHURN_SPAN = 1 << 14
CHURN_ADD, CHURN_REPOINT, CHURN_KEEP = 200, 100, 300
RTPROT_BIRD = 12
RTNH_F_ONLINK = 4
DRAINED = "198.18.0.99"  # on the underlay, nobody there: where re-pointed routes lead
SPARE = "198.19.250.0/24"  # in and out of the file at every other edit
FLAP_DOWN = 0.3
TIMEOUT = 30.0  # for any recovery: past it the fault is reported as not recovered
MOVED = 20  # packets each daemon must send and decapsulate for forwarding to count as resumed


@dataclass
class Life:
    """One daemon process on a node, from its exec to its end; what the
    soak expects of it (reloads) and what it saw of it (samples)."""
    node: int
    tunnel: TunnelProcess
    started_cycle: int
    restarted: bool
    reloads: dict[str, int] = field(default_factory=lambda: {"applied": 0, "unchanged": 0, "refused": 0})
    samples: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Event:
    kind: str
    node: int
    start: float  # when the fault began (the first route write, the signal, link down, the change, the kill)
    at: float  # when it was done (the last route write, the signal, link up, the change, the exec)
    recovery_s: float | None = None  # None: not recovered within TIMEOUT
    drops: dict[str, int] = field(default_factory=dict)
    detail: dict[str, Any] = field(default_factory=dict)


def drops_of(d: Counters) -> dict[str, int]:
    return {k: n for k, n in d.items() if "_drop_" in k and n}


class Faults:
    """The fault injectors over one testbed and its daemons' lives."""

    def __init__(self, tb: Testbed, lives: list[Life]) -> None:
        self.tb, self.lives = tb, lives
        self.configs = [tb.node_config(n) for n in tb.nodes]
        self.spare = [False] * len(tb.nodes)
        self.churned: list[dict[str, str]] = [{} for _ in tb.nodes]  # per node: cidr -> via, as the kernel has it
        self.next_churn = [0] * len(tb.nodes)
        self.macs = [0] * len(tb.nodes)
        for n in tb.nodes:
            tb.sysctl(n, f"net.ipv4.conf.{n.interface}.arp_notify", "1")

    def live(self, i: int) -> TunnelProcess:
        return next(lf.tunnel for lf in reversed(self.lives) if lf.node == i)

    def life(self, i: int) -> Life:
        return next(lf for lf in reversed(self.lives) if lf.node == i)

    def peer(self, i: int) -> Node:
        return self.tb.nodes[1 - i]

    def counters(self) -> list[Counters]:
        return [self.live(i).counters() for i in range(len(self.tb.nodes))]

    def dropped(self, before: list[Counters], pids: list[int]) -> dict[str, int]:
        """Drops by reason on every node since `before` (a restarted daemon's: all of its own)."""
        out: dict[str, int] = {}
        for i, b in enumerate(before):
            t = self.live(i)
            now = t.counters()
            for k, n in drops_of(delta(b, now) if t.proc.pid == pids[i] else now).items():
                out[k] = out.get(k, 0) + n
        return out

    def _pids(self) -> list[int]:
        return [self.live(i).proc.pid for i in range(len(self.tb.nodes))]

    def forwarding(self, since: list[Counters], pids: list[int]) -> bool:
        """Whether every daemon has sent and decapsulated MOVED packets since `since`."""
        for i, b in enumerate(since):
            t = self.live(i)
            d = t.counters() if t.proc.pid != pids[i] else delta(b, t.counters())
            if d.get("tx_packets", 0) < MOVED or d.get("rx_packets", 0) < MOVED:
                return False
        return True

    def _await(self, cond: Any, what: str) -> float | None:
        """Seconds until cond() holds, None past TIMEOUT."""
        t0 = time.monotonic()
        try:
            wait_until(cond, TIMEOUT, what)
        except TimeoutError:
            return None
        return time.monotonic() - t0

    # -- route churn -------------------------------------------------------

    def kernel_routes(self, i: int) -> dict[str, str]:
        """The daemon's table's routes from the kernel: cidr -> node."""
        return {r["cidr"]: r["node"] for r in self.live(i).request("routes")["routes"] if r["source"] == "kernel"}

    def _write(self, i: int, how: str, cidr: str, via: str | None = None) -> None:
        ipr = self.tb.ipr(self.tb.nodes[i])
        if how == "del":
            ipr.route("del", dst=cidr, proto=RTPROT_BIRD)
            del self.churned[i][cidr]
        else:
            tun = ipr.link_lookup(ifname=f"{self.tb.prefix}t{i}")[0]
            ipr.route("replace", dst=cidr, gateway=via, oif=tun, proto=RTPROT_BIRD, flags=RTNH_F_ONLINK)
            self.churned[i][cidr] = via

    def churn(self, i: int) -> list[Event]:
        peer, routes = self.peer(i).ip, self.churned[i]
        events = []
        added = []
        for _ in range(CHURN_ADD):
            a = CHURN_FIRST + self.next_churn[i] % CHURN_SPAN
            self.next_churn[i] += 1
            added.append(f"{IPv4Address(a)}/32")
        repointed = [c for c in routes if c not in added][:CHURN_REPOINT] if routes else added[:CHURN_REPOINT]
        batches = [("added", [("replace", c, peer) for c in added]),
                   ("repointed", [("replace", c, DRAINED) for c in repointed])]
        for name, writes in batches + [("withdrawn", None)]:
            if writes is None:  # the re-pointed ones, and the oldest beyond CHURN_KEEP
                extra = [c for c in routes if c not in repointed][:max(0, len(routes) - len(repointed) - CHURN_KEEP)]
                writes = [("del", c, None) for c in repointed + extra]
            before, pids = self.counters(), self._pids()
            start = time.monotonic()
            for how, cidr, via in writes:
                self._write(i, how, cidr, via)
            at = time.monotonic()
            want = dict(routes)
            seconds = self._await(lambda: self.kernel_routes(i) == want, f"node {i}'s table holding the kernel's")
            events.append(Event("churn", i, start, at, seconds, self.dropped(before, pids),
                                {"batch": name, "writes": len(writes), "routes": len(want)}))
        return events

    # -- reloads -------------------------------------------------------------

    def reload(self, i: int) -> list[Event]:
        t, life = self.live(i), self.life(i)
        events = []
        self.spare[i] = not self.spare[i]
        config = self.configs[i]
        config["routes"] = [r for r in config["routes"] if r["cidr"] != SPARE]
        if self.spare[i]:
            config["routes"].append({"cidr": SPARE, "via": self.peer(i).ip})
        for how in ("edit", "sighup"):
            before, pids = self.counters(), self._pids()
            want = life.reloads["applied" if how == "edit" else "unchanged"] + 1
            key = "applied" if how == "edit" else "unchanged"
            if how == "edit":
                t.write_config(config)
            else:
                t.proc.send_signal(signal.SIGHUP)
            at = time.monotonic()
            seconds = self._await(lambda: t.status()["reloads"][key] >= want, f"a reload of node {i}")
            life.reloads[key] = want
            events.append(Event("reload", i, at, at, seconds, self.dropped(before, pids), {"how": how}))
        return events

    # -- link flap, MAC change, restart ------------------------------------

    def flap(self, i: int) -> Event:
        node = self.tb.nodes[i]
        before, pids = self.counters(), self._pids()
        self.tb.underlay_link(node, False)
        down = time.monotonic()
        time.sleep(FLAP_DOWN)  # the fault itself lasts this long; recovery is waited on below
        self.tb.underlay_link(node, True)
        at = time.monotonic()
        since = self.counters()
        resumed = self._await(lambda: self.forwarding(since, pids), f"forwarding after node {i}'s link came back")
        # recovery_s: 0.0 for resumed; the soak puts link up -> first echo reply there.
        return Event("flap", i, down, at, None if resumed is None else 0.0, self.dropped(before, pids))

    def mac_change(self, i: int) -> Event:
        node, peer = self.tb.nodes[i], self.live(1 - i)
        self.macs[i] += 1
        mac = f"02:00:5e:10:{i:02x}:{self.macs[i] % 2 + 1:02x}"  # locally administered, two in turn
        before, pids = self.counters(), self._pids()
        ipr = self.tb.ipr(node)
        at = time.monotonic()
        ipr.link("set", index=ipr.link_lookup(ifname=node.interface)[0], address=mac)
        seconds = self._await(lambda: peer.status()["next_hops"].get(node.ip) == mac,
                              f"node {1 - i}'s daemon taking node {i}'s new MAC")
        since = self.counters()
        resumed = self._await(lambda: self.forwarding(since, pids), f"forwarding after node {i}'s MAC change")
        return Event("mac", i, at, at, seconds if resumed is not None else None, self.dropped(before, pids), {"mac": mac})

    def restart(self, i: int, cycle: int) -> Event:
        """recovery_s here is whether it recovered (0.0) or not (None): the
        soak puts the gap from its echo stream there."""
        node = self.tb.nodes[i]
        before, pids = self.counters(), self._pids()
        old = self.live(i)
        kill = time.monotonic()
        old.stop(sig=signal.SIGKILL)
        at = time.monotonic()
        new = TunnelProcess(self.tb, node, self.configs[i])
        self.lives.append(Life(i, new, cycle, True))
        new.wait_ready()
        ready = time.monotonic() - at
        want = dict(self.churned[i])
        learned = self._await(lambda: self.kernel_routes(i) == want,
                              f"node {i}'s new daemon learning the kernel's routes")
        since, now = self.counters(), self._pids()
        resumed = self._await(lambda: self.forwarding(since, now), f"forwarding after node {i}'s restart")
        return Event("restart", i, kill, at, None if learned is None or resumed is None else 0.0,
                     self.dropped(before, pids), {"killed_pid": old.proc.pid, "pid": new.proc.pid,
                                                  "ready_s": ready, "routes_learned_s": learned})
