"""ipipfast daemons on testbed nodes, as real processes: for the demo, the
integration tests and the benchmarks."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from .testbed import Node, Testbed


class NodeProcess:
    """A daemon inside a node's namespace, its output in a log file."""

    def __init__(self, tb: Testbed, node: Node, argv: list[str], log_path: Path,
                 cwd: str | Path | None = None) -> None:
        self.tb, self.node, self.log_path = tb, node, log_path
        self._log = open(log_path, "wb")
        self._final_log: str | None = None
        self.proc = tb.popen(node, argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=cwd)

    def log(self) -> str:
        if self._final_log is not None:
            return self._final_log
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 10) -> int:
        """SIGTERM, SIGKILL after `timeout`; the log stays readable from log()."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._final_log is None:
            self._log.close()
            self._final_log = self.log()
        return self.proc.returncode


class TunnelProcess(NodeProcess):
    """`ipipfast run` inside a node's namespace, with its config and status
    file in a private directory."""

    def __init__(self, tb: Testbed, node: Node, config: dict[str, Any], verbose: bool = False,
                 cwd: str | Path | None = None) -> None:
        """cwd: where the daemon starts, so `python -m ipipfast` imports the
        checkout there first (bench.ab runs another revision's build so)."""
        self.dir = Path(tempfile.mkdtemp(prefix=f"{tb.prefix}-n{node.index}-"))
        self.config_path = self.dir / "node.yaml"
        self.status_path = self.dir / "status.json"
        self.write_config(config)
        argv = [sys.executable, "-m", "ipipfast", *(["-v"] if verbose else []), "run",
                "--config", str(self.config_path), "--status-file", str(self.status_path)]
        super().__init__(tb, node, argv, self.dir / "daemon.log", cwd)

    def write_config(self, config: dict[str, Any]) -> None:
        self.config_path.write_text(yaml.safe_dump(config))

    def wait_ready(self, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while not self.status_path.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"ipipfast on {self.node.name} exited {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"ipipfast on {self.node.name} not ready after {timeout}s:\n{self.log()}")
            time.sleep(0.05)

    def status(self) -> dict[str, Any]:
        return json.loads(self.status_path.read_text())

    def counters(self, fresh: bool = True) -> dict[str, int]:
        """The daemon's counters; fresh waits for a status write newer than now."""
        if fresh:
            since = time.time()
            while self.status_path.stat().st_mtime < since and self.proc.poll() is None:
                time.sleep(0.05)
        return self.status()["counters"]

    def reload(self, config: dict[str, Any] | str) -> None:
        """Rewrites the config file (a dict, or raw text to test bad input) and sends SIGHUP."""
        if isinstance(config, str):
            self.config_path.write_text(config)
        else:
            self.write_config(config)
        self.proc.send_signal(signal.SIGHUP)

    def stop(self, timeout: float = 10) -> int:
        returncode = super().stop(timeout)
        shutil.rmtree(self.dir, ignore_errors=True)  # log() keeps the log for the caller
        return returncode


def start_tunnels(tb: Testbed, verbose: bool = False, cwd: str | Path | None = None, file_routes: bool = True,
                  **tunnel: Any) -> list[TunnelProcess]:
    """One ipipfast per node, each with routes to every other node (or with
    `routes: []` if not file_routes: the table then comes from the kernel);
    returns once all are up (their status files exist)."""
    configs = [tb.node_config(n, **tunnel) for n in tb.nodes]
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
