"""The bounce intake on a real SQLite queue and suppression list: twistmail.bounces.intake."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import pytest_twisted

from twistmail.bounces.intake import BounceIntake
from twistmail.bounces.parse import Report
from twistmail.bounces.verp import VerpKeys, VerpSigner
from twistmail.message import envelope_from_bytes
from twistmail.queue.records import Outcome
from twistmail.queue.sqlite import SqliteQueue
from twistmail.suppression import SqliteSuppressionList

FIXTURES = Path(__file__).parent / "fixtures" / "dsn"
VERP = VerpSigner(VerpKeys((("k1", b"s" * 40),)), "bounces.example.com")


def fixture(name: str, **replace: str) -> bytes:
    data = (FIXTURES / name).read_bytes()
    for old, new in replace.items():
        data = data.replace(old.encode(), new.encode())
    return data


async def sent_queue(path: Path, *recipients: str) -> tuple[SqliteQueue, int]:
    """A queue holding one message delivered to ``recipients``."""
    queue = await SqliteQueue.open(path)
    data = b"Message-ID: <feb-news.42@example.com>\r\nSubject: hi\r\n\r\nbody\r\n"
    (message,) = await queue.enqueue(
        [envelope_from_bytes("newsletter@example.com", list(recipients), data)]
    )
    (claimed,) = await queue.claim("test", 1, lease=60)
    await queue.record(
        "test",
        Outcome(
            id=message,
            fence=claimed.fence,
            state="sent",
            attempts=1,
            code=250,
            response="ok",
            recipients=tuple((i, "sent", 250, "250 ok") for i in range(len(recipients))),
        ),
    )
    return queue, message


async def recipients_of(queue: SqliteQueue, message: int) -> list[tuple[str, str, int | None]]:
    status = await queue.message(message)
    assert status is not None
    return [(r.address, r.state, r.code) for r in status.recipients]


@pytest_twisted.ensureDeferred
async def test_a_hard_bounce_at_a_return_path_fails_the_queued_recipient_and_suppresses_it(
    tmp_path: Path,
) -> None:
    queue, message = await sent_queue(tmp_path / "q.db", "ok@example.org", "nobody@example.org")
    suppressions = await SqliteSuppressionList.open(tmp_path / "q.db")
    try:
        path = VERP.for_queued(message, 1, "nobody@example.org")
        intake = BounceIntake(suppressions, queue=queue, verp=VERP)
        processed = await intake.process(fixture("postfix-5.1.1-user-unknown.eml"), to=[path])
        (event,) = processed.events
        assert (event.kind, event.address, event.suppressed, event.failed) == (
            "hard",
            "nobody@example.org",
            True,
            True,
        )
        assert await recipients_of(queue, message) == [
            ("ok@example.org", "sent", 250),
            ("nobody@example.org", "failed", 550),
        ]
        status = await queue.message(message)
        assert status is not None
        assert status.recipients[1].response.startswith("bounced: 5.1.1 550 5.1.1")
        found = await suppressions.check(["nobody@example.org", "ok@example.org"])
        assert list(found) == ["nobody@example.org"]
        assert found["nobody@example.org"].reason == "hard-bounce"
        # The same bounce again changes nothing more.
        again = await intake.process(fixture("postfix-5.1.1-user-unknown.eml"), to=[path])
        assert again.events[0].kind == "hard"
        assert (await recipients_of(queue, message))[1] == ("nobody@example.org", "failed", 550)
        assert len(await suppressions.entries()) == 1
    finally:
        await suppressions.close()
        await queue.close()


@pytest_twisted.ensureDeferred
async def test_a_report_at_a_return_path_can_only_name_its_own_recipient(tmp_path: Path) -> None:
    """A DSN forged by the owner of one return path cannot suppress anybody else."""
    suppressions = await SqliteSuppressionList.open(tmp_path / "s.db")
    try:
        path = VERP.for_queued(5, 0, "mallory@example.org")
        intake = BounceIntake(suppressions, verp=VERP)  # no queue: the tag decides
        processed = await intake.process(fixture("postfix-5.1.1-user-unknown.eml"), to=[path])
        assert [e.kind for e in processed.events] == ["unmatched"]
        assert await suppressions.entries() == []
    finally:
        await suppressions.close()


@pytest_twisted.ensureDeferred
async def test_a_soft_bounce_is_recorded_and_suppresses_nothing(tmp_path: Path) -> None:
    queue, message = await sent_queue(tmp_path / "q.db", "slow@example.org")
    suppressions = await SqliteSuppressionList.open(tmp_path / "q.db")
    try:
        path = VERP.for_queued(message, 0, "slow@example.org")
        intake = BounceIntake(suppressions, queue=queue, verp=VERP)
        processed = await intake.process(fixture("postfix-4.4.1-delayed.eml"), to=[path])
        assert [(e.kind, e.suppressed, e.failed) for e in processed.events] == [
            ("soft", False, False)
        ]
        status = await queue.message(message)
        assert status is not None
        assert status.recipients[0].state == "sent"
        assert status.recipients[0].response.startswith("delayed: 4.4.1")
        assert await suppressions.entries() == []
    finally:
        await suppressions.close()
        await queue.close()


@pytest_twisted.ensureDeferred
async def test_a_bounce_about_our_sender_fails_the_recipient_but_never_suppresses(
    tmp_path: Path,
) -> None:
    queue, message = await sent_queue(tmp_path / "q.db", "alice@contoso.com")
    suppressions = await SqliteSuppressionList.open(tmp_path / "q.db")
    try:
        path = VERP.for_queued(message, 0, "alice@contoso.com")
        intake = BounceIntake(suppressions, queue=queue, verp=VERP)
        processed = await intake.process(fixture("m365-5.1.8-bad-outbound-sender.eml"), to=[path])
        assert [(e.kind, e.suppressed, e.failed) for e in processed.events] == [
            ("hard", False, True)
        ]
        assert await suppressions.entries() == []
    finally:
        await suppressions.close()
        await queue.close()


@pytest_twisted.ensureDeferred
async def test_a_redacted_complaint_at_a_return_path_suppresses_the_queued_recipient(
    tmp_path: Path,
) -> None:
    queue, message = await sent_queue(tmp_path / "q.db", "carol@example.org")
    suppressions = await SqliteSuppressionList.open(tmp_path / "q.db")
    try:
        path = VERP.for_queued(message, 0, "carol@example.org")
        data = fixture("rfc5965-b1-arf-minimal.eml", **{"To: <abuse@example.net>": f"To: <{path}>"})
        processed = await BounceIntake(suppressions, queue=queue, verp=VERP).process(data)
        (event,) = processed.events
        assert (event.kind, event.address, event.suppressed, event.failed) == (
            "complaint",
            "carol@example.org",
            True,
            False,
        )
        found = await suppressions.check(["carol@example.org"], "some-list")
        assert found["carol@example.org"].reason == "complaint"  # for all mail, any list
        assert (await recipients_of(queue, message))[0][1] == "sent"
    finally:
        await suppressions.close()
        await queue.close()


@pytest_twisted.ensureDeferred
async def test_without_verp_the_reported_addresses_are_used(tmp_path: Path) -> None:
    suppressions = await SqliteSuppressionList.open(tmp_path / "s.db")
    try:
        intake = BounceIntake(suppressions)
        for name in (
            "exim-5.0.0-user-unknown.eml",
            "gmail-5.1.1-no-such-user.eml",
            "m365-5.1.10-recipient-not-found.eml",
            "rfc5965-b2-arf-complete.eml",
            "rfc3464-10.2-multi-recipient.eml",
            "gmail-4.2.2-over-quota.eml",
        ):
            await intake.process(fixture(name))
        entries = await suppressions.entries()
        assert [(e.address, e.reason) for e in entries] == [
            ("nobody@contoso.com", "hard-bounce"),
            ("nobody@example.org", "hard-bounce"),
            ("nobody@gmail.com", "hard-bounce"),
            ("user@example.com", "complaint"),
        ]
    finally:
        await suppressions.close()


@pytest_twisted.ensureDeferred
async def test_a_message_that_is_no_report_changes_nothing(tmp_path: Path) -> None:
    suppressions = await SqliteSuppressionList.open(tmp_path / "s.db")
    try:
        processed = await BounceIntake(suppressions).process(
            b"From: a@example.org\r\nTo: nobody@example.org\r\nSubject: hi\r\n\r\nhello\r\n"
        )
        assert not processed.is_report
        assert processed.events == ()
        assert await suppressions.entries() == []
    finally:
        await suppressions.close()


@pytest_twisted.ensureDeferred
async def test_with_a_reactor_reports_are_parsed_off_the_reactor_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from twisted.internet import reactor

    from twistmail.bounces import intake as intake_module

    threads_seen: list[threading.Thread] = []
    real = intake_module.parse_report

    def parse(data: bytes) -> Report | None:
        threads_seen.append(threading.current_thread())
        return real(data)

    monkeypatch.setattr(intake_module, "parse_report", parse)
    suppressions = await SqliteSuppressionList.open(tmp_path / "s.db")
    try:
        processed = await BounceIntake(suppressions, reactor=reactor).process(
            fixture("gmail-5.1.1-no-such-user.eml")
        )
        assert [e.address for e in processed.events] == ["nobody@gmail.com"]
        assert threads_seen
        assert threads_seen[0] is not threading.main_thread()
    finally:
        await suppressions.close()
