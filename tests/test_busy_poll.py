"""The busy-polling policy of the loops (ipf_spin in worker.h), on a clock
kept by the test: it spins its longest while work comes soon, not at all
once the gaps outlast twice the longest spin (they would only waste the
CPU), and never more than its budget of one CPU over time."""
from __future__ import annotations

from ipipfast_lab.packets import BusyPoll

US = 1000
MAX = 200 * US


def idle(bp: BusyPoll, now: int, gap: int) -> tuple[int, int]:
    """One idle gap of `gap` ns from now, as the loop lives it: it spins for
    the window it is given, or until work comes, then sleeps the rest.
    Returns (how long it spun, when work came)."""
    window = bp.window(now)
    spun = min(window, gap)
    bp.done(now, spun, now + gap)
    return spun, now + gap


def test_spins_its_longest_while_work_comes_soon() -> None:
    bp, now = BusyPoll(MAX, 100), 10**12
    for _ in range(100):
        assert bp.window(now) == MAX
        _, now = idle(bp, now, 120 * US)
        now += 10 * US  # the work itself


def test_stops_when_gaps_outlast_twice_the_spin_and_starts_again_when_they_shorten() -> None:
    bp, now = BusyPoll(MAX, 100), 10**12
    spun_total = 0
    for _ in range(200):  # a sparse ping, 1 ms apart
        spun, now = idle(bp, now, 1000 * US)
        spun_total += spun
    assert bp.window(now) == 0
    assert spun_total <= 10 * MAX  # only while the average learnt the gaps
    for _ in range(40):  # a ping-pong again
        _, now = idle(bp, now, 100 * US)
    assert bp.window(now) == MAX


def test_never_spins_more_than_its_budget() -> None:
    for budget in (10, 25, 50):
        bp, now = BusyPoll(MAX, budget), 10**12
        start, spun_total = now, 0
        for _ in range(10_000):  # gaps a spin would cover, back to back
            spun, now = idle(bp, now, 150 * US)
            spun_total += spun
        assert spun_total <= (now - start) * budget / 100 + 2 * MAX
        assert spun_total >= (now - start) * budget / 100 * 0.9  # and it uses what it earns


def test_off_never_spins() -> None:
    bp = BusyPoll(0, 100)
    assert bp.window(10**12) == 0
