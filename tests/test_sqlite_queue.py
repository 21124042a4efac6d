"""The spool store (real SQLite files), the ``spool`` backend and the drain's outcome rules."""

from __future__ import annotations

import sqlite3
from collections.abc import Generator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer
from zope.interface.verify import verifyObject

from twistmail.backends.spool import SpoolBackend
from twistmail.errors import (
    AddressError,
    ConnectError,
    ConnectionLostError,
    HeaderInjectionError,
    PermanentError,
    TransientError,
)
from twistmail.interfaces import IBackend
from twistmail.mailer import Mailer
from twistmail.message import Envelope, envelope_from_bytes
from twistmail.queue.records import ClaimedMessage, Outcome, SpoolError
from twistmail.queue.sqlite import SqliteSpool, read_spool_status
from twistmail.queue.worker import Drain, settle
from twistmail.results import RecipientOutcome, SendResult
from twistmail.retry import RetryPolicy

Gen = Generator[defer.Deferred[Any], Any, None]
T0 = 1_700_000_000.0
NO_JITTER = RetryPolicy(max_attempts=3, initial_delay=10.0, jitter=0.0)


def envelope(n: int, *recipients: str) -> Envelope:
    rcpts = recipients or (f"user{n}@example.org",)
    data = f"Message-ID: <m{n}@test>\r\nSubject: {n}\r\n\r\nbody {n}\r\n.dot line\r\n".encode()
    return envelope_from_bytes("sender@example.com", rcpts, data)


def message(to: str | None = "ann@example.org", **headers: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "shop@example.com"
    if to is not None:
        msg["To"] = to
    for name, value in headers.items():
        msg[name.replace("_", "-")] = value
    msg["Subject"] = "hello"
    msg.set_content("hi\n")
    return msg


def rows(path: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


# The store ----------------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_spool_is_wal_with_synchronous_full_and_commits_before_firing(tmp_path: Path) -> Gen:
    path = tmp_path / "spool.db"
    spool = yield SqliteSpool.open(path)
    try:
        assert (yield spool.settings()) == ("wal", 2)  # 2 = FULL: fsync at every commit
        ids = yield spool.enqueue([envelope(1), envelope(2, "a@example.org", "b@example.org")])
        # Committed by the time the Deferred fired: another connection sees it.
        got = rows(path, "SELECT id, state, message_id, sender FROM messages ORDER BY id")
        assert got == [
            (ids[0], "queued", "<m1@test>", "sender@example.com"),
            (ids[1], "queued", "<m2@test>", "sender@example.com"),
        ]
        assert rows(path, "SELECT address FROM recipients WHERE message = ?", ids[1]) == [
            ("a@example.org",),
            ("b@example.org",),
        ]
    finally:
        yield spool.close()
    yield spool.close()  # idempotent


@pytest_twisted.inlineCallbacks
def test_concurrent_enqueues_share_one_commit(tmp_path: Path) -> Gen:
    spool = yield SqliteSpool.open(tmp_path / "spool.db")
    try:
        results = yield defer.gatherResults([spool.enqueue([envelope(i)]) for i in range(50)])
        ids = [r[0] for r in results]
        assert len(set(ids)) == 50
        # The first enqueue commits alone; the 49 made meanwhile share the next commit.
        assert spool.commits == 2
    finally:
        yield spool.close()


@pytest_twisted.inlineCallbacks
def test_claimed_envelope_is_the_stored_one(tmp_path: Path) -> Gen:
    spool = yield SqliteSpool.open(tmp_path / "spool.db")
    try:
        original = envelope(7, "x@example.org", "Zoë@例え.jp")
        yield spool.enqueue([original], now=T0)
        (claimed,) = yield spool.claim("a", 10, lease=60, now=T0)
        env = claimed.envelope
        assert env.payload == original.payload
        assert env.payload.endswith(b"\r\n..dot line\r\n.\r\n")
        assert (env.sender, env.recipients) == (original.sender, original.recipients)
        assert (env.message_id, env.size, env.smtputf8) == ("<m7@test>", original.size, True)
        assert claimed.positions == (0, 1)
        assert claimed.attempts == 0
    finally:
        yield spool.close()


@pytest_twisted.inlineCallbacks
def test_two_stores_on_one_file_never_claim_the_same_message(tmp_path: Path) -> Gen:
    path = tmp_path / "spool.db"
    one = yield SqliteSpool.open(path)
    two = yield SqliteSpool.open(path)
    try:
        yield one.enqueue([envelope(i) for i in range(200)], now=T0)
        batches = yield defer.gatherResults(
            [
                store.claim(owner, 15, lease=60, now=T0)
                for _ in range(10)
                for owner, store in (("one", one), ("two", two))
            ]
        )
        ids = [c.id for batch in batches for c in batch]
        assert len(ids) == 200
        assert len(set(ids)) == 200
        owners = rows(path, "SELECT owner, count(*) FROM messages GROUP BY owner ORDER BY owner")
        assert [o for o, _ in owners] == ["one", "two"]
        assert (yield one.claim("three", 10, lease=60, now=T0 + 1)) == []
    finally:
        yield one.close()
        yield two.close()


@pytest_twisted.inlineCallbacks
def test_an_expired_lease_is_reclaimed_and_the_old_owner_cannot_record(tmp_path: Path) -> Gen:
    path = tmp_path / "spool.db"
    spool = yield SqliteSpool.open(path)
    try:
        (mid,) = yield spool.enqueue([envelope(1)], now=T0)
        assert [c.id for c in (yield spool.claim("dead", 5, lease=30, now=T0))] == [mid]
        assert (yield spool.claim("live", 5, lease=30, now=T0 + 29)) == []
        summary = yield spool.summary(now=T0 + 29)
        assert (summary.held, summary.expired, summary.waiting) == (1, 0, 0)
        summary = yield spool.summary(now=T0 + 31)
        assert (summary.held, summary.expired, summary.waiting) == (0, 1, 1)
        (again,) = yield spool.claim("live", 5, lease=30, now=T0 + 31)
        assert again.id == mid
        sent = Outcome(mid, "sent", 1, T0 + 32, 250, "ok", ((0, "sent", 250, "ok"),))
        assert (yield spool.record("dead", sent, now=T0 + 32)) is False
        assert rows(path, "SELECT state, owner FROM messages") == [("sending", "live")]
        assert (yield spool.record("live", sent, now=T0 + 32)) is True
        # Sent: kept as a record, but the payload is dropped.
        assert rows(path, "SELECT state, owner, length(payload) FROM messages") == [
            ("sent", None, 0)
        ]
    finally:
        yield spool.close()


@pytest_twisted.inlineCallbacks
def test_renew_extends_only_the_owners_leases(tmp_path: Path) -> Gen:
    spool = yield SqliteSpool.open(tmp_path / "spool.db")
    try:
        yield spool.enqueue([envelope(1), envelope(2)], now=T0)
        yield spool.claim("a", 1, lease=30, now=T0)
        yield spool.claim("b", 1, lease=30, now=T0)
        assert (yield spool.renew("a", 30, now=T0 + 20)) == 1
        (taken,) = yield spool.claim("c", 5, lease=30, now=T0 + 40)  # b's lapsed, a's not
        assert taken.id == 2
    finally:
        yield spool.close()


@pytest_twisted.inlineCallbacks
def test_release_gives_messages_back_without_counting_an_attempt(tmp_path: Path) -> Gen:
    path = tmp_path / "spool.db"
    spool = yield SqliteSpool.open(path)
    try:
        ids = yield spool.enqueue([envelope(1), envelope(2)], now=T0)
        yield spool.claim("a", 5, lease=30, now=T0)
        assert (yield spool.release("b", ids)) == 0  # not b's to give back
        assert (yield spool.release("a", ids)) == 2
        assert rows(path, "SELECT DISTINCT state, attempts, owner FROM messages") == [
            ("queued", 0, None)
        ]
    finally:
        yield spool.close()


@pytest_twisted.inlineCallbacks
def test_only_pending_recipients_come_back_and_only_when_due(tmp_path: Path) -> Gen:
    path = tmp_path / "spool.db"
    spool = yield SqliteSpool.open(path)
    try:
        yield spool.enqueue(
            [envelope(1, "ok@example.org", "bad@example.org", "slow@example.org")], now=T0
        )
        (claimed,) = yield spool.claim("a", 5, lease=30, now=T0)
        result = SendResult(
            sender="sender@example.com",
            recipients=[
                RecipientOutcome("ok@example.org", "sent", 250, None, "ok", 1),
                RecipientOutcome("bad@example.org", "failed", 550, "5.1.1", "no such user", 1),
                RecipientOutcome("slow@example.org", "failed", 451, "4.2.1", "busy", 1),
            ],
            code=250,
            response="queued",
            attempts=1,
        )
        outcome = settle(claimed, result, None, NO_JITTER, T0)
        assert (outcome.state, outcome.due, outcome.attempts) == ("deferred", T0 + 10, 1)
        assert (yield spool.record("a", outcome, now=T0)) is True
        assert rows(path, "SELECT address, state, code FROM recipients ORDER BY position") == [
            ("ok@example.org", "sent", 250),
            ("bad@example.org", "failed", 550),
            ("slow@example.org", "pending", 451),
        ]
        assert (yield spool.claim("b", 5, lease=30, now=T0 + 9)) == []
        (later,) = yield spool.claim("b", 5, lease=30, now=T0 + 10)
        assert [str(r) for r in later.envelope.recipients] == ["slow@example.org"]
        assert later.positions == (2,)
        assert later.attempts == 1
        assert later.refused_before == ("bad@example.org", 550, "no such user")
        # The last recipient goes through; the message still failed (bad@ was refused).
        accepted = SendResult(
            "sender@example.com",
            [RecipientOutcome("slow@example.org", "sent", 250, None, "ok", 1)],
            250,
            "queued",
            1,
        )
        final = settle(later, accepted, None, NO_JITTER, T0 + 10)
        assert (final.state, final.code) == ("failed", 550)
        assert final.response == "bad@example.org: no such user"
        yield spool.record("b", final, now=T0 + 10)
        status = read_spool_status(path)
        assert status.counts["failed"] == 1
        (row,) = status.unsent
        assert row.recipients == (
            "ok@example.org sent, bad@example.org failed, slow@example.org sent"
        )
        # A failed message keeps its payload (to inspect or requeue it).
        assert rows(path, "SELECT length(payload) > 0 FROM messages") == [(1,)]
    finally:
        yield spool.close()


@pytest_twisted.inlineCallbacks
def test_a_file_that_is_not_a_spool_is_refused(tmp_path: Path) -> Gen:
    bogus = tmp_path / "bogus.db"
    bogus.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(SpoolError, match="not a twistmail spool"):
        yield SqliteSpool.open(bogus)
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
    conn.commit()
    conn.close()
    with pytest.raises(SpoolError, match="not a twistmail spool"):
        yield SqliteSpool.open(other)
    # Left as it was: no spool tables, and not switched to WAL.
    assert rows(other, "SELECT name FROM sqlite_master") == [
        ("meta",),
        ("sqlite_autoindex_meta_1",),
    ]
    assert rows(other, "PRAGMA journal_mode") == [("delete",)]
    with pytest.raises(SpoolError, match="no such spool"):
        yield SqliteSpool.open(tmp_path / "missing.db", create=False)
    assert not (tmp_path / "missing.db").exists()
    with pytest.raises(SpoolError, match="no such spool"):
        read_spool_status(tmp_path / "missing.db")


# Outcome rules --------------------------------------------------------------------------------


def claimed_message(*recipients: str, attempts: int = 0) -> ClaimedMessage:
    env = envelope(1, *recipients)
    return ClaimedMessage(1, env, tuple(range(len(env.recipients))), attempts, None)


def test_a_drop_defers_every_recipient_until_attempts_run_out() -> None:
    claimed = claimed_message("a@example.org", "b@example.org")
    drop = ConnectionLostError("connection lost during DATA", host="127.0.0.1:25")
    first = settle(claimed, None, drop, NO_JITTER, T0)
    assert (first.state, first.due, first.code) == ("deferred", T0 + 10, None)
    assert "connection lost" in first.response
    assert [r[1] for r in first.recipients] == ["pending", "pending"]
    third = settle(claimed_message("a@example.org", attempts=2), None, drop, NO_JITTER, T0)
    assert third.state == "failed"
    assert third.attempts == 3
    assert "gave up after 3 attempts" in third.response


def test_backoff_doubles_with_the_attempts() -> None:
    transient = TransientError("busy", code=421, response="busy")
    dues = [
        settle(claimed_message(attempts=n), None, transient, NO_JITTER, T0).due - T0
        for n in range(2)
    ]
    assert dues == [10.0, 20.0]


def test_a_5xx_fails_at_once_and_names_the_recipient() -> None:
    refused = PermanentError("refused", code=554, response="5.7.1 spam")
    outcome = settle(claimed_message("a@example.org"), None, refused, NO_JITTER, T0)
    assert (outcome.state, outcome.code, outcome.attempts) == ("failed", 554, 1)
    assert outcome.response == "a@example.org: refused (server replied 554 5.7.1 spam)"


# The backend -------------------------------------------------------------------------------


def test_spool_backend_provides_ibackend(tmp_path: Path) -> None:
    assert verifyObject(IBackend, SpoolBackend(path=tmp_path / "s.db"))


@pytest_twisted.inlineCallbacks
def test_backend_counts_enqueued_skips_no_recipients_and_refuses_bad_ones(
    tmp_path: Path,
) -> Gen:
    path = tmp_path / "spool.db"
    backend = SpoolBackend(path=path, fail_silently=False)
    yield backend.close()  # safe before open
    injected = message()
    injected.set_raw("X-Tag", "a\r\nBcc: thief@evil.example")
    batch: list[Any] = [
        message(),
        message(to=None),  # no recipients: skipped, not counted
        ("shop@example.com", [], b"Subject: x\r\n\r\nx\r\n"),  # likewise
        message(to="not an address"),
        injected,
        ("shop@example.com", ["bob@example.org"], b"Subject: y\r\n\r\ny\r\n"),
    ]
    with pytest.raises(AddressError, match=r"^message 3: .*not an address") as info:
        yield backend.send_messages(batch)
    assert info.value.field == "To"
    # The valid ones were enqueued all the same.
    got = rows(path, "SELECT r.address FROM messages m JOIN recipients r ON r.message = m.id")
    assert got == [("ann@example.org",), ("bob@example.org",)]
    silent = SpoolBackend(path=path, fail_silently=True)
    assert (yield silent.send_messages(batch)) == 2
    assert (yield silent.send_messages([])) == 0
    with pytest.raises(HeaderInjectionError, match=r"^message 0: .*X-Tag") as info2:
        yield backend.send_messages([injected])
    assert info2.value.field == "X-Tag"
    yield backend.close()
    yield backend.close()
    yield silent.close()
    assert rows(path, "SELECT count(*) FROM messages") == [(4,)]


@pytest_twisted.inlineCallbacks
def test_backend_open_is_idempotent_and_sending_after_close_reopens(tmp_path: Path) -> Gen:
    backend = SpoolBackend(path=tmp_path / "spool.db")
    yield defer.gatherResults([backend.open(), backend.open()])
    first = backend.spool
    yield backend.open()
    assert backend.spool is first is not None
    assert (yield backend.send_messages([message()])) == 1
    yield backend.close()
    assert backend.spool is None
    assert (yield backend.send_messages([message(), message()])) == 2
    yield backend.close()
    assert rows(tmp_path / "spool.db", "SELECT count(*) FROM messages") == [(3,)]


# The drain, in process ---------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_an_unreachable_server_stops_the_drain_without_spending_attempts(
    tmp_path: Path,
) -> Gen:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = tmp_path / "spool.db"
    spool = yield SqliteSpool.open(path)
    mailer = Mailer(f"smtp://127.0.0.1:{port}", concurrency=2, max_attempts=1)
    try:
        yield spool.enqueue([envelope(i) for i in range(30)])
        report = yield Drain(spool, mailer, retry=NO_JITTER).run()
    finally:
        yield mailer.close()
        yield spool.close()
    assert isinstance(report.abort, ConnectError)
    assert report.sent == report.failed == report.deferred == 0
    assert report.released == report.claimed > 0
    assert rows(path, "SELECT DISTINCT state, attempts, owner FROM messages") == [
        ("queued", 0, None)
    ]
