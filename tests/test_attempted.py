"""Whether a failed transaction ever reached the server (``DeliveryError.attempted``), the
per-connection message cap, and MAIL pacing, on MailerProtocol without a reactor."""

from __future__ import annotations

from test_protocol import Session, envelope
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from twistmail.errors import ConnectionLostError, DeliveryError, ExtensionRequiredError
from twistmail.ratelimit import TokenBucket


def _error(d: defer.Deferred[object]) -> DeliveryError:
    failure = d.result  # type: ignore[attr-defined]
    d.addErrback(lambda _: None)
    assert isinstance(failure.value, DeliveryError), failure
    return failure.value


class AttemptedTests(SynchronousTestCase):
    def test_queued_behind_a_dying_connection_is_not_attempted(self) -> None:
        s = Session()
        s.handshake()
        first = s.proto.send(envelope("a@x.org"))
        second = s.proto.send(envelope("b@x.org"))
        third = s.proto.send(envelope("c@x.org"))
        s.take()
        s.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")  # body of the first + envelope of the second
        written = s.take()
        self.assertIn(b"RCPT TO:<b@x.org>", written)
        self.assertNotIn(b"c@x.org", written)
        s.reply(b"250 queued\r\n")  # then the server drops the connection (no 421)
        s.lose()
        self.assertTrue(self.successResultOf(first).accepted_all)
        self.assertTrue(self.failureResultOf(second, ConnectionLostError).value.attempted)
        self.assertFalse(self.failureResultOf(third, ConnectionLostError).value.attempted)
        self.assertTrue(s.proto.closed_early)
        self.assertEqual(s.proto.transactions_done, 1)

    def test_lockstep_transaction_waiting_on_rset_is_not_attempted(self) -> None:
        s = Session(pipelining=False)
        s.handshake()
        first = s.proto.send(envelope("a@x.org"))
        s.take()
        s.reply(b"550 no such sender\r\n")  # MAIL refused: the next transaction starts with RSET
        self.successResultOf(first)
        second = s.proto.send(envelope("b@x.org"))
        self.assertEqual(s.take(), b"RSET\r\n")
        s.lose()
        self.assertFalse(self.failureResultOf(second, ConnectionLostError).value.attempted)

    def test_lockstep_transaction_with_mail_written_is_attempted(self) -> None:
        s = Session(pipelining=False)
        s.handshake()
        first = s.proto.send(envelope("a@x.org"))
        self.assertTrue(s.take().startswith(b"MAIL FROM:"))
        s.lose()
        self.assertTrue(self.failureResultOf(first, ConnectionLostError).value.attempted)

    def test_send_on_an_unusable_connection_is_not_attempted(self) -> None:
        s = Session()
        s.handshake()
        s.lose()
        error = self.failureResultOf(s.proto.send(envelope()), ConnectionLostError).value
        self.assertFalse(error.attempted)

    def test_a_failed_session_setup_is_not_attempted(self) -> None:
        s = Session()
        s.reply(b"421 4.7.0 too many connections\r\n")
        s.lose()
        self.assertFalse(_error(s.proto.ready).attempted)

    def test_refused_locally_is_not_attempted(self) -> None:
        s = Session(ehlo=[b"PIPELINING"])
        s.handshake()
        d = s.proto.send(envelope("müller@x.org"))
        self.assertFalse(self.failureResultOf(d, ExtensionRequiredError).value.attempted)

    def test_our_own_quit_is_not_an_early_close(self) -> None:
        s = Session()
        s.handshake()
        d = s.proto.send(envelope())
        s.take()
        s.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
        s.proto.quit()
        s.reply(b"250 queued\r\n")
        self.assertIn(b"QUIT", s.take())
        s.lose()  # the server closed before answering QUIT
        self.successResultOf(d)
        self.assertFalse(s.proto.closed_early)


class MessageCapTests(SynchronousTestCase):
    def test_at_the_cap_the_connection_takes_nothing_more_and_quits(self) -> None:
        s = Session()
        s.handshake()
        s.proto.set_message_cap(2)
        s.proto.send(envelope("a@x.org"))
        self.assertTrue(s.proto.usable)
        s.proto.send(envelope("b@x.org"))
        self.assertFalse(s.proto.usable)  # the pool hands it out no more
        s.take()
        s.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
        s.take()
        s.reply(b"250 queued\r\n250 ok\r\n250 ok\r\n354 go\r\n")
        self.assertNotIn(b"QUIT", s.take())
        s.reply(b"250 queued\r\n")
        self.assertEqual(s.take(), b"QUIT\r\n")

    def test_a_cap_already_reached_quits_once_idle(self) -> None:
        s = Session()
        s.handshake()
        d = s.proto.send(envelope())
        s.take()
        s.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
        s.take()
        s.reply(b"250 queued\r\n")
        self.successResultOf(d)
        s.proto.set_message_cap(1)
        self.assertFalse(s.proto.usable)
        self.assertEqual(s.take(), b"QUIT\r\n")


class ThrottleTests(SynchronousTestCase):
    def test_a_token_is_taken_right_before_each_mail_is_written(self) -> None:
        s = Session()
        bucket = TokenBucket(s.clock, rate=1)
        s.proto.throttle = bucket
        s.handshake()
        for rcpt in ("a@x.org", "b@x.org", "c@x.org"):
            s.proto.send(envelope(rcpt))
        self.assertEqual(s.take().count(b"MAIL FROM"), 1)
        s.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
        self.assertNotIn(b"MAIL FROM", s.take())  # the body goes, the next MAIL waits
        s.clock.advance(0.9)
        self.assertEqual(s.take(), b"")
        s.clock.advance(0.1)
        self.assertEqual(s.take().count(b"MAIL FROM"), 1)

    def test_a_lost_connection_gives_its_place_up(self) -> None:
        s = Session()
        bucket = TokenBucket(s.clock, rate=1)
        s.proto.throttle = bucket
        s.handshake()
        first = s.proto.send(envelope("a@x.org"))
        queued = s.proto.send(envelope("b@x.org"))
        s.take()
        s.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
        s.lose()
        self.assertTrue(self.failureResultOf(first, ConnectionLostError).value.attempted)
        self.assertFalse(self.failureResultOf(queued, ConnectionLostError).value.attempted)
        s.clock.advance(1)
        self.assertTrue(bucket.try_take())  # nobody kept waiting for the token
        self.assertEqual(s.clock.getDelayedCalls(), [])
