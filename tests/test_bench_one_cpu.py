"""bench.e2e.one_cpu, which the harness's 'RTT p50 on 1 CPU' figure runs in:
every thread of the given processes and the tools started inside the block
share one CPU, and everything gets its own CPUs back afterwards."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.e2e import one_cpu

pytestmark = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to tell pinned from free")

SLEEPER = "import threading, time; threading.Thread(target=time.sleep, args=(60,)).start(); time.sleep(60)"
SHOW = "import os; print(sorted(os.sched_getaffinity(0)))"


def threads(pid: int) -> dict[int, set[int]]:
    return {int(t.name): os.sched_getaffinity(int(t.name)) for t in Path(f"/proc/{pid}/task").iterdir()}


def test_pins_every_thread_and_what_starts_inside_then_restores() -> None:
    mine = os.sched_getaffinity(0)
    proc = subprocess.Popen([sys.executable, "-c", SLEEPER])
    try:
        deadline = time.monotonic() + 10
        while len(threads(proc.pid)) < 2 and time.monotonic() < deadline:  # its second thread is up
            time.sleep(0.01)
        before = threads(proc.pid)
        with one_cpu([proc.pid]):
            inside = threads(proc.pid)
            pinned = os.sched_getaffinity(0)
            child = subprocess.run([sys.executable, "-c", SHOW], capture_output=True, text=True, check=True).stdout
        assert len(pinned) == 1
        assert all(cpus == pinned for cpus in inside.values())
        assert child.strip() == str(sorted(pinned))
        assert threads(proc.pid) == before
        assert os.sched_getaffinity(0) == mine
    finally:
        proc.kill()
        proc.wait()


def test_restores_when_the_block_fails() -> None:
    mine = os.sched_getaffinity(0)
    with pytest.raises(RuntimeError), one_cpu([]):
        raise RuntimeError("a failed measurement")
    assert os.sched_getaffinity(0) == mine
