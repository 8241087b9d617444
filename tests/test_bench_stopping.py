"""SIGTERM stops the benchmark harnesses even when its first raise is swallowed."""
from __future__ import annotations

import os
import signal

import pytest

from bench import stopping


@pytest.fixture
def sigterm_handler_restored():
    saved = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, saved)
    stopping._requested = False


def test_a_swallowed_sigterm_is_raised_again_at_the_next_check(sigterm_handler_restored) -> None:
    stopping.install()
    stopping.check()  # nothing requested yet
    try:  # as logging's at-fork hook does with whatever its lock release raises
        os.kill(os.getpid(), signal.SIGTERM)
    except BaseException as e:  # noqa: B036
        assert isinstance(e, SystemExit) and e.code == 128 + signal.SIGTERM
    with pytest.raises(SystemExit) as raised:
        stopping.check()
    assert raised.value.code == 128 + signal.SIGTERM
