"""ipipfast daemons on testbed nodes, as real processes: for the demo, the
integration tests and the benchmarks; and the states to wait on (a table
generation, a reload's outcome, counters reaching what was sent) instead
of sleeping."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ipipfast import control
from ipipfast.config import TunnelConfig

from .testbed import Node, Testbed

T = TypeVar("T")
Counters = dict[str, int]


def wait_until(cond: Callable[[], T], timeout: float = 10, what: str = "the condition") -> T:
    """Polls cond() until it returns something true, and returns that;
    TimeoutError after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not (value := cond()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached after {timeout}s")
        time.sleep(0.02)
    return value


def delta(before: Counters, after: Counters) -> Counters:
    """The counters that moved, by how much."""
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def tx_accounted(d: Counters) -> int:
    """Packets the encap side has accounted for: sent, or dropped for any reason."""
    return d.get("tx_packets", 0) + sum(n for k, n in d.items() if k.startswith("tx_drop_"))


def flat_counters(c: Mapping[str, Any]) -> Counters:
    """A status's counters under the names of the README's Counters section
    (tx_packets, tx_drop_no_route, tx_gso, rx_gro, ring_seen, icmp_relayed, ...)."""
    out: Counters = {}
    for d in ("tx", "rx"):
        out[f"{d}_packets"], out[f"{d}_bytes"] = c[d]["packets"], c[d]["bytes"]
        out.update({f"{d}_drop_{reason}": n for reason, n in c[d]["drops"].items()})
    out["tx_gso"], out["rx_gro"] = c["tx"]["offloaded"], c["rx"]["offloaded"]
    out["ring_seen"], out["ring_taken"] = c["ring"]["seen"], c["ring"]["taken"]
    i = c["icmp"]
    out.update(icmp_sent=i["sent"], icmp_ratelimited=i["ratelimited"], icmp_relayed=i["relayed"],
               pmtu_updates=i["pmtu_updates"], foreign_ipip=c["foreign_ipip"])
    return out


def stop_process(proc: subprocess.Popen, timeout: float = 10, sig: int = signal.SIGTERM) -> None:
    """Sends sig (SIGTERM: cleanly; SIGKILL: as a crash would), SIGKILL after
    `timeout` anyway, and reaps it."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class NodeProcess:
    """A daemon inside a node's namespace, its output in a log file."""

    def __init__(self, tb: Testbed, node: Node, argv: list[str], log_path: Path,
                 cwd: str | Path | None = None, env: dict[str, str] | None = None) -> None:
        self.tb, self.node, self.log_path = tb, node, log_path
        self._log = open(log_path, "wb")
        self._final_log: str | None = None
        self.proc = tb.popen(node, argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=cwd, env=env)

    def log(self) -> str:
        if self._final_log is not None:
            return self._final_log
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 10, sig: int = signal.SIGTERM) -> int:
        """Stops it (SIGTERM: cleanly; SIGKILL: as a crash would; SIGKILL
        after `timeout` anyway); the log stays readable from log()."""
        stop_process(self.proc, timeout, sig)
        if self._final_log is None:
            self._log.close()
            self._final_log = self.log()
        return self.proc.returncode


class TunnelProcess(NodeProcess):
    """`ipipfast run` inside a node's namespace, with its config and status
    file in a private directory; asked over its control socket."""

    def __init__(self, tb: Testbed, node: Node, config: dict[str, Any] | str, verbose: bool = False,
                 cwd: str | Path | None = None, args: Sequence[str] = (), wrapper: Sequence[str] = (),
                 env: dict[str, str] | None = None, log_format: str = "text", tunnel: str | None = None) -> None:
        """config: a dict, or the file's text (whose TUN is then named by
        tunnel, or the default); cwd: where the daemon starts, so `python -m
        ipipfast` imports the checkout there first (bench.ab runs another
        revision's build so);
        args: more options for `ipipfast run` (e.g. --remove-device);
        wrapper: a command it runs under (e.g. setpriv with fewer privileges);
        env: its whole environment (default: ours)."""
        self.dir = Path(tempfile.mkdtemp(prefix=f"{tb.prefix}-n{node.index}-"))
        self.config_path = self.dir / "node.yaml"
        # Apart from the config, as /run is from /etc: every status write in the
        # config's directory would wake the daemon's config watcher.
        self.status_path = self.dir / "run" / "status.json"
        self.status_path.parent.mkdir()
        # Where the test process reaches the socket the daemon makes in its /run/ipipfast.
        if isinstance(config, dict):
            tunnel = config.get("tunnel", {}).get("name", TunnelConfig.name)
        self.socket_path = control.socket_path(tunnel or TunnelConfig.name, tb.run_dir(node))
        self.write_config(config)
        argv = [*wrapper, sys.executable, "-m", "ipipfast", *(["-v"] if verbose else []),
                *(["--log-format", log_format] if log_format != "text" else []), "run",
                "--config", str(self.config_path), "--status-file", str(self.status_path), *args]
        self._final_status: dict[str, Any] | None = None
        super().__init__(tb, node, argv, self.dir / "daemon.log", cwd, env)

    def write_config(self, config: dict[str, Any] | str) -> None:
        """Replaces the config file whole (a dict, or raw text), as tools that
        manage files do: the daemon watches it, and would read a file being
        written in place half-written."""
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
        tmp.replace(self.config_path)

    def wait_ready(self, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while not self.status_path.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"ipipfast on {self.node.name} exited {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"ipipfast on {self.node.name} not ready after {timeout}s:\n{self.log()}")
            time.sleep(0.05)

    def request(self, what: str) -> dict[str, Any]:
        """The daemon's answer to {"get": what} on its control socket."""
        return control.request(self.socket_path, what)

    def status(self) -> dict[str, Any]:
        """The daemon's status now; once it has exited, its status file's last word."""
        if self.proc.poll() is None:
            return self.request("status")
        return self._final_status or json.loads(self.status_path.read_text())

    def wait_for(self, holds: Callable[[dict[str, Any]], bool], timeout: float = 15) -> dict[str, Any]:
        """The daemon's status, once holds(status) is true."""
        def answer() -> dict[str, Any] | None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ipipfast on {self.node.name} exited {self.proc.returncode}:\n{self.log()}")
            status = self.status()
            return status if holds(status) else None
        return wait_until(answer, timeout, f"a status of {self.node.name}'s daemon")

    def counters(self) -> Counters:
        """The datapath's counters in the README's flat names, and the kernel
        route source's."""
        status = self.status()
        return {**flat_counters(status["counters"]), **status.get("kernel_routes", {})}

    def wait_counters(self, before: Counters, until: Mapping[str, int] | Callable[[Counters], bool],
                      timeout: float = 10) -> Counters:
        """How the counters moved since `before`, once they moved at least as
        `until` says (each counter by at least that much, or a predicate on
        the delta); after timeout, the last delta, for the caller's assertion
        to show."""
        reached = until if callable(until) else lambda d: all(d.get(k, 0) >= n for k, n in until.items())
        last: Counters = {}

        def moved() -> bool:
            last.clear()
            last.update(delta(before, self.counters()))
            return reached(last)
        try:
            wait_until(moved, timeout)
        except TimeoutError:
            pass
        return last

    def reload(self, config: dict[str, Any] | str, timeout: float = 10) -> dict[str, Any]:
        """Replaces the config file (a dict, or raw text to test bad input),
        which the daemon follows (inotify), and returns the status once it
        has applied the new file or refused it."""
        before = self.status()
        self.write_config(config)

        def answered() -> dict[str, Any] | None:
            now = self.status()
            return now if now["reloads"] != before["reloads"] else None
        # An applied reload has reconciled: the datapath and the kernel have its table.
        return wait_until(answered, timeout, f"a reload of {self.node.name}'s daemon")

    def stop(self, timeout: float = 10, sig: int = signal.SIGTERM) -> int:
        returncode = super().stop(timeout, sig)
        if self._final_status is None and self.status_path.exists():  # kept for status(), as log() keeps the log
            self._final_status = json.loads(self.status_path.read_text())
        shutil.rmtree(self.dir, ignore_errors=True)
        return returncode


def start_tunnels(tb: Testbed, verbose: bool = False, cwd: str | Path | None = None, file_routes: bool = True,
                  configs: list[dict[str, Any]] | None = None, **tunnel: Any) -> list[TunnelProcess]:
    """One ipipfast per node, each with routes to every other node (or with
    `routes: []` if not file_routes: the table then comes from the kernel;
    or with configs, one per node from the first); returns once all are up
    (their status files exist)."""
    configs = configs or [tb.node_config(n, **tunnel) for n in tb.nodes]
    if not file_routes:
        for config in configs:
            config["routes"] = []
    procs = [TunnelProcess(tb, n, config, verbose, cwd) for n, config in zip(tb.nodes, configs)]
    try:
        for p in procs:
            p.wait_ready()
    except BaseException:
        for p in procs:
            p.stop()
        raise
    return procs


@contextmanager
def running_tunnels(tb: Testbed, **tunnel: Any) -> Iterator[list[TunnelProcess]]:
    """start_tunnels for the length of a with block, stopped even on failure."""
    procs = start_tunnels(tb, **tunnel)
    try:
        yield procs
    finally:
        for p in procs:
            p.stop()
