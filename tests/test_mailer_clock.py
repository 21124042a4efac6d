"""The Mailer on a MemoryReactorClock: retry timing, what is retried, drops, no real reactor."""

from __future__ import annotations

from collections.abc import Iterator

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from twistmail.errors import ConnectionLostError, TransientError
from twistmail.mailer import Mailer
from twistmail.results import SendResult
from twistmail.retry import RetryPolicy

DATA = b"Subject: hi\r\n\r\nbody\r\n"


class FakeServer:
    """Plays the server side of one connection the Mailer opened on a MemoryReactorClock."""

    def __init__(self, reactor: MemoryReactorClock, index: int) -> None:
        factory = reactor.tcpClients[index][2]
        self.proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 25))
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)

    def say(self, data: bytes) -> None:
        self.proto.dataReceived(data)

    def take(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data

    def handshake(self) -> None:
        self.say(b"220 mx ESMTP\r\n")
        assert self.take().startswith(b"EHLO ")
        self.say(b"250-mx\r\n250 PIPELINING\r\n")

    def drop(self) -> None:
        self.proto.connectionLost(Failure(ConnectionLostError("gone")))


class MailerOnClockTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        policy = RetryPolicy(max_attempts=3, initial_delay=10.0, multiplier=2.0, jitter=0.0)
        self.mailer = Mailer(
            "smtp://127.0.0.1:2525", concurrency=1, retry_policy=policy, reactor=self.reactor
        )

    def test_only_4xx_recipients_retried_after_backoff_and_5xx_never(self) -> None:
        d = self.mailer.send(
            DATA, sender="s@example.com", recipients=["a@x.org", "b@x.org", "c@x.org"]
        )
        self.assertEqual(len(self.reactor.tcpClients), 1)
        server = FakeServer(self.reactor, 0)
        server.handshake()
        first = server.take()
        self.assertEqual(first.count(b"RCPT TO:"), 3)
        server.say(b"250 ok\r\n250 ok\r\n451 4.2.1 later\r\n550 5.1.1 unknown\r\n354 go\r\n")
        self.assertTrue(server.take().endswith(b"\r\n.\r\n"))
        server.say(b"250 queued\r\n")
        self.assertNoResult(d)

        # Nothing goes out before the first backoff (10 s) has passed.
        self.reactor.advance(9.9)
        self.assertEqual(server.take(), b"")
        self.reactor.advance(0.2)
        second = server.take()
        self.assertIn(b"RCPT TO:<b@x.org>", second)
        self.assertNotIn(b"a@x.org", second)
        self.assertNotIn(b"c@x.org", second)  # 5xx: never retried
        server.say(b"250 ok\r\n451 4.2.1 still later\r\n554 5.5.1 no valid recipients\r\n")
        self.assertEqual(server.take(), b"")
        self.assertNoResult(d)

        # Second backoff doubles: 20 s.
        self.reactor.advance(19.9)
        self.assertNotIn(b"RCPT", server.take())
        self.reactor.advance(0.2)
        third = server.take()
        self.assertTrue(third.startswith(b"RSET\r\n"))  # the refused transaction is reset
        self.assertIn(b"RCPT TO:<b@x.org>", third)
        server.say(b"250 reset\r\n250 ok\r\n250 ok\r\n354 go\r\n")
        server.take()
        server.say(b"250 queued\r\n")

        result: SendResult = self.successResultOf(d)
        self.assertEqual(result.attempts, 3)
        self.assertEqual(
            [(r.recipient, r.status, r.code) for r in result.recipients],
            [("a@x.org", "sent", 250), ("b@x.org", "sent", 250), ("c@x.org", "failed", 550)],
        )

    def test_attempts_exhausted_leaves_recipient_failed(self) -> None:
        d = self.mailer.send(DATA, sender="s@example.com", recipients=["a@x.org"])
        server = FakeServer(self.reactor, 0)
        server.handshake()
        for attempt in range(3):
            sent = server.take()
            self.assertIn(b"RCPT TO:<a@x.org>", sent)
            reset = b"250 reset\r\n" if attempt else b""
            server.say(reset + b"250 ok\r\n451 4.2.1 later\r\n554 no valid recipients\r\n")
            self.reactor.advance(100)
        self.assertNotIn(b"RCPT", server.take())  # no fourth attempt (only the idle QUIT)
        failure = self.failureResultOf(d, TransientError)  # 4xx to the end: still transient
        result: SendResult = failure.value.result
        self.assertEqual(result.attempts, 3)
        self.assertEqual([(r.status, r.code) for r in result.recipients], [("failed", 451)])

    def test_drop_after_dot_retried_on_new_connection_never_reported_sent(self) -> None:
        d = self.mailer.send(DATA, sender="s@example.com", recipients=["a@x.org"])
        server = FakeServer(self.reactor, 0)
        server.handshake()
        server.take()
        server.say(b"250 ok\r\n250 ok\r\n354 go\r\n")
        self.assertTrue(server.take().endswith(b"\r\n.\r\n"))
        server.drop()  # before the reply to the final dot
        self.assertNoResult(d)
        self.reactor.advance(10.1)
        self.assertEqual(len(self.reactor.tcpClients), 2)  # a new connection
        again = FakeServer(self.reactor, 1)
        again.handshake()
        self.assertIn(b"RCPT TO:<a@x.org>", again.take())
        again.say(b"250 ok\r\n250 ok\r\n354 go\r\n")
        again.take()
        again.say(b"250 queued\r\n")
        result: SendResult = self.successResultOf(d)
        self.assertEqual(result.attempts, 2)
        self.assertTrue(result.ok)


class CancelAndRateOnClockTests(SynchronousTestCase):
    def test_cancel_before_tcp_connection_stops_connecting(self) -> None:
        reactor = MemoryReactorClock()
        mailer = Mailer("smtp://127.0.0.1:2525", reactor=reactor)
        d = mailer.send(DATA, sender="s@example.com", recipients=["a@x.org"])
        self.assertEqual(len(reactor.tcpClients), 1)
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertTrue(reactor.connectors[0].stoppedConnecting)  # type: ignore[attr-defined]
        self.assertEqual(mailer.pool.open_connections, 0)
        self.successResultOf(mailer.close())

    def test_cancel_after_connect_aborts_the_connection(self) -> None:
        reactor = MemoryReactorClock()
        mailer = Mailer("smtp://127.0.0.1:2525", reactor=reactor)
        d = mailer.send(DATA, sender="s@example.com", recipients=["a@x.org"])
        server = FakeServer(reactor, 0)
        server.handshake()
        self.assertIn(b"MAIL FROM", server.take())
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertTrue(server.transport.disconnecting)

    def test_global_rate_paces_transactions_on_the_clock(self) -> None:
        reactor = MemoryReactorClock()
        mailer = Mailer("smtp://127.0.0.1:2525", concurrency=1, rate=2.0, reactor=reactor)
        sent: list[SendResult] = []
        for i in range(5):
            mailer.send(DATA, sender="s@example.com", recipients=[f"r{i}@x.org"]).addCallback(
                sent.append
            )
        server = FakeServer(reactor, 0)
        server.handshake()

        def serve() -> int:
            mails = server.take().count(b"MAIL FROM")
            for _ in range(mails):
                server.say(b"250 ok\r\n250 ok\r\n354 go\r\n")
                server.take()
                server.say(b"250 queued\r\n")
            return mails

        first = serve()
        self.assertEqual(first, 1)  # burst of one at 2 messages/s
        started = [first]
        for _ in range(8):  # four seconds in half-second steps
            reactor.advance(0.5)
            started.append(serve())
        self.assertEqual(sum(started), 5)
        self.assertTrue(all(n <= 1 for n in started))
        self.assertEqual(len(sent), 5)
        self.assertEqual(started[:5], [1, 1, 1, 1, 1])


class SendManyOnClockTests(SynchronousTestCase):
    def test_cancel_send_many_stops_consuming_the_generator(self) -> None:
        reactor = MemoryReactorClock()
        mailer = Mailer("smtp://127.0.0.1:2525", concurrency=2, reactor=reactor)
        taken: list[int] = []

        def messages() -> Iterator[tuple[str, list[str], bytes]]:
            for i in range(1_000_000):
                taken.append(i)
                yield ("s@example.com", [f"r{i}@x.org"], DATA)

        d = mailer.send_many(messages())
        reactor.advance(0)  # let the cooperative workers start
        workers = 2 * mailer.pool.depth  # connections x pipeline depth
        self.assertLessEqual(len(taken), workers)  # one per worker, nothing materialised
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        for _ in range(5):
            reactor.advance(1)
        self.assertLessEqual(len(taken), workers)

    def test_a_sooner_retry_parked_later_is_not_held_back_by_a_later_one(self) -> None:
        reactor = MemoryReactorClock()
        policy = RetryPolicy(max_attempts=3, initial_delay=10.0, multiplier=2.0, jitter=0.0)
        mailer = Mailer(
            "smtp://127.0.0.1:2525", concurrency=2, retry_policy=policy, reactor=reactor
        )
        refused = b"250 ok\r\n451 4.2.1 later\r\n554 no valid recipients\r\n"
        d = mailer.send_many(("s@example.com", [f"{name}@x.org"], DATA) for name in ("a", "b"))
        a = FakeServer(reactor, 0)
        a.handshake()  # the second connection is opened once the first has succeeded
        b = FakeServer(reactor, 1)
        b.handshake()
        self.assertIn(b"a@x.org", a.take())
        self.assertIn(b"b@x.org", b.take())
        a.say(refused)  # a: first attempt deferred, retry due at 10
        reactor.advance(10)
        self.assertIn(b"a@x.org", a.take())
        a.say(b"250 reset\r\n" + refused)  # a: second attempt deferred, retry due at 30
        reactor.advance(5)
        b.say(refused)  # b, answered only now: retry due at 25, before a's
        reactor.advance(10.1)
        self.assertIn(b"RCPT TO:<b@x.org>", b.take())  # at 25, not held until 30
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)


class ReasonsOnClockTests(SynchronousTestCase):
    def test_a_drop_keeps_its_reason_in_the_report_and_the_outcome(self) -> None:
        reactor = MemoryReactorClock()
        mailer = Mailer("smtp://127.0.0.1:2525", concurrency=1, max_attempts=1, reactor=reactor)
        results: dict[int, object] = {}
        d = mailer.send_many([("s@example.com", ["u0@x.org"], DATA)], on_result=results.__setitem__)
        server = FakeServer(reactor, 0)
        server.handshake()
        server.take()
        server.say(b"250 ok\r\n250 ok\r\n354 go\r\n")
        server.take()
        server.drop()  # after the data, before the reply: the server may have it
        report = self.successResultOf(d)
        ((index, reason),) = report.errors
        assert index == 0
        assert "u0@x.org" in reason
        assert "connection lost" in reason
        assert "127.0.0.1:2525" in reason
        result = results[0]
        assert isinstance(result, SendResult)
        assert "connection lost" in result.recipients[0].response
