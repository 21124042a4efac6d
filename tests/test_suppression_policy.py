"""Which refusals suppress, and the guard against suppressing a whole list (task.Clock)."""

from __future__ import annotations

from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase

from twistmail.bounces.parse import RecipientReport
from twistmail.results import RecipientOutcome
from twistmail.suppression import HARD_BOUNCE, MemorySuppressionList
from twistmail.suppression.policy import BounceGuard, is_recipient_hard_bounce


def refused(rcpt: str, enhanced: str | None, code: int = 550) -> RecipientOutcome:
    return RecipientOutcome(rcpt, "failed", code, enhanced, "no", 1)


def ok(rcpt: str) -> RecipientOutcome:
    return RecipientOutcome(rcpt, "sent", 250, None, "ok", 1)


class ClassificationTests(SynchronousTestCase):
    def test_only_the_recipients_own_address_problems_suppress(self) -> None:
        for enhanced in ("5.1.1", "5.1.3", "5.1.6", "5.1.10"):
            self.assertTrue(is_recipient_hard_bounce(550, enhanced))
        for enhanced in ("5.1.0", "5.1.7", "5.1.8", "5.7.1", "4.1.1", None):
            self.assertFalse(is_recipient_hard_bounce(550, enhanced))
        self.assertFalse(is_recipient_hard_bounce(450, "5.1.1"))
        self.assertFalse(is_recipient_hard_bounce(None, "5.1.1"))

    def test_a_refusal_at_rcpt_and_a_dsn_agree_on_every_status(self) -> None:
        # One list decides for both: a status a DSN would suppress for, a server's refusal
        # at RCPT suppresses for too, and the other way round.
        statuses = ["5.1.0", "5.1.1", "5.1.2", "5.1.3", "5.1.6", "5.1.7", "5.1.8", "5.1.10"]
        statuses += ["5.2.1", "5.2.2", "5.7.1", "5.7.26", "5.0.0", "5.1.100"]
        for status in statuses:
            dsn = RecipientReport("u@example.org", None, "failed", status, None, None, "hard")
            self.assertEqual(dsn.suppress, is_recipient_hard_bounce(550, status), status)


class GuardTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.store = MemorySuppressionList(clock=self.clock.seconds)
        self.guard = BounceGuard(self.store, self.clock, window=10)

    def suppressed(self) -> list[str]:
        return [e.address for e in self.successResultOf(self.store.entries())]

    def test_a_lone_hard_bounce_is_suppressed_when_the_run_ends(self) -> None:
        self.guard.note([refused("Gone@Example.org", "5.1.1")])
        self.assertEqual(self.suppressed(), [])  # held until its batch is decided
        self.successResultOf(self.guard.flush())
        (entry,) = self.successResultOf(self.store.entries())
        self.assertEqual((entry.address, entry.reason), ("gone@example.org", HARD_BOUNCE))
        self.assertIn("5.1.1", entry.detail)

    def test_only_the_bounced_recipient_of_a_message_is_suppressed(self) -> None:
        self.guard.note([ok("a@example.org"), refused("b@example.org", "5.1.1"), ok("c@x.org")])
        self.successResultOf(self.guard.flush())
        self.assertEqual(self.suppressed(), ["b@example.org"])

    def test_a_null_mx_refusal_at_rcpt_suppresses_its_recipient(self) -> None:
        # RFC 7505: a domain publishing a null MX takes no mail; the reply is 556 5.1.10.
        self.guard.note([ok("a@example.org"), refused("b@nullmx.example", "5.1.10", 556)])
        self.successResultOf(self.guard.flush())
        self.assertEqual(self.suppressed(), ["b@nullmx.example"])

    def test_a_shared_refusal_never_suppresses(self) -> None:
        # A refused MAIL FROM, or the one reply to the data of a message with several
        # recipients: it does not say which address it means.
        shared = [refused(f"u{n}@example.org", "5.1.1") for n in range(2)]
        for outcome in shared:
            outcome.shared = True
        self.guard.accepted(8)
        self.guard.note(shared)
        self.successResultOf(self.guard.flush())
        self.assertEqual(self.suppressed(), [])
        self.assertEqual(self.guard.withheld, 0)

    def test_sender_problems_never_suppress(self) -> None:
        self.guard.note(
            [refused(f"u{n}@example.org", e) for n, e in enumerate(["5.1.0", "5.1.7", "5.1.8"])]
        )
        self.successResultOf(self.guard.flush())
        self.assertEqual(self.suppressed(), [])

    def test_a_batch_mostly_refused_at_once_suppresses_nobody(self) -> None:
        self.guard.accepted(3)
        self.guard.note([refused(f"u{n}@example.org", "5.1.1") for n in range(7)])
        self.successResultOf(self.guard.flush())
        self.assertEqual(self.suppressed(), [])
        self.assertEqual(self.guard.withheld, 7)

    def test_a_batch_mostly_accepted_suppresses_its_bounces(self) -> None:
        self.guard.accepted(8)
        self.guard.note([refused("a@example.org", "5.1.1"), refused("b@example.org", "5.1.6")])
        # The window (10) is complete: decided without a flush.
        self.assertEqual(self.suppressed(), ["a@example.org", "b@example.org"])

    def test_a_batch_left_open_is_decided_after_max_wait(self) -> None:
        self.guard.note([refused("a@example.org", "5.1.1")])
        self.clock.advance(self.guard.max_wait - 1)
        self.assertEqual(self.suppressed(), [])
        self.clock.advance(1)
        self.assertEqual(self.suppressed(), ["a@example.org"])


def test_a_messages_list_is_its_list_id_header_only() -> None:
    from twistmail.suppression.screen import list_id_of

    assert list_id_of(b"Subject: x\r\nList-Id: News <News.Example.org>\r\n\r\nbody\r\n") == (
        "news.example.org"
    )
    assert list_id_of(b"LIST-ID:\r\n <folded.example.org>\r\nSubject: x\r\n\r\n") == (
        "folded.example.org"
    )
    assert list_id_of(b"Subject: x\r\n\r\nList-Id: <in.the.body>\r\n") == ""
    assert list_id_of(b"Subject: x\r\n\r\n") == ""
    assert list_id_of(b"Subject: x\nList-Id: <bare.lf.example>\n\nList-Id: <body>\n") == (
        "bare.lf.example"
    )
    assert list_id_of(b"Subject: x\r\nX-List-Id: <not.this.one>\r\n\r\n") == ""


def test_the_header_section_ends_at_the_first_empty_line_whatever_its_line_breaks() -> None:
    """header_end finds what the regex ``\\r?\\n\\r?\\n`` finds first, for any mix of breaks."""
    import random
    import re

    from twistmail.suppression.screen import header_end

    blank_line = re.compile(rb"\r?\n\r?\n")
    pieces = [b"\r", b"\n", b"a", b":", b" "]
    rng = random.Random(11)
    for _ in range(20_000):
        payload = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        found = blank_line.search(payload)
        assert header_end(payload) == (found.start() if found else len(payload)), payload
