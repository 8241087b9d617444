"""The comparison points of bench/e2e.py, one module each, and what they share:
each `start(tb)` sets its tunnel up on every node of a fresh Testbed and
returns a Running. Everything they create lives in the testbed's namespaces
(or is a process the testbed kills by PID), so teardown removes it all."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ipipfast_lab.testbed import ROUTE_METRIC, Node, Testbed

ONLINK = 4  # RTNH_F_ONLINK: the gateway is on the link, whatever its address
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ipipfast-bench"


@dataclass
class Running:
    """A mode that is up: the PIDs whose CPU time is the tunnel's, and how to
    stop it (the testbed's teardown kills whatever is left)."""
    pids: list[int] = field(default_factory=list)
    stop: Callable[[], None] = lambda: None


def missing(requires: dict[str, str]) -> list[str]:
    """Debian packages of `requires` ({command, or absolute path: package}) not installed here."""
    return sorted({pkg for what, pkg in requires.items()
                   if not (Path(what).exists() if what.startswith("/") else shutil.which(what))})


def build(compiler: list[str], source: Path, flags: list[str], suffix: str = "") -> Path:
    """Compile `source` into the cache, once per (compiler, flags, source text)."""
    key = hashlib.sha256("\0".join([*compiler, *flags, source.read_text()]).encode()).hexdigest()[:16]
    out = CACHE / f"{source.stem}-{key}{suffix}"
    if not out.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + f".{os.getpid()}.tmp")
        subprocess.run([*compiler, *flags, str(source), "-o", str(tmp)], check=True, capture_output=True, timeout=120)
        tmp.rename(out)  # atomic: a concurrent run never loads half an object
    return out


def await_link(tb: Testbed, node: Node, ifname: str, proc: subprocess.Popen, timeout: float = 10) -> int:
    """The ifindex of `ifname` once the userspace tunnel `proc` has created it."""
    deadline = time.monotonic() + timeout
    while not (found := tb.ipr(node).link_lookup(ifname=ifname)):
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited {proc.returncode} before creating {ifname}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{ifname} did not appear in {node.name} within {timeout}s")
        time.sleep(0.05)
    return found[0]


def route_into(tb: Testbed, node: Node, index: int, mtu: int) -> None:
    """Bring a tunnel device up and route every remote pod CIDR into it, at
    the metric that beats the testbed's blackholes."""
    ipr = tb.ipr(node)
    ipr.link("set", index=index, mtu=mtu, state="up")
    for other in tb.nodes:
        if other is not node:
            ipr.route("add", dst=other.pod_cidr, oif=index, priority=ROUTE_METRIC)
