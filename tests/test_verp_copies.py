"""``VerpSender`` and a queued message with several recipients: one copy per recipient, each
from its own return path, ended as one attempt (no reactor: a sender that answers on cue)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from twistmail.bounces.sending import VerpSender
from twistmail.bounces.verp import VerpKeys, VerpSigner
from twistmail.errors import ConnectionLostError, DeliveryError
from twistmail.message import Envelope, envelope_from_bytes
from twistmail.queue.records import ClaimedMessage
from twistmail.smtp._transaction import RecipientReply, TransactionResult

VERP = VerpSigner(VerpKeys((("k1", b"s" * 40),)), "bounces.example.com")


@dataclass
class Copy:
    envelope: Envelope
    notify: Callable[[Any, TransactionResult | None, DeliveryError | None], None]
    context: Any
    ready: Callable[[Any], None] | None
    released: bool = False
    cancelled: bool = False

    def release_body(self) -> None:
        self.released = True

    def cancel(self) -> None:
        self.cancelled = True

    def reply(self, code: int, text: str = "ok") -> None:
        (rcpt,) = self.envelope.recipients
        reply = RecipientReply(rcpt, code, None, text)
        self.notify(self.context, TransactionResult([reply], code, None, text, code < 300), None)

    def fail(self, error: DeliveryError) -> None:
        self.notify(self.context, None, error)


@dataclass
class CueSender:
    capacity: int = 10
    copies: list[Copy] = field(default_factory=list)

    def attempt(self, envelope: Envelope, notify: Any, context: Any, ready: Any = None) -> Copy:
        copy = Copy(envelope, notify, context, ready)
        self.copies.append(copy)
        return copy

    def abort(self) -> None:
        pass


@dataclass
class Job:
    claimed: ClaimedMessage


def job(*recipients: str) -> Job:
    envelope = envelope_from_bytes("shop@example.com", list(recipients), b"Subject: x\r\n\r\nx\r\n")
    positions = tuple(range(3, 3 + len(recipients)))
    claimed = ClaimedMessage(
        id=7, fence=1, envelope=envelope, positions=positions, attempts=0, refused_before=None
    )
    return Job(claimed)


class CopiesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.sender = CueSender()
        self.verp = VerpSender(self.sender, VERP)
        self.ended: list[tuple[Any, TransactionResult | None, DeliveryError | None]] = []
        self.asked: list[Any] = []

    def start(self, *recipients: str, hold: bool = False) -> Any:
        self.job = job(*recipients)
        ready = self.asked.append if hold else None
        return self.verp.attempt(
            self.job.claimed.envelope, lambda *end: self.ended.append(end), self.job, ready
        )

    def test_each_recipient_gets_a_copy_from_its_own_return_path(self) -> None:
        self.start("a@example.org", "b@example.org")
        a, b = self.sender.copies
        refs = [VERP.verify(str(c.envelope.sender)) for c in (a, b)]
        self.assertEqual([(r.message, r.number) for r in refs if r], [(7, 3), (7, 4)])
        self.assertEqual(
            [c.envelope.recipients for c in (a, b)],
            [self.job.claimed.envelope.recipients[:1], self.job.claimed.envelope.recipients[1:]],
        )
        a.reply(250)
        self.assertEqual(self.ended, [])  # the attempt ends with its last copy
        b.reply(550, "5.1.1 no such user")
        ((context, result, error),) = self.ended
        self.assertIs(context, self.job)
        self.assertIsNone(error)
        assert result is not None
        self.assertFalse(result.accepted_all)
        self.assertEqual(
            [(str(r.recipient), r.code, r.shared) for r in result.recipients],
            [("a@example.org", 250, False), ("b@example.org", 550, False)],
        )

    def test_a_copy_lost_with_its_connection_defers_only_its_recipient(self) -> None:
        self.start("a@example.org", "b@example.org")
        a, b = self.sender.copies
        b.fail(ConnectionLostError("gone", host="mx"))
        a.reply(250)
        ((_, result, _),) = self.ended
        assert result is not None
        self.assertEqual(
            [(r.code, r.shared) for r in result.recipients], [(250, False), (451, True)]
        )

    def test_every_copy_failing_ends_with_an_error_the_server_may_have_seen(self) -> None:
        self.start("a@example.org", "b@example.org")
        a, b = self.sender.copies
        untried = ConnectionLostError("before", host="mx", attempted=False)
        seen = ConnectionLostError("after the data", host="mx")
        a.fail(untried)
        b.fail(seen)
        self.assertEqual(self.ended, [(self.job, None, seen)])

    def test_held_bodies_go_out_together_and_a_later_one_at_once(self) -> None:
        handle = self.start("a@example.org", "b@example.org", "c@example.org", hold=True)
        a, b, c = self.sender.copies
        assert a.ready is not None
        assert b.ready is not None
        assert c.ready is not None
        a.ready(a.context)
        b.ready(b.context)
        self.assertEqual(self.asked, [self.job])  # the job is asked once
        self.assertEqual([a.released, b.released], [False, False])
        handle.release_body()
        self.assertEqual([a.released, b.released, c.released], [True, True, False])
        c.ready(c.context)
        self.assertTrue(c.released)

    def test_cancel_cancels_every_copy_still_going(self) -> None:
        handle = self.start("a@example.org", "b@example.org")
        a, b = self.sender.copies
        a.reply(250)
        handle.cancel()
        self.assertEqual([a.cancelled, b.cancelled], [False, True])

    def test_one_recipient_and_campaign_rows_keep_one_transaction(self) -> None:
        self.start("a@example.org")
        (one,) = self.sender.copies
        self.assertIsNotNone(VERP.verify(str(one.envelope.sender)))
        envelope = job("a@example.org", "b@example.org").claimed.envelope
        self.verp.attempt(envelope, lambda *end: None, object())  # no queue claim
        self.assertEqual(self.sender.copies[1].envelope, envelope)
