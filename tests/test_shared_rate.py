"""A messages-per-second limit shared by many processes (``SharedRate``) and the check of its
promise (``window_violation``), on ``task.Clock``."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, task

from twistmail.ratelimit import SharedDomainLimiter, SharedRate, window_violation


class Schedule:
    """The shared schedule of slots (what the database's table keeps): ``next`` is the first
    free slot; answers come ``latency`` seconds after the question, on a clock ``offset``
    seconds ahead of the processes' own."""

    def __init__(
        self, clock: task.Clock, rate: float, *, latency: float = 0.0, offset: float = 0.0
    ) -> None:
        self.clock, self.interval = clock, 1.0 / (rate * 0.95)  # SharedRate's interval
        self.latency, self.offset = latency, offset
        self.next = float("-inf")
        self.fail = 0

    def reserve(self, count: int) -> defer.Deferred[tuple[float, float]]:
        now = self.clock.seconds() + self.offset
        if self.fail:
            self.fail -= 1
            return defer.fail(ConnectionError("the database went away"))
        first = max(self.next, now)
        self.next = first + count * self.interval
        if not self.latency:
            return defer.succeed((first, now))
        return task.deferLater(self.clock, self.latency, lambda: (first, now))


def sender(clock: task.Clock, limiter: SharedRate, times: list[float]) -> None:
    """One connection: takes a slot, "writes its MAIL" (notes the time), takes the next."""

    def go(_: object = None) -> None:
        times.append(clock.seconds())
        if limiter.try_take():
            clock.callLater(0, go)
        else:
            limiter.acquire().addCallback(go)

    limiter.acquire().addCallback(go)


def run(clock: task.Clock, seconds: float, step: float = 0.001) -> None:
    for _ in range(round(seconds / step)):
        clock.advance(step)


@pytest.mark.parametrize(("latency", "offset"), [(0.0, 0.0), (0.004, 1000.0), (0.002, -50.0)])
def test_processes_sharing_a_schedule_keep_the_bound_together(
    latency: float, offset: float
) -> None:
    clock = task.Clock()
    rate = 20.0
    schedule = Schedule(clock, rate, latency=latency, offset=offset)
    times: list[float] = []
    limiters = [SharedRate(clock, rate, schedule.reserve, batch=3) for _ in range(3)]
    for limiter in limiters:
        for _ in range(4):  # four connections each
            sender(clock, limiter, times)
    run(clock, 10)
    assert window_violation(times, rate) is None
    assert len(times) >= rate * 10 * 0.9  # and the rate is used, not wasted
    assert all(limiter.reservations > 1 for limiter in limiters)  # each took its share


def test_a_slot_missed_by_more_than_its_slack_is_dropped_not_used_late() -> None:
    clock = task.Clock()
    rate = 10.0
    schedule = Schedule(clock, rate)
    times: list[float] = []
    limiters = [SharedRate(clock, rate, schedule.reserve, batch=5) for _ in range(2)]
    for limiter in limiters:
        for _ in range(5):
            sender(clock, limiter, times)
    run(clock, 10, step=0.35)  # a busy reactor: timers fire up to 350 ms late
    assert sum(limiter.dropped for limiter in limiters) > 0
    assert len(times) > 5  # the slots on time were used
    assert window_violation(times, rate) is None


def test_without_the_slack_rule_late_slots_would_break_the_bound() -> None:
    # The same busy reactor with slots used however late: the check catches it.
    clock = task.Clock()
    rate = 10.0
    schedule = Schedule(clock, rate)
    times: list[float] = []
    limiters = [SharedRate(clock, rate, schedule.reserve, batch=5) for _ in range(2)]
    for limiter in limiters:
        limiter.slack = float("inf")
        for _ in range(5):
            sender(clock, limiter, times)
    run(clock, 10, step=0.35)
    assert window_violation(times, rate) is not None


def test_a_failed_reservation_is_tried_again_and_the_waiters_wait() -> None:
    clock = task.Clock()
    schedule = Schedule(clock, 5.0)
    schedule.fail = 2
    limiter = SharedRate(clock, 5.0, schedule.reserve, retry=1.0)
    got: list[float] = []
    limiter.acquire().addCallback(lambda _: got.append(clock.seconds()))
    clock.advance(0.5)
    assert got == []
    clock.advance(0.5)  # the second try fails too
    assert got == []
    clock.advance(1.0)
    assert got == [2.0]
    assert clock.getDelayedCalls() == []


def test_a_cancelled_wait_gives_its_place_up() -> None:
    clock = task.Clock()
    schedule = Schedule(clock, 1.0)
    limiter = SharedRate(clock, 1.0, schedule.reserve, batch=1)
    assert limiter.acquire().called  # slot 0
    first, second = limiter.acquire(), limiter.acquire()
    first.addErrback(lambda f: f.trap(defer.CancelledError))
    first.cancel()
    clock.advance(limiter.interval)
    assert second.called
    assert clock.getDelayedCalls() == []


def brute_violation(times: list[float], rate: float) -> tuple[float, float, int, int] | None:
    """Every window from one event to another, counted: what ``window_violation`` must find."""
    ordered = sorted(times)
    for i, start in enumerate(ordered):
        for j in range(i, len(ordered)):
            allowed = math.ceil(rate * max(1.0, ordered[j] - start) - 1e-9) + 1
            if j - i + 1 > allowed:
                return start, ordered[j], j - i + 1, allowed
    return None


def assert_breaks(times: list[float], rate: float, window: tuple[float, float, int, int]) -> None:
    """``window`` holds (at least) the events it says, more than the bound allows over its
    width."""
    start, end, events, allowed = window
    assert events <= sum(1 for at in times if start <= at <= end)
    assert allowed == math.ceil(rate * max(1.0, end - start) - 1e-9) + 1
    assert events > allowed


def test_window_violation_names_a_window_over_the_bound() -> None:
    assert window_violation([], 5) is None
    assert window_violation([i / 5 for i in range(50)], 5) is None  # exactly the rate
    assert window_violation([0.0, 0.1, 0.2], 1) == (0.0, 0.2, 3, 2)  # 3 in a 1 s window
    # ceil(R*w) + 1: at R=2, 5 events over 2 s are allowed, 6 are not.
    assert window_violation([0, 0.5, 1.0, 1.5, 2.0], 2) is None
    assert window_violation([0, 0.4, 0.8, 1.2, 1.6, 2.0], 2) == (0, 2.0, 6, 5)
    # Wider windows count too: 1 a second for 10 s, then 2 more within the last second.
    steady = [float(i) for i in range(10)] + [9.3, 9.6]
    found = window_violation(steady, 1)
    assert found is not None
    assert_breaks(steady, 1, found)
    # Only a wide window breaks it: 0.9 a second would be within the bound, 1.1 is not.
    drifting = [i / 1.1 for i in range(40)]
    assert brute_violation(drifting, 1) is not None
    found = window_violation(drifting, 1)
    assert found is not None
    assert found[1] - found[0] > 1
    assert_breaks(drifting, 1, found)
    assert window_violation([i / 0.9 for i in range(40)], 1) is None


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.floats(min_value=0, max_value=20, allow_nan=False), max_size=60),
    st.sampled_from([0.5, 1.0, 2.0, 2.5, 7.0]),
)
def test_window_violation_finds_a_window_exactly_when_counting_every_window_does(
    times: list[float], rate: float
) -> None:
    found = window_violation(times, rate)
    assert (found is None) == (brute_violation(times, rate) is None)
    if found is not None:
        assert_breaks(times, rate, found)


class DomainTable:
    """The shared table of domain slots: ``cap`` per domain for every process together."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.held: dict[tuple[str, str], int] = {}
        self.most = 0  # the most slots of one domain ever held at once

    def take(self, holder: str, domain: str, count: int) -> defer.Deferred[int]:
        total = sum(n for (_, d), n in self.held.items() if d == domain)
        got = max(0, min(count, self.cap - total))
        self.held[holder, domain] = self.held.get((holder, domain), 0) + got
        self.most = max(self.most, total + got)
        return defer.succeed(got)

    def give(self, holder: str, domain: str, count: int) -> defer.Deferred[object]:
        self.held[holder, domain] -= count
        return defer.succeed(None)


def test_processes_sharing_domain_slots_hold_at_most_the_cap_together() -> None:
    clock = task.Clock()
    table = DomainTable(cap=3)
    limiters = [
        SharedDomainLimiter(
            clock,
            3,
            lambda d, n, h=h: table.take(h, d, n),
            lambda d, n, h=h: table.give(h, d, n),
        )
        for h in ("a", "b")
    ]
    in_flight: list[int] = [0]
    most = [0]
    done: list[int] = []

    def deliver(limiter: SharedDomainLimiter, n: int) -> None:
        def go(_: object) -> None:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])

            def finish() -> None:
                in_flight[0] -= 1
                done.append(n)
                limiter.release("example.org")

            clock.callLater(0.2, finish)

        limiter.acquire("example.org").addCallback(go)

    for n in range(20):
        deliver(limiters[n % 2], n)
    for _ in range(200):
        clock.advance(0.05)
    assert sorted(done) == list(range(20))
    assert most[0] == 3  # the cap used, never passed
    assert table.most == 3
    assert sum(table.held.values()) == 0  # every slot given back once idle
    assert clock.getDelayedCalls() == []


def test_a_process_keeps_a_slot_while_its_own_deliveries_wait() -> None:
    clock = task.Clock()
    table = DomainTable(cap=1)
    takes: list[int] = []

    def take(domain: str, count: int) -> defer.Deferred[int]:
        takes.append(count)
        return table.take("a", domain, count)

    limiter = SharedDomainLimiter(clock, 1, take, lambda d, n: table.give("a", d, n))
    first, second = limiter.acquire("x.org"), limiter.acquire("x.org")
    assert first.called
    assert not second.called
    limiter.release("x.org")  # handed on to the second, not given back and taken again
    assert second.called
    assert table.held["a", "x.org"] == 1
    limiter.release("x.org")
    assert table.held["a", "x.org"] == 0
    assert clock.getDelayedCalls() == []
