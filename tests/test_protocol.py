"""MailerProtocol without a reactor: StringTransport for the wire, task.Clock for time."""

from __future__ import annotations

import base64
import socket
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer, task
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from twistmail.errors import (
    AuthenticationError,
    ConnectionLostError,
    ExtensionRequiredError,
    SMTPTimeoutError,
    TransientError,
)
from twistmail.message import envelope_from_bytes
from twistmail.smtp._protocol import MailerProtocol, unsent
from twistmail.smtp._transaction import TransactionResult
from twistmail.smtp.esmtp import split_enhanced

BODY = b"Subject: hi\r\n\r\nline one\r\n.starts with a dot\r\n"
WIRE_BODY = b"Subject: hi\r\n\r\nline one\r\n..starts with a dot\r\n.\r\n"


class RecordingTransport(StringTransport):
    """A StringTransport that keeps each write separately and records TCP_NODELAY."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.nodelay = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.nodelay = enabled

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


def envelope(*rcpts: str, data: bytes = BODY) -> Any:
    return envelope_from_bytes("from@example.com", list(rcpts or ["to@example.com"]), data)


class Session:
    """A protocol connected to a RecordingTransport, with helpers to play the server."""

    def __init__(
        self,
        ehlo: list[bytes] | None = None,
        *,
        username: str | None = None,
        password: str | None = None,
        pipelining: bool = True,
        reply_timeout: float = 10.0,
        data_timeout: float = 100.0,
    ) -> None:
        self.clock = task.Clock()
        self.proto = MailerProtocol(
            host_label="mx.test:25",
            clock=self.clock,
            identity=b"client.test",
            username=username,
            password=password,
            reply_timeout=reply_timeout,
            data_timeout=data_timeout,
            use_pipelining=pipelining,
        )
        self.transport = RecordingTransport()
        self.proto.makeConnection(self.transport)
        self.ehlo = ehlo if ehlo is not None else [b"PIPELINING", b"8BITMIME", b"SMTPUTF8"]

    def take(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        self.transport.writes.clear()
        return data

    def reply(self, data: bytes) -> None:
        self.proto.dataReceived(data)

    def handshake(self) -> None:
        self.reply(b"220 mx.test ESMTP\r\n")
        assert self.take() == b"EHLO client.test\r\n"
        lines = [b"mx.test hello", *self.ehlo]
        text = b"".join(b"250-" + line + b"\r\n" for line in lines[:-1])
        self.reply(text + b"250 " + lines[-1] + b"\r\n")

    def lose(self, reason: Exception | None = None) -> None:
        self.proto.connectionLost(Failure(reason or ConnectionLostError("gone")))


def test_attribute_reads_take_the_fast_path() -> None:
    """No ``__getattr__`` anywhere up the class (ESMTPClient's would send every attribute read
    through a hook CPython cannot specialize) and the built-in ``__setattr__``: still an
    SMTPClient, with ESMTPClient's handshake."""
    import twisted.mail.smtp as tsmtp

    assert not hasattr(MailerProtocol, "__getattr__")
    assert MailerProtocol.__setattr__ is object.__setattr__
    assert issubclass(MailerProtocol, tsmtp.SMTPClient)
    assert MailerProtocol.esmtpState_ehlo is tsmtp.ESMTPClient.esmtpState_ehlo
    assert hasattr(tsmtp.ESMTPClient, "__getattr__")  # Twisted's own class left as it was


class HandshakeTests(SynchronousTestCase):
    def test_tcp_nodelay_is_set_on_connect(self) -> None:
        s = Session()
        self.assertTrue(s.transport.nodelay)

    def test_ready_after_ehlo_with_capabilities(self) -> None:
        s = Session(ehlo=[b"PIPELINING", b"SIZE 1000", b"8BITMIME", b"AUTH PLAIN LOGIN"])
        s.handshake()
        proto = self.successResultOf(s.proto.ready)
        caps = proto.capabilities
        self.assertTrue(caps.pipelining and caps.eight_bit_mime)
        self.assertEqual(caps.size, 1000)
        self.assertEqual(caps.auth, frozenset({"PLAIN", "LOGIN"}))
        self.assertFalse(caps.smtputf8)

    def test_helo_fallback_when_ehlo_refused(self) -> None:
        s = Session()
        s.reply(b"220 old server\r\n")
        s.take()
        s.reply(b"500 what is EHLO\r\n")
        self.assertEqual(s.take(), b"HELO client.test\r\n")
        s.reply(b"250 hello\r\n")
        proto = self.successResultOf(s.proto.ready)
        self.assertFalse(proto.capabilities.esmtp)

    def test_greeting_timeout(self) -> None:
        s = Session(reply_timeout=5)
        s.clock.advance(5.1)
        self.assertTrue(s.transport.aborted)
        s.lose()
        err = self.failureResultOf(s.proto.ready, SMTPTimeoutError).value
        self.assertIn("mx.test:25", str(err))

    def test_554_greeting_is_permanent(self) -> None:
        s = Session()
        s.reply(b"554 5.7.1 go away\r\n")
        s.lose()
        err = self.failureResultOf(s.proto.ready).value
        self.assertFalse(err.transient)
        self.assertEqual((err.code, err.enhanced, err.response), (554, "5.7.1", "go away"))


class AuthTests(SynchronousTestCase):
    SECRET = "s3cret-pass"

    def _start(self) -> Session:
        s = Session(ehlo=[b"AUTH PLAIN", b"PIPELINING"], username="alice", password=self.SECRET)
        s.handshake()
        return s

    def test_auth_plain_success(self) -> None:
        s = self._start()
        line = s.take()
        expected = base64.b64encode(b"\0alice\0" + self.SECRET.encode())
        self.assertEqual(line, b"AUTH PLAIN " + expected + b"\r\n")
        s.reply(b"235 2.7.0 ok\r\n")
        self.successResultOf(s.proto.ready)

    def test_auth_failure_never_reveals_secret(self) -> None:
        logged: list[str] = []

        def observer(event: dict[str, Any]) -> None:
            logged.append(repr(event))

        globalLogPublisher.addObserver(observer)
        try:
            s = self._start()
            sent = s.take()
            s.reply(b"535 5.7.8 bad credentials\r\n")
            sent += s.take()  # Twisted retries PLAIN in its other form
            s.reply(b"535 5.7.8 bad credentials\r\n")
            s.lose()
            err = self.failureResultOf(s.proto.ready, AuthenticationError).value
        finally:
            globalLogPublisher.removeObserver(observer)
        b64 = base64.b64encode(b"\0alice\0" + self.SECRET.encode()).decode()
        self.assertIn(b64.encode(), sent)  # it was really sent, so scrubbing is meaningful
        for text in [str(err), repr(err), err.response, *logged]:
            self.assertNotIn(self.SECRET, text)
            self.assertNotIn(b64, text)
        self.assertEqual(err.code, 535)

    def test_credentials_but_no_auth_offered(self) -> None:
        s = Session(ehlo=[b"PIPELINING"], username="alice", password=self.SECRET)
        s.handshake()
        s.lose()
        err = self.failureResultOf(s.proto.ready, AuthenticationError).value
        self.assertIn("no usable AUTH", str(err))


def ready_session(**kw: Any) -> Session:
    s = Session(**kw)
    s.handshake()
    return s


class TransactionTests(SynchronousTestCase):
    def test_pipelined_envelope_in_one_write_and_exact_body(self) -> None:
        s = ready_session()
        d = s.proto.send(envelope("a@example.com", "b@example.com"))
        self.assertEqual(
            s.transport.writes,
            [
                b"MAIL FROM:<from@example.com>\r\nRCPT TO:<a@example.com>\r\n"
                b"RCPT TO:<b@example.com>\r\nDATA\r\n"
            ],
        )
        s.take()
        s.reply(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
        self.assertEqual(s.transport.writes, [WIRE_BODY])
        s.take()
        s.reply(b"250 2.0.0 queued as X\r\n")
        result = self.successResultOf(d)
        self.assertEqual(result.code, 250)
        self.assertEqual(result.enhanced, "2.0.0")
        self.assertEqual(result.text, "queued as X")
        self.assertTrue(result.accepted_all)
        self.assertEqual(
            [(str(r.recipient), r.code, r.enhanced, r.text) for r in result.recipients],
            [
                ("a@example.com", 250, "2.0.0", "queued as X"),
                ("b@example.com", 250, "2.0.0", "queued as X"),
            ],
        )

    def test_lockstep_without_pipelining(self) -> None:
        s = ready_session(ehlo=[b"8BITMIME"])
        d = s.proto.send(envelope("a@example.com", "b@example.com"))
        self.assertEqual(s.take(), b"MAIL FROM:<from@example.com>\r\n")
        s.reply(b"250 ok\r\n")
        self.assertEqual(s.take(), b"RCPT TO:<a@example.com>\r\n")
        s.reply(b"550 5.1.1 no such user\r\n")
        self.assertEqual(s.take(), b"RCPT TO:<b@example.com>\r\n")
        s.reply(b"250 ok\r\n")
        self.assertEqual(s.take(), b"DATA\r\n")
        s.reply(b"354 go\r\n")
        self.assertEqual(s.take(), WIRE_BODY)
        s.reply(b"250 ok\r\n")
        result = self.successResultOf(d)
        self.assertEqual(
            [(str(r.recipient), r.code, r.enhanced) for r in result.recipients],
            [("a@example.com", 550, "5.1.1"), ("b@example.com", 250, None)],
        )

    def test_lockstep_refusals_then_rset_before_the_next_transaction(self) -> None:
        s = ready_session(ehlo=[b"8BITMIME"])
        d = s.proto.send(envelope())
        self.assertEqual(s.take(), b"MAIL FROM:<from@example.com>\r\n")
        s.reply(b"451 4.3.0 busy\r\n")
        self.assertEqual(self.successResultOf(d).recipients[0].code, 451)
        self.assertEqual(s.take(), b"")  # nothing more of the refused transaction
        for refusal in (b"RCPT", b"DATA", None):
            d = s.proto.send(envelope())
            self.assertEqual(s.take(), b"RSET\r\n")
            s.reply(b"250 reset\r\n")
            self.assertEqual(s.take(), b"MAIL FROM:<from@example.com>\r\n")
            s.reply(b"250 ok\r\n")
            self.assertEqual(s.take(), b"RCPT TO:<to@example.com>\r\n")
            if refusal == b"RCPT":
                s.reply(b"550 5.1.1 no such user\r\n")  # no DATA with no recipient
                self.assertEqual(self.successResultOf(d).recipients[0].code, 550)
                continue
            s.reply(b"250 ok\r\n")
            self.assertEqual(s.take(), b"DATA\r\n")
            if refusal == b"DATA":
                s.reply(b"554 5.7.1 no\r\n")
                self.assertEqual(self.successResultOf(d).code, 554)
                continue
            s.reply(b"354 go\r\n")
            self.assertEqual(s.take(), WIRE_BODY)
            s.reply(b"250 ok\r\n")
            self.assertEqual(self.successResultOf(d).code, 250)
        self.assertEqual(s.take(), b"")
        self.assertTrue(s.proto.usable)

    def test_connection_reused_without_rset_after_success(self) -> None:
        s = ready_session(ehlo=[b"8BITMIME"])
        for n in range(3):
            d = s.proto.send(envelope())
            self.assertEqual(s.take(), b"MAIL FROM:<from@example.com>\r\n", n)
            s.reply(b"250 ok\r\n")
            s.take()
            s.reply(b"250 ok\r\n")
            s.take()
            s.reply(b"354 go\r\n")
            s.take()
            s.reply(b"250 ok\r\n")
            self.assertEqual(self.successResultOf(d).code, 250)
        self.assertTrue(s.proto.usable)

    def test_mixed_recipient_replies_map_to_the_right_recipient(self) -> None:
        s = ready_session()
        d = s.proto.send(envelope("ok@example.com", "busy@example.com", "gone@example.com"))
        s.take()
        s.reply(
            b"250 ok\r\n250 ok\r\n451 4.2.1 busy\r\n"
            b"550-5.1.1 no\r\n550 5.1.1 such user\r\n354 go\r\n"
        )
        s.take()
        s.reply(b"250 ok\r\n")
        result: TransactionResult = self.successResultOf(d)
        got = [(str(r.recipient), r.code, r.text) for r in result.recipients]
        self.assertEqual(
            got,
            [
                ("ok@example.com", 250, "ok"),
                ("busy@example.com", 451, "busy"),
                ("gone@example.com", 550, "no\nsuch user"),
            ],
        )

    def test_mail_refused_in_pipelined_group_then_rset_before_next(self) -> None:
        s = ready_session()
        d1 = s.proto.send(envelope("a@example.com"))
        s.take()
        s.reply(b"451 4.3.0 try later\r\n503 need MAIL\r\n503 need MAIL\r\n")
        result = self.successResultOf(d1)
        self.assertEqual([r.code for r in result.recipients], [451])
        d2 = s.proto.send(envelope("b@example.com"))
        self.assertTrue(s.take().startswith(b"RSET\r\nMAIL FROM:"))
        s.reply(b"250 flushed\r\n250 ok\r\n250 ok\r\n354 go\r\n")
        s.take()
        s.reply(b"250 ok\r\n")
        self.assertEqual(self.successResultOf(d2).code, 250)

    def test_data_refused_with_no_valid_recipients(self) -> None:
        s = ready_session()
        d = s.proto.send(envelope("x@example.com", "y@example.com"))
        s.take()
        s.reply(b"250 ok\r\n550 no\r\n550 no\r\n554 5.5.1 no valid recipients\r\n")
        self.assertEqual(s.take(), b"")  # no body went out
        result = self.successResultOf(d)
        self.assertEqual([r.code for r in result.recipients], [550, 550])

    def test_4xx_after_dot_applies_to_accepted_recipients(self) -> None:
        s = ready_session()
        d = s.proto.send(envelope("a@example.com", "b@example.com"))
        s.take()
        s.reply(b"250 ok\r\n250 ok\r\n550 nope\r\n354 go\r\n")
        s.take()
        s.reply(b"452 4.3.1 out of space\r\n")
        result = self.successResultOf(d)
        self.assertEqual([r.code for r in result.recipients], [452, 550])

    def test_a_reply_that_answers_the_whole_transaction_is_shared(self) -> None:
        # RecipientReply.shared: the final reply is one recipient's own only when that
        # recipient was the one accepted; a refused MAIL FROM answers for everyone.
        s = ready_session()
        two = s.proto.send(envelope("a@example.com", "b@example.com"))
        s.take()
        s.reply(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
        s.take()
        s.reply(b"550 5.1.1 no such user\r\n")
        one_left = s.proto.send(envelope("c@example.com", "d@example.com"))
        s.take()
        s.reply(b"250 ok\r\n250 ok\r\n550 5.1.1 no\r\n354 go\r\n")
        s.take()
        s.reply(b"550 5.1.1 no such user\r\n")
        t = ready_session()
        sender = t.proto.send(envelope("e@example.com"))
        t.take()
        t.reply(b"550 5.1.1 who?\r\n503 need MAIL\r\n503 need MAIL\r\n")
        got = [
            [(str(r.recipient), r.code, r.shared) for r in self.successResultOf(d).recipients]
            for d in (two, one_left, sender)
        ]
        self.assertEqual(
            got,
            [
                [("a@example.com", 550, True), ("b@example.com", 550, True)],
                [("c@example.com", 550, False), ("d@example.com", 550, False)],
                [("e@example.com", 550, True)],
            ],
        )

    def test_next_message_pipelined_behind_the_body(self) -> None:
        s = ready_session()
        d1 = s.proto.send(envelope("a@example.com"))
        d2 = s.proto.send(envelope("b@example.com"))
        s.take()
        s.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
        self.assertEqual(
            s.transport.writes,
            [WIRE_BODY + b"MAIL FROM:<from@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"],
        )
        s.take()
        s.reply(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
        s.reply(b"250 ok\r\n")
        self.assertEqual(self.successResultOf(d1).code, 250)
        self.assertEqual(self.successResultOf(d2).code, 250)

    def test_a_held_body_waits_for_release_and_nothing_is_written_before_it(self) -> None:
        s = ready_session()
        ready: list[str] = []
        ended: list[tuple[str, int | None]] = []

        def notify(name: str, result: TransactionResult | None, error: Exception | None) -> None:
            ended.append((name, result.code if result is not None else None))

        a = s.proto.submit(envelope("a@example.com"), notify, "a", ready=ready.append)
        s.proto.submit(envelope("b@example.com"), notify, "b", ready=ready.append)
        s.take()
        s.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
        # The server waits for a's data: neither the body nor b's envelope may go out yet.
        self.assertEqual((ready, s.transport.writes), (["a"], []))
        s.proto.release_body(a)
        self.assertEqual(
            s.transport.writes,
            [WIRE_BODY + b"MAIL FROM:<from@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n"],
        )
        s.take()
        s.reply(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
        self.assertEqual((ended, ready, s.transport.writes), ([("a", 250)], ["a", "b"], []))
        s.proto.release_body(a)  # no longer held: nothing happens
        self.assertEqual(s.transport.writes, [])

    def test_a_held_body_is_released_from_inside_ready_in_the_same_write(self) -> None:
        s = ready_session()
        txns: list[Any] = []

        def ready(_: object) -> None:
            s.proto.release_body(txns[0])

        txns.append(s.proto.submit(envelope("a@example.com"), lambda *_: None, None, ready=ready))
        s.take()
        s.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
        self.assertEqual(s.transport.writes, [WIRE_BODY])

    def test_losing_the_connection_fails_a_transaction_whose_body_is_held(self) -> None:
        s = ready_session()
        errors: list[Exception | None] = []
        s.proto.submit(
            envelope("a@example.com"), lambda _, r, e: errors.append(e), None, ready=lambda _: None
        )
        s.take()
        s.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
        s.lose()
        self.assertEqual(len(errors), 1)
        self.assertIsInstance(errors[0], ConnectionLostError)
        self.assertTrue(errors[0].transient)  # type: ignore[union-attr]

    def test_smtputf8_needed_but_not_offered(self) -> None:
        s = ready_session(ehlo=[b"PIPELINING", b"8BITMIME"])
        d = s.proto.send(envelope("jörg@example.com"))
        self.failureResultOf(d, ExtensionRequiredError)
        self.assertEqual(s.take(), b"")

    def test_smtputf8_used_when_offered(self) -> None:
        s = ready_session()
        s.proto.send(envelope("jörg@example.com"))
        self.assertIn(b" SMTPUTF8\r\nRCPT TO:<j\xc3\xb6rg@example.com>", s.take())


class FailureTests(SynchronousTestCase):
    def test_reply_timeout_aborts_and_fails_transaction(self) -> None:
        s = ready_session(reply_timeout=5)
        d = s.proto.send(envelope())
        s.clock.advance(4)
        self.assertNoResult(d)
        s.clock.advance(1.5)
        self.assertTrue(s.transport.aborted)
        s.lose()
        err = self.failureResultOf(d, SMTPTimeoutError).value
        self.assertIsInstance(err, TimeoutError)
        self.assertIn("MAIL", str(err))

    def test_data_phase_timeout_even_with_trickling_replies(self) -> None:
        s = ready_session(reply_timeout=5, data_timeout=8)
        d = s.proto.send(envelope())
        s.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
        for _ in range(3):
            s.clock.advance(3)
            s.reply(b"250-still\r\n")  # keeps the per-reply timer alive, not the DATA one
        self.assertTrue(s.transport.aborted)
        s.lose()
        self.assertIn("DATA phase", str(self.failureResultOf(d, SMTPTimeoutError).value))

    def test_drop_after_data_is_transient_connection_lost(self) -> None:
        s = ready_session()
        d = s.proto.send(envelope())
        s.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
        s.proto.connectionLost(Failure(ConnectionError("reset")))
        err = self.failureResultOf(d, ConnectionLostError).value
        self.assertTrue(err.transient)
        self.assertIn("after the message data", str(err))
        self.assertFalse(s.proto.usable)

    def test_421_fails_current_and_queued_transactions_transiently(self) -> None:
        s = ready_session(ehlo=[b"8BITMIME"])
        d1 = s.proto.send(envelope())
        d2 = s.proto.send(envelope())
        s.reply(b"421 4.7.0 closing\r\n")
        s.lose()
        e1 = self.failureResultOf(d1, TransientError).value
        self.assertEqual(e1.code, 421)
        self.failureResultOf(d2, ConnectionLostError)

    def test_unsolicited_421_when_idle_closes(self) -> None:
        s = ready_session()
        s.reply(b"421 4.4.2 idle too long\r\n")
        self.assertTrue(s.transport.disconnecting)
        self.assertFalse(s.proto.usable)


class CancellationTests(SynchronousTestCase):
    def test_cancel_queued_transaction_sends_nothing(self) -> None:
        s = ready_session(ehlo=[b"8BITMIME"])
        d1 = s.proto.send(envelope("a@example.com"))
        d2 = s.proto.send(envelope("b@example.com"))
        s.take()
        d2.cancel()
        self.failureResultOf(d2, defer.CancelledError)
        s.reply(b"250 ok\r\n")
        s.take()
        s.reply(b"250 ok\r\n")
        s.take()
        s.reply(b"354 go\r\n")
        s.take()
        s.reply(b"250 ok\r\n")
        self.successResultOf(d1)
        self.assertEqual(s.take(), b"")  # b's transaction never started
        self.assertFalse(s.transport.aborted)

    def test_cancel_started_transaction_drops_connection(self) -> None:
        s = ready_session()
        d = s.proto.send(envelope())
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertTrue(s.transport.aborted)


@pytest.mark.parametrize(
    "line",
    [b"garbage\r\n", b"99\r\n"],
)
def test_malformed_reply_aborts(line: bytes) -> None:
    s = ready_session()
    d = s.proto.send(envelope())
    s.reply(line)
    assert s.transport.aborted
    s.lose()
    failure = []
    d.addErrback(failure.append)
    assert failure
    assert failure[0].check(TransientError)


@given(pieces=st.lists(st.binary(max_size=20), max_size=6), data=st.data())
def test_what_is_left_after_a_partial_gathering_write(pieces: list[bytes], data: Any) -> None:
    joined = b"".join(pieces)
    sent = data.draw(st.integers(0, len(joined)))
    rest = unsent(pieces, sent)
    assert b"".join(rest) == joined[sent:]
    assert not rest or rest[0]  # an empty list when everything was written


@pytest.mark.parametrize("size", [1_000, 3_000_000])  # joined, then written as pieces
def test_a_flush_the_socket_takes_in_part_goes_on_through_the_transport(size: int) -> None:
    session = Session()
    session.handshake()
    session.take()
    ours, peer = socket.socketpair()
    with ours, peer:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        ours.setblocking(False)
        peer.setblocking(False)
        transport = session.transport
        transport.dataBuffer = b""  # type: ignore[attr-defined]  # what _flush reads of a real one
        transport._tempDataLen = 0  # type: ignore[attr-defined]
        session.proto._socket = ours
        pieces = [b"354 reply seen\r\n", bytes(range(256)) * (size // 256), b"MAIL FROM:<a@b>\r\n"]
        session.proto._out = list(pieces)
        session.proto._flush()
        received = b""
        while True:
            try:
                chunk = peer.recv(1 << 20)
            except BlockingIOError:
                break
            received += chunk
    assert received + transport.value() == b"".join(pieces)
    assert received
    assert bool(transport.value()) == (size > 100_000)  # the kernel took only part of it


class EnhancedStatusCodeTests(SynchronousTestCase):
    """RFC 3463 codes are split off a reply when the server advertised ENHANCEDSTATUSCODES,
    or otherwise when a well-formed code's class is the reply's."""

    def replies(self, ehlo: list[bytes], rcpt: list[bytes], final: bytes) -> list[Any]:
        s = ready_session(ehlo=ehlo)
        d = s.proto.send(envelope("a@example.com", "b@example.com", "c@example.com"))
        s.take()
        s.reply(b"250 ok\r\n" + b"".join(r + b"\r\n" for r in rcpt) + b"354 go\r\n")
        s.take()
        s.reply(final + b"\r\n")
        result = self.successResultOf(d)
        return [(r.code, r.enhanced, r.text) for r in result.recipients]

    def test_without_the_extension_only_a_code_of_the_replys_class(self) -> None:
        got = self.replies(
            [b"PIPELINING"],
            [b"550 5.1.1 no such user", b"550 4.2.0 not a status code", b"250 ok"],
            b"250 2.0.0 queued",
        )
        self.assertEqual(
            got,
            [
                (550, "5.1.1", "no such user"),
                (550, None, "4.2.0 not a status code"),
                (250, "2.0.0", "queued"),
            ],
        )

    def test_with_the_extension_any_well_formed_code(self) -> None:
        got = self.replies(
            [b"PIPELINING", b"ENHANCEDSTATUSCODES"],
            [b"550 4.2.0 odd but advertised", b"550 5.1 short", b"250 ok"],
            b"250 2.0.0 queued",
        )
        self.assertEqual(
            got,
            [
                (550, "4.2.0", "odd but advertised"),
                (550, None, "5.1 short"),
                (250, "2.0.0", "queued"),
            ],
        )

    def test_an_accepted_message_without_the_extension(self) -> None:
        s = ready_session(ehlo=[b"PIPELINING"])
        d = s.proto.send(envelope("a@example.com"))
        s.take()
        s.reply(b"250 ok\r\n250 ok\r\n354 go\r\n")
        s.take()
        s.reply(b"250 5.0.0 queued, oddly\r\n")
        result = self.successResultOf(d)
        self.assertEqual((result.enhanced, result.text), (None, "5.0.0 queued, oddly"))

    def test_malformed_codes_stay_in_the_text(self) -> None:
        for text in ("5.1 x", "5.1.1000 x", "5.1.1x", "3.1.1 x", "5..1 x", "x 5.1.1"):
            self.assertEqual(split_enhanced(text, 550, advertised=True), (None, text))
        self.assertEqual(split_enhanced("5.1.1", 550), ("5.1.1", ""))
        self.assertEqual(split_enhanced("5.7.1 spam", None), (None, "5.7.1 spam"))
