"""ConnectionPool against a refusing or limiting server, on task.Clock: breaker, limit, cap."""

from __future__ import annotations

from test_pool import FakeConnection, Harness
from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from twistmail.errors import AuthenticationError, ConnectError, TransientError
from twistmail.smtp.pool import ConnectionPool


def harness(size: int = 3) -> Harness:
    h = Harness(size=size)
    h.pool = ConnectionPool(
        h.connect,  # type: ignore[arg-type]
        size=size,
        clock=h.clock,
        backoff=1.0,
        max_backoff=8.0,
        random=lambda: 0.5,  # no jitter: the delays are exact
    )
    return h


def refuse(h: Harness, error: Exception | None = None) -> None:
    h.pending.pop(0).errback(Failure(error or AuthenticationError("bad password", code=535)))


class BreakerTests(SynchronousTestCase):
    def test_one_attempt_at_first_and_every_waiter_fails_with_its_refusal(self) -> None:
        h = harness(size=3)
        waiters = [h.pool.acquire() for _ in range(50)]
        self.assertEqual(len(h.pending), 1)  # not one attempt per waiter
        refuse(h)
        for w in waiters:
            error = self.failureResultOf(w, AuthenticationError).value
            self.assertFalse(error.attempted)
            self.assertEqual(error.code, 535)
        self.assertEqual(h.pool.connections_opened, 1)
        self.assertIsInstance(h.pool.breaker_error, AuthenticationError)
        self.assertEqual(h.pool.retry_at, 1.0)
        self.assertTrue(h.pool.breaker_open)

    def test_acquire_fails_fast_during_the_backoff_then_one_probe(self) -> None:
        h = harness()
        self.failureResultOf(_refused_once(h))
        h.clock.advance(0.99)
        self.failureResultOf(h.pool.acquire(), AuthenticationError)
        self.assertEqual(h.pending, [])
        h.clock.advance(0.01)
        self.assertFalse(h.pool.breaker_open)
        probe_waiters = [h.pool.acquire() for _ in range(5)]
        self.assertEqual(len(h.pending), 1)  # one probe
        refuse(h, ConnectError("refused"))
        for w in probe_waiters:
            self.failureResultOf(w, ConnectError)
        self.assertEqual(h.pool.retry_at, 3.0)  # the backoff doubled: 1 s, then 2 s

    def test_backoff_doubles_up_to_its_cap(self) -> None:
        h = harness()
        delays = []
        for _ in range(6):
            self.failureResultOf(_refused_once(h))
            assert h.pool.retry_at is not None
            delays.append(h.pool.retry_at - h.clock.seconds())
            h.clock.advance(delays[-1])
        self.assertEqual(delays, [1.0, 2.0, 4.0, 8.0, 8.0, 8.0])

    def test_a_successful_probe_closes_the_breaker_and_resets_the_backoff(self) -> None:
        h = harness(size=3)
        self.failureResultOf(_refused_once(h))
        h.clock.advance(1)
        self.failureResultOf(_refused_once(h))
        h.clock.advance(2)
        waiters = [h.pool.acquire() for _ in range(3)]
        first = h.complete()
        self.assertIsNone(h.pool.breaker_error)
        self.assertIsNone(h.pool.retry_at)
        self.assertIs(self.successResultOf(waiters[0]), first)
        self.assertEqual(len(h.pending), 2)  # proven: the others are opened together
        h.complete(), h.complete()
        for w in waiters:
            self.successResultOf(w)
        for conn in h.made:
            conn.drop()
        self.failureResultOf(_refused_once(h))
        self.assertEqual(h.pool.retry_at, h.clock.seconds() + 1.0)  # back to the first delay

    def test_has_room_while_the_breaker_is_open_so_callers_hear_the_refusal(self) -> None:
        h = harness()
        self.failureResultOf(_refused_once(h))
        self.assertTrue(h.pool.has_room)
        self.assertIsNone(h.pool.acquire_now())


class LimitTests(SynchronousTestCase):
    def test_refusals_while_others_live_lower_the_limit_and_keep_waiters(self) -> None:
        h = harness(size=5)
        waiters = [h.pool.acquire() for _ in range(10)]
        first = h.complete()
        self.assertEqual(len(h.pending), 4)
        second = h.complete()
        for _ in range(3):
            refuse(h, TransientError("too many connections", code=421))
        self.assertEqual(h.pool.limit, 2)
        self.assertEqual(h.pool.connections_refused, 3)
        self.assertIsNone(h.pool.breaker_error)
        self.assertIs(self.successResultOf(waiters[0]), first)
        self.assertIs(self.successResultOf(waiters[1]), second)
        for w in waiters[2:]:
            self.assertNoResult(w)
        # Busy connections released serve the waiters; no new attempt before the backoff.
        h.pool.release(first)  # type: ignore[arg-type]
        self.assertIs(self.successResultOf(waiters[2]), first)
        self.assertEqual(h.pending, [])
        # After it, one attempt beyond the limit; its success raises the limit.
        h.clock.advance(4.0)  # three refusals in a row: 4 s
        h.pool.release(second)  # type: ignore[arg-type]
        self.assertIs(self.successResultOf(waiters[3]), second)
        h.pool.acquire()
        self.assertEqual(len(h.pending), 1)
        h.complete()
        self.assertEqual(h.pool.limit, 3)

    def test_a_refused_growth_attempt_backs_off_longer(self) -> None:
        h = harness(size=5)
        w = [h.pool.acquire() for _ in range(3)]
        h.complete()
        refuse(h, TransientError("too many connections", code=421))
        refuse(h, TransientError("too many connections", code=421))
        self.assertEqual(h.pool.limit, 1)
        self.successResultOf(w[0])
        h.clock.advance(2.0)
        extra = h.pool.acquire()
        self.assertEqual(len(h.pending), 1)
        refuse(h, TransientError("too many connections", code=421))
        self.assertNoResult(extra)
        h.clock.advance(3.9)
        h.pool.acquire()
        self.assertEqual(h.pending, [])  # 4 s after the third refusal, not before
        h.clock.advance(0.1)
        h.pool.acquire()
        self.assertEqual(len(h.pending), 1)


class CapTests(SynchronousTestCase):
    def test_an_early_close_teaches_a_cap_that_new_connections_get(self) -> None:
        h = harness(size=1)
        d = h.pool.acquire()
        conn = h.complete()
        self.successResultOf(d)
        conn.transactions_done = 2
        conn.closed_early = True
        conn.drop()
        self.assertEqual(h.pool.message_cap, 2)
        d = h.pool.acquire()
        second = h.complete()
        self.assertEqual(second.message_cap, 2)
        self.successResultOf(d)

    def test_the_cap_grows_by_one_after_clean_ends_at_the_cap_proven_by_one_probe(self) -> None:
        h = harness(size=1)
        h.pool.message_cap = 1
        for _ in range(8):
            conn = _connection_ending(h, done=1)
            self.assertEqual(conn.message_cap, 1)
        probe = _connection_ending(h, done=2)
        self.assertEqual(probe.message_cap, 2)
        self.assertEqual(h.pool.message_cap, 2)

    def test_a_failed_probe_keeps_the_cap_and_waits_twice_as_long(self) -> None:
        h = harness(size=1)
        h.pool.message_cap = 1
        for _ in range(8):
            _connection_ending(h, done=1)
        probe = _connection_ending(h, done=1, early=True)
        self.assertEqual(probe.message_cap, 2)
        self.assertEqual(h.pool.message_cap, 1)
        caps = [_connection_ending(h, done=1).message_cap for _ in range(16)]
        self.assertEqual(caps, [1] * 16)
        self.assertEqual(_connection_ending(h, done=2).message_cap, 2)

    def test_a_drop_before_any_answer_teaches_no_cap(self) -> None:
        h = harness(size=1)
        _connection_ending(h, done=0, early=True)
        self.assertIsNone(h.pool.message_cap)


def _refused_once(h: Harness) -> defer.Deferred[object]:
    d = h.pool.acquire()
    refuse(h)
    return d  # type: ignore[return-value]


def _connection_ending(h: Harness, *, done: int, early: bool = False) -> FakeConnection:
    d = h.pool.acquire()
    conn = h.complete()
    self_check = d.called
    assert self_check
    conn.transactions_done = done
    conn.closed_early = early
    h.pool.release(conn)  # type: ignore[arg-type]
    conn.drop()
    return conn
