"""ConnectionPool with fake connections: reuse, bounds, replacement, idle close, cancellation."""

from __future__ import annotations

from twisted.internet import defer, task
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from twistmail.errors import ConnectError
from twistmail.smtp.pool import ConnectionPool


class FakeConnection:
    def __init__(self, n: int) -> None:
        self.n = n
        self.usable = True
        self.is_closed = False
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.quits = 0
        self.is_ready = True
        self.message_cap: int | None = None
        self.transactions_taken = 0
        self.transactions_done = 0
        self.closed_early = False
        self.throttle: object = None

    def set_message_cap(self, cap: int | None) -> None:
        self.message_cap = cap

    def quit(self) -> defer.Deferred[None]:
        self.quits += 1
        self.drop()
        return defer.succeed(None)

    def abort(self) -> None:
        self.drop()

    def drop(self) -> None:
        if not self.is_closed:
            self.usable = False
            self.is_closed = True
            self.lost.callback(None)


class Harness:
    def __init__(self, size: int = 2, idle: float = 30) -> None:
        self.clock = task.Clock()
        self.pending: list[defer.Deferred[FakeConnection]] = []
        self.made: list[FakeConnection] = []
        self.pool = ConnectionPool(self.connect, size=size, clock=self.clock, idle_timeout=idle)  # type: ignore[arg-type]

    def connect(self) -> defer.Deferred[FakeConnection]:
        d: defer.Deferred[FakeConnection] = defer.Deferred()
        self.pending.append(d)
        return d

    def complete(self) -> FakeConnection:
        conn = FakeConnection(len(self.made))
        self.made.append(conn)
        self.pending.pop(0).callback(conn)
        return conn


class PoolTests(SynchronousTestCase):
    def test_connection_is_reused_after_release(self) -> None:
        h = Harness()
        d = h.pool.acquire()
        conn = h.complete()
        self.assertIs(self.successResultOf(d), conn)
        h.pool.release(conn)  # type: ignore[arg-type]
        self.assertIs(self.successResultOf(h.pool.acquire()), conn)
        self.assertEqual(h.pool.connections_opened, 1)

    def test_never_more_than_size_connections(self) -> None:
        h = Harness(size=2)
        waiters = [h.pool.acquire() for _ in range(5)]
        self.assertEqual(len(h.pending), 1)  # one first, until a connection has succeeded
        c0 = h.complete()
        self.assertEqual(len(h.pending), 1)
        c1 = h.complete()
        self.assertEqual([self.successResultOf(w) for w in waiters[:2]], [c0, c1])
        self.assertNoResult(waiters[2])
        h.pool.release(c0)  # type: ignore[arg-type]
        self.assertIs(self.successResultOf(waiters[2]), c0)
        self.assertEqual(len(h.pending), 0)

    def test_dropped_connection_is_replaced_for_waiters(self) -> None:
        h = Harness(size=1)
        c0 = self.successResultOf(_acquire_completed(h))
        waiter = h.pool.acquire()
        c0.drop()  # the server closed it (421 or a reset) while in use
        h.pool.release(c0)  # type: ignore[arg-type]
        self.assertEqual(len(h.pending), 1)
        c1 = h.complete()
        self.assertIs(self.successResultOf(waiter), c1)
        self.assertEqual(h.pool.open_connections, 1)

    def test_idle_connection_closed_after_timeout(self) -> None:
        h = Harness(idle=30)
        conn = self.successResultOf(_acquire_completed(h))
        h.pool.release(conn)  # type: ignore[arg-type]
        h.clock.advance(29)
        self.assertEqual(conn.quits, 0)
        h.clock.advance(2)
        self.assertEqual(conn.quits, 1)
        self.assertEqual(h.pool.open_connections, 0)

    def test_refusal_while_another_connection_lives_keeps_waiters_for_it(self) -> None:
        h = Harness(size=2)
        busy = self.successResultOf(_acquire_completed(h))
        w1, w2 = h.pool.acquire(), h.pool.acquire()
        self.assertEqual(len(h.pending), 1)
        h.pending.pop(0).errback(Failure(ConnectError("refused", host="mx:25")))
        # the server limits connections: both waiters are served by the live one in turn
        self.assertEqual(h.pool.limit, 1)
        self.assertNoResult(w1)
        self.assertNoResult(w2)
        h.pool.release(busy)  # type: ignore[arg-type]
        self.assertIs(self.successResultOf(w1), busy)
        h.pool.release(busy)  # type: ignore[arg-type]
        self.assertIs(self.successResultOf(w2), busy)
        self.assertEqual(h.pending, [])

    def test_cancel_before_connect(self) -> None:
        h = Harness(size=1)
        d = h.pool.acquire()
        attempt = h.pending.pop()
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        # Nobody else wanted that connection: its attempt is cancelled too ...
        self.assertTrue(attempt.called)
        self.assertEqual(h.pool.open_connections, 0)
        again = h.pool.acquire()  # ... so this size-1 pool opens a new one at once.
        self.assertEqual(len(h.pending), 1)
        conn = h.complete()
        self.assertIs(self.successResultOf(again), conn)

    def test_cancel_one_waiter_keeps_the_connection_another_waits_for(self) -> None:
        h = Harness(size=1)
        first = h.pool.acquire()
        second = h.pool.acquire()
        first.cancel()
        self.failureResultOf(first, defer.CancelledError)
        self.assertFalse(h.pending[0].called)  # still wanted by the second waiter
        conn = h.complete()
        self.assertIs(self.successResultOf(second), conn)

    def test_abort_drops_every_open_connection_without_quit(self) -> None:
        h = Harness(size=2)
        first, second = h.pool.acquire(), h.pool.acquire()
        a, b = h.complete(), h.complete()
        self.successResultOf(first)
        self.successResultOf(second)
        h.pool.abort()
        self.assertEqual((a.is_closed, b.is_closed, a.quits, b.quits), (True, True, 0, 0))
        self.assertEqual(h.pool.open_connections, 0)

    def test_close_quits_idle_and_fails_waiters(self) -> None:
        h = Harness(size=1)
        conn = self.successResultOf(_acquire_completed(h))
        waiter = h.pool.acquire()
        closed = h.pool.close()
        self.failureResultOf(waiter)
        self.assertEqual(conn.quits, 1)
        self.successResultOf(closed)
        self.assertEqual(h.clock.getDelayedCalls(), [])


def _acquire_completed(h: Harness) -> defer.Deferred[FakeConnection]:
    d = h.pool.acquire()
    h.complete()
    return d  # type: ignore[return-value]


class PipeliningConnection(FakeConnection):
    class capabilities:  # mimics MailerProtocol.capabilities
        pipelining = True


class PipelineDepthTests(SynchronousTestCase):
    def harness(self, size: int, depth: int) -> Harness:
        h = Harness(size=size)
        h.pool = ConnectionPool(h.connect, size=size, clock=h.clock, depth=depth)  # type: ignore[arg-type]
        return h

    def complete(self, h: Harness) -> PipeliningConnection:
        conn = PipeliningConnection(len(h.made))
        h.made.append(conn)
        h.pending.pop(0).callback(conn)
        return conn

    def test_new_connections_first_then_up_to_depth_each(self) -> None:
        h = self.harness(size=2, depth=2)
        a, b = h.pool.acquire(), h.pool.acquire()
        first = self.complete(h)  # then the second is opened
        second = self.complete(h)
        self.assertIs(self.successResultOf(a), first)
        self.assertIs(self.successResultOf(b), second)
        c, d = h.pool.acquire(), h.pool.acquire()  # both connections take a second one
        self.assertEqual({self.successResultOf(c), self.successResultOf(d)}, {first, second})
        e = h.pool.acquire()
        self.assertNoResult(e)  # 2 connections x depth 2 are in use
        self.assertEqual(h.pending, [])  # and no third connection is opened
        h.pool.release(first)  # type: ignore[arg-type]
        self.assertIs(self.successResultOf(e), first)

    def test_a_server_without_pipelining_gets_one_at_a_time(self) -> None:
        h = self.harness(size=1, depth=3)
        a = h.pool.acquire()
        conn = h.complete()  # a FakeConnection: no PIPELINING
        self.assertIs(self.successResultOf(a), conn)
        self.assertNoResult(h.pool.acquire())
