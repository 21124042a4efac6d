"""Retry policy and rate limiters on task.Clock."""

from __future__ import annotations

import math

import pytest
from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from twistmail.ratelimit import DomainLimiter, TokenBucket
from twistmail.retry import RetryPolicy


def test_backoff_grows_exponentially_and_caps() -> None:
    policy = RetryPolicy(initial_delay=2, multiplier=3, max_delay=50, jitter=0)
    assert [policy.delay(n) for n in range(1, 6)] == [2, 6, 18, 50, 50]


def test_jitter_stays_within_bounds_and_varies() -> None:
    values = iter([0.0, 1.0, 0.5])
    policy = RetryPolicy(initial_delay=10, jitter=0.25, rng=lambda: next(values))
    assert [policy.delay(1) for _ in range(3)] == [7.5, 12.5, 10.0]


def test_attempt_budget() -> None:
    policy = RetryPolicy(max_attempts=3)
    assert [policy.can_retry(n) for n in (1, 2, 3)] == [True, True, False]
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)


class TokenBucketTests(SynchronousTestCase):
    def test_burst_then_paced_by_rate(self) -> None:
        clock = task.Clock()
        bucket = TokenBucket(clock, rate=10, burst=2)
        fired: list[float] = []
        for _ in range(6):
            bucket.acquire().addCallback(lambda _: fired.append(clock.seconds()))
        self.assertEqual(fired, [0, 0])
        counts = []
        for _ in range(4):
            clock.advance(0.1)
            counts.append(len(fired))
        self.assertEqual(counts, [3, 4, 5, 6])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_long_run_rate_is_respected(self) -> None:
        clock = task.Clock()
        bucket = TokenBucket(clock, rate=50)
        count = [0]

        def take(_: object = None) -> None:
            count[0] += 1
            bucket.acquire().addCallback(take)

        take()
        clock.pump([0.001] * 10_000)  # 10 s; a wake-up up to 1 ms late loses that much
        self.assertTrue(470 <= count[0] <= 501, count[0])

    def test_any_window_holds_at_most_rate_times_width_plus_one(self) -> None:
        clock = task.Clock()
        rate = 7.5
        bucket = TokenBucket(clock, rate=rate)
        times: list[float] = []

        def take(_: object = None) -> None:
            times.append(clock.seconds())
            bucket.acquire().addCallback(take)

        take()
        for step in [0.001] * 3000 + [0.4, 0.0005] * 20 + [0.05] * 100:
            clock.advance(step)
        self.assertGreater(len(times), 50)
        _assert_rate_bound(times, rate)

    def test_try_take_takes_only_a_free_token_nobody_waits_for(self) -> None:
        clock = task.Clock()
        bucket = TokenBucket(clock, rate=2)
        self.assertTrue(bucket.try_take())
        self.assertFalse(bucket.try_take())
        waiter = bucket.acquire()
        clock.advance(0.4)
        self.assertFalse(bucket.try_take())  # not yet refilled
        clock.advance(0.1)
        self.successResultOf(waiter)  # the waiter had the place
        self.assertFalse(bucket.try_take())
        clock.advance(0.5)
        self.assertTrue(bucket.try_take())

    def test_cancelled_waiter_gives_up_its_place(self) -> None:
        clock = task.Clock()
        bucket = TokenBucket(clock, rate=1, burst=1)
        self.successResultOf(bucket.acquire())
        first = bucket.acquire()
        second = bucket.acquire()
        first.cancel()
        self.failureResultOf(first, defer.CancelledError)
        clock.advance(1)
        self.successResultOf(second)
        self.assertEqual(clock.getDelayedCalls(), [])


class DomainLimiterTests(SynchronousTestCase):
    def test_cap_per_domain_independent_of_other_domains(self) -> None:
        limiter = DomainLimiter(2)
        a1, a2, a3 = (limiter.acquire("a.example") for _ in range(3))
        b1 = limiter.acquire("b.example")
        self.successResultOf(a1)
        self.successResultOf(a2)
        self.assertNoResult(a3)
        self.successResultOf(b1)
        self.assertEqual(limiter.active("a.example"), 2)
        limiter.release("a.example")
        self.successResultOf(a3)
        for _ in range(2):
            limiter.release("a.example")
        self.assertEqual(limiter.active("a.example"), 0)


def _assert_rate_bound(times: list[float], rate: float) -> None:
    """At most ceil(rate * w) + 1 events in any window of w >= 1 second."""
    times = sorted(times)
    for i, start in enumerate(times):
        for j in range(i, len(times)):
            width = max(1.0, times[j] - start)
            allowed = math.ceil(rate * width - 1e-9) + 1
            assert j - i + 1 <= allowed, (start, times[j], j - i + 1, allowed)
