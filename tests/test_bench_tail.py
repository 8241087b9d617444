"""bench.tail's attribution of a round trip, on a scheduler trace written by
hand in perf script's format, whose every microsecond is known: pod a wakes
pod b on its own CPU, where a CPU hog runs before pod b gets it; pod b wakes
pod a on an idle CPU."""
from __future__ import annotations

from bench.tail import IDLE, RUNNING, attribute, parse

POD_A, POD_B, HOG = 100, 200, 300


def switch(cpu: int, t_us: float, prev: tuple[str, int], state: str, nxt: tuple[str, int]) -> str:
    return (f"{prev[0]:>16s} {prev[1]:5d} [{cpu:03d}] {1000 + t_us / 1e6:.6f}:       sched:sched_switch: "
            f"prev_comm={prev[0]} prev_pid={prev[1]} prev_prio=120 prev_state={state} ==> "
            f"next_comm={nxt[0]} next_pid={nxt[1]} next_prio=120")


def waking(cpu: int, t_us: float, waker: tuple[str, int], wakee: tuple[str, int]) -> str:
    return (f"{waker[0]:>16s} {waker[1]:5d} [{cpu:03d}] {1000 + t_us / 1e6:.6f}:       sched:sched_waking: "
            f"comm={wakee[0]} pid={wakee[1]} prio=120 target_cpu={cpu:03d}")


A, B, H, IDLE0, IDLE1 = ("python", POD_A), ("python", POD_B), ("hog", HOG), ("swapper/0", 0), ("swapper/1", 0)
TRACE = [
    switch(1, -50, A, "S", IDLE1),       # cpu 1 idle from here on, until pod a comes back
    switch(0, -10, IDLE0, "R", A),       # pod a runs on cpu 0
    waking(0, 10, A, B),                 # its send() wakes pod b...
    switch(0, 15, A, "S", H),            # ...and it sleeps, but the hog gets the CPU first
    switch(0, 40, H, "R", B),            # pod b runs
    waking(0, 60, B, A),                 # its echo wakes pod a, which went to sleep on cpu 1
    switch(0, 62, B, "S", IDLE0),
    switch(1, 90, IDLE1, "R", A),        # cpu 1 out of halt: pod a runs
    switch(1, 99, A, "S", IDLE1),
]


def test_a_round_trip_is_split_into_its_causes() -> None:
    tr = parse(TRACE, {POD_A, POD_B})
    [(rtt, cost, hops)] = attribute(tr, [("pod b", POD_B), ("pod a", POD_A)], {}, [(1000.0, 95.0)])
    assert rtt == 95.0
    assert {k: round(v, 3) for k, v in cost.items() if v} == {
        RUNNING: 10 + 20 + 5,                  # pod a to its send, pod b to its echo, pod a after its wake-up
        "behind the path's own threads": 5,    # pod a on its way to sleep, on the CPU pod b was woken to
        "behind other processes": 25,          # the hog
        IDLE: 30,                              # cpu 1 coming out of halt for pod a
    }
    assert {k: round(v, 3) for k, v in hops.items()} == {
        "pod a until it wakes pod b": 10, "wake pod b": 30, "pod b until it wakes pod a": 20, "wake pod a": 30}


def test_a_wake_up_that_finds_its_thread_still_running_costs_nothing() -> None:
    # pod b's echo comes back before pod a went to sleep: no wait for pod a
    trace = [switch(1, -50, B, "S", IDLE1), switch(0, -10, IDLE0, "R", A), waking(0, 10, A, B),
             switch(1, 12, IDLE1, "R", B),
             waking(1, 30, B, A), switch(1, 32, B, "S", IDLE1), switch(0, 45, A, "S", IDLE0)]
    tr = parse(trace, {POD_A, POD_B})
    [(_, cost, hops)] = attribute(tr, [("pod b", POD_B), ("pod a", POD_A)], {}, [(1000.0, 40.0)])
    assert hops["wake pod a"] == 0
    assert round(cost[IDLE], 3) == 2  # only pod b's wake-up on the idle cpu 1
    assert round(cost[RUNNING], 3) == 10 + 18 + 10


def test_a_sender_that_never_slept_is_counted_once() -> None:
    # pod b preempts pod a at its wake-up and echoes before pod a reaches its wait
    trace = [switch(0, -10, IDLE0, "R", A), waking(0, 10, A, B), switch(0, 11, A, "R", B),
             switch(0, 30, B, "S", A), switch(0, 45, A, "S", IDLE0)]
    tr = parse(trace, {POD_A, POD_B})
    [(_, cost, hops)] = attribute(tr, [("pod b", POD_B), ("pod a", POD_A)], {}, [(1000.0, 40.0)])
    assert "wake pod a" not in hops
    assert {k: round(v, 3) for k, v in cost.items() if v} == {
        RUNNING: 10 + 19 + 10,                # pod a to its send, pod b, pod a back to its echo
        "behind the path's own threads": 1}   # pod a, before pod b got the CPU
