"""SIGTERM for the long-running harnesses (e2e, soak): unwind as on Ctrl-C,
so that the testbed in use is torn down and its processes are killed.

The handler raises SystemExit wherever the main thread is. Where that is
inside code that swallows exceptions, the request would be lost: every fork
the testbed makes runs logging's at-fork hook, which prints "Exception ignored
in _releaseLock" and carries on, and a benchmark run went on for minutes after
its SIGTERM that way. So the request is also kept on record, and check()
raises it again at the harness's next step."""
from __future__ import annotations

import signal
import sys
from types import FrameType

_requested = False


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    global _requested
    _requested = True
    sys.exit(128 + signum)


def install() -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)


def check() -> None:
    """Raises SystemExit if SIGTERM came, even if its first raise was swallowed."""
    if _requested:
        sys.exit(128 + signal.SIGTERM)
