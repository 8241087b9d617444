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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from .testbed import Node, Testbed


class TunnelProcess:
    """`ipipfast run` inside a node's namespace, with its config and status
    file in a private directory."""

    def __init__(self, tb: Testbed, node: Node, config: dict[str, Any], verbose: bool = False,
                 cwd: str | Path | None = None) -> None:
        """cwd: where the daemon starts, so `python -m ipipfast` imports the
        checkout there first (bench.ab runs another revision's build so)."""
        self.tb, self.node = tb, node
        self.dir = Path(tempfile.mkdtemp(prefix=f"{tb.prefix}-n{node.index}-"))
        self.config_path = self.dir / "node.yaml"
        self.status_path = self.dir / "status.json"
        self.log_path = self.dir / "daemon.log"
        self.write_config(config)
        argv = [sys.executable, "-m", "ipipfast", *(["-v"] if verbose else []), "run",
                "--config", str(self.config_path), "--status-file", str(self.status_path)]
        self._log = open(self.log_path, "wb")
        self._final_log: str | None = None
        self.proc = tb.popen(node, argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=cwd)

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

    def status(self) -> dict[str, Any]:
        return json.loads(self.status_path.read_text())

    def wait_for(self, holds: Callable[[dict[str, Any]], bool], timeout: float = 15) -> dict[str, Any]:
        """The first status written from now on (twice a second) for which
        holds(status) is true."""
        deadline = time.monotonic() + timeout
        since = time.time()
        while True:
            if self.status_path.stat().st_mtime >= since:
                status = self.status()
                if holds(status):
                    return status
            if self.proc.poll() is not None:
                raise RuntimeError(f"ipipfast on {self.node.name} exited {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"ipipfast on {self.node.name}: no such status after {timeout}s:\n"
                                   f"{json.dumps(self.status())[:2000]}\n{self.log()[-3000:]}")
            time.sleep(0.05)

    def counters(self, fresh: bool = True) -> dict[str, int]:
        """The daemon's counters; fresh waits for a status write newer than now."""
        if fresh:
            since = time.time()
            while self.status_path.stat().st_mtime < since and self.proc.poll() is None:
                time.sleep(0.05)
        return self.status()["counters"]

    def reload(self, config: dict[str, Any] | str) -> None:
        """Rewrites the config file (a dict, or raw text to test bad input) and sends SIGHUP."""
        self.write_config(config)
        self.proc.send_signal(signal.SIGHUP)

    def log(self) -> str:
        if self._final_log is not None:
            return self._final_log
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._final_log is None:
            self._log.close()
            self._final_log = self.log()  # kept for the caller; the directory goes
            shutil.rmtree(self.dir, ignore_errors=True)
        return self.proc.returncode


def start_tunnels(tb: Testbed, verbose: bool = False, cwd: str | Path | None = None,
                  configs: list[dict[str, Any]] | None = None, **tunnel: Any) -> list[TunnelProcess]:
    """One ipipfast per node, each with routes to every other node (or with
    configs, one per node from the first); returns once all are up (their
    status files exist)."""
    configs = configs or [tb.node_config(n, **tunnel) for n in tb.nodes]
    procs = [TunnelProcess(tb, n, c, verbose, cwd) for n, c in zip(tb.nodes, configs)]
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
