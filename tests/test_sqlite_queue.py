"""The SQLite queue's own promises (real files: WAL, fsync, group commit, two stores on one file,
schema migration), the ``spool`` backend and the drain's outcome rules.

What every queue store promises is in ``test_queue_contract.py``, run against this one too.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Generator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, task
from zope.interface.verify import verifyObject

from twistmail import _sqlite
from twistmail.address import parse_address
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
from twistmail.queue.records import ClaimedMessage, Outcome, QueueError
from twistmail.queue.sqlite import (
    CHECKPOINT_PAGES,
    SCHEMA_VERSION,
    SqliteQueue,
    _claim,
    _connect,
    _insert,
    read_queue_status,
)
from twistmail.queue.worker import Drain, settle
from twistmail.retry import RetryPolicy
from twistmail.smtp._transaction import RecipientReply, TransactionResult
from twistmail.testing import MemoryQueue

Gen = Generator[defer.Deferred[Any], Any, None]
T0 = 1_700_000_000.0
NO_JITTER = RetryPolicy(max_attempts=3, initial_delay=10.0, jitter=0.0)


def envelope(n: int, *recipients: str) -> Envelope:
    rcpts = recipients or (f"user{n}@example.org",)
    data = f"Message-ID: <m{n}@test>\r\nSubject: {n}\r\n\r\nbody {n}\r\n.dot line\r\n".encode()
    return envelope_from_bytes("sender@example.com", rcpts, data)


def sent_outcome(claimed: ClaimedMessage) -> Outcome:
    """A one-recipient message's outcome: accepted."""
    return Outcome(
        id=claimed.id,
        fence=claimed.fence,
        state="sent",
        attempts=1,
        code=250,
        response="ok",
        recipients=((0, "sent", 250, "ok"),),
    )


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


def stopped_clock() -> task.Clock:
    clock = task.Clock()
    clock.advance(T0)
    return clock


@pytest_twisted.inlineCallbacks
def test_queue_is_wal_with_synchronous_full_and_commits_before_firing(tmp_path: Path) -> Gen:
    path = tmp_path / "spool.db"
    queue = yield SqliteQueue.open(path)
    try:
        assert (yield queue.settings()) == ("wal", 2)  # 2 = FULL: fsync at every commit
        ids = yield queue.enqueue([envelope(1), envelope(2, "a@example.org", "b@example.org")])
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
        yield queue.close()
    yield queue.close()  # idempotent


@pytest_twisted.inlineCallbacks
def test_concurrent_enqueues_share_one_commit(tmp_path: Path) -> Gen:
    queue = yield SqliteQueue.open(tmp_path / "spool.db")
    try:
        results = yield defer.gatherResults([queue.enqueue([envelope(i)]) for i in range(50)])
        ids = [r[0] for r in results]
        assert len(set(ids)) == 50
        # The store's thread takes what is queued when it gets to it: the first enqueue may
        # commit alone (if the thread was that quick), and the others share the next commit.
        assert 1 <= queue.commits <= 2
    finally:
        yield queue.close()


@pytest_twisted.inlineCallbacks
def test_times_in_the_file_come_from_the_queues_clock(tmp_path: Path) -> Gen:
    path = tmp_path / "spool.db"
    clock = stopped_clock()
    queue = yield SqliteQueue.open(path, clock=clock.seconds)
    try:
        yield queue.enqueue([envelope(1)])
        clock.advance(5)
        (claimed,) = yield queue.claim("a", 5, lease=30)
        assert rows(path, "SELECT due, lease_until, fence, created_at FROM messages") == [
            (T0, T0 + 35, 1, T0)
        ]
        clock.advance(1)
        outcome = Outcome(
            id=claimed.id,
            fence=claimed.fence,
            state="deferred",
            attempts=1,
            retry_in=60,
            code=421,
            response="later",
            recipients=((0, "pending", 421, "later"),),
        )
        assert (yield queue.record("a", outcome)) is True
        assert rows(path, "SELECT state, due, lease_until, updated_at FROM messages") == [
            ("deferred", T0 + 66, None, T0 + 6)
        ]
        # read_queue_status compares with its own clock argument.
        assert read_queue_status(path, clock=lambda: T0 + 65).due == 0
        assert read_queue_status(path, clock=lambda: T0 + 66).due == 1
    finally:
        yield queue.close()


@pytest_twisted.inlineCallbacks
def test_two_stores_on_one_file_never_claim_the_same_message(tmp_path: Path) -> Gen:
    path = tmp_path / "spool.db"
    clock = stopped_clock()
    one = yield SqliteQueue.open(path, clock=clock.seconds)
    two = yield SqliteQueue.open(path, clock=clock.seconds)
    try:
        yield one.enqueue([envelope(i) for i in range(200)])
        batches = yield defer.gatherResults(
            [
                store.claim(owner, 15, lease=60)
                for _ in range(10)
                for owner, store in (("one", one), ("two", two))
            ]
        )
        ids = [c.id for batch in batches for c in batch]
        assert len(ids) == 200
        assert len(set(ids)) == 200
        owners = rows(path, "SELECT owner, count(*) FROM messages GROUP BY owner ORDER BY owner")
        assert [o for o, _ in owners] == ["one", "two"]
        clock.advance(1)
        assert (yield one.claim("three", 10, lease=60)) == []
        # A claim made through one store is fenced for the other too.
        clock.advance(60)
        (taken,) = yield two.claim("four", 1, lease=60)
        stale = next(c for batch in batches for c in batch if c.id == taken.id)
        late = sent_outcome(stale)
        owner = rows(path, "SELECT owner FROM messages WHERE id = ?", stale.id)
        assert owner == [("four",)]
        assert (yield one.record("one", late)) is False
        assert (yield two.record("two", late)) is False
    finally:
        yield one.close()
        yield two.close()


def claim_steps(path: Path, waiting: int, limit: int) -> int:
    """SQLite virtual-machine steps (in hundreds) of one claim of ``limit`` messages from a
    spool file holding ``waiting`` queued messages."""
    conn = _connect(str(path), create=True)
    try:
        with _sqlite.transaction(conn):
            _insert([envelope(n) for n in range(waiting)], conn, T0)
        steps = 0

        def count() -> int:
            nonlocal steps
            steps += 1
            return 0

        conn.set_progress_handler(count, 100)
        with _sqlite.transaction(conn):
            assert len(_claim("a", limit, 30.0, conn, T0)) == limit
        return steps
    finally:
        conn.close()


def test_a_claims_work_does_not_grow_with_the_messages_waiting(tmp_path: Path) -> None:
    small = claim_steps(tmp_path / "small.db", 100, 20)
    large = claim_steps(tmp_path / "large.db", 5000, 20)
    # Sorting every waiting message on every claim made the large one ~50 times the small.
    assert large < 2 * small


@pytest_twisted.inlineCallbacks
def test_sent_drops_the_payload_and_failed_keeps_it(tmp_path: Path) -> Gen:
    path = tmp_path / "spool.db"
    queue = yield SqliteQueue.open(path)
    try:
        yield queue.enqueue([envelope(1), envelope(2)])
        one, two = yield queue.claim("a", 5, lease=30)
        for claimed, state, code in ((one, "sent", 250), (two, "failed", 550)):
            outcome = Outcome(
                id=claimed.id,
                fence=claimed.fence,
                state=state,
                attempts=1,
                code=code,
                response="reply",
                recipients=((0, state, code, "reply"),),
            )
            assert (yield queue.record("a", outcome)) is True
    finally:
        yield queue.close()
    # Sent: kept as a record, without its bytes; failed: kept whole, to inspect or requeue.
    assert rows(
        path,
        "SELECT state, owner, (SELECT length(data) FROM payloads WHERE message = id) "
        "FROM messages ORDER BY id",
    ) == [("sent", None, None), ("failed", None, len(two.envelope.payload))]


@pytest_twisted.inlineCallbacks
def test_sent_payloads_are_deleted_a_hundred_at_a_time(tmp_path: Path) -> Gen:
    # A group of outcomes deletes no payload until 100 sent ones wait: then the group that
    # reaches 100 deletes them all. Closing deletes what still waits.
    path = tmp_path / "spool.db"
    queue = yield SqliteQueue.open(path)
    payloads = "SELECT count(*) FROM payloads"
    try:
        yield queue.enqueue([envelope(n) for n in range(150)])
        claimed = yield queue.claim("a", 150, lease=30)
        yield defer.gatherResults([queue.record("a", sent_outcome(c)) for c in claimed[:60]])
        for c in claimed[60:99]:
            assert (yield queue.record("a", sent_outcome(c))) is True
        assert rows(path, payloads) == [(150,)]
        yield queue.record("a", sent_outcome(claimed[99]))
        assert rows(path, payloads) == [(50,)]
        assert rows(path, "SELECT min(message) FROM payloads") == [(claimed[100].id,)]
        yield queue.record("a", sent_outcome(claimed[100]))
    finally:
        yield queue.close()
    assert rows(path, payloads) == [(49,)]


@pytest_twisted.inlineCallbacks
def test_the_drains_outcome_rules_leave_the_right_states_in_the_file(tmp_path: Path) -> Gen:
    path = tmp_path / "spool.db"
    clock = stopped_clock()
    queue = yield SqliteQueue.open(path, clock=clock.seconds)
    try:
        yield queue.enqueue([envelope(1, "ok@example.org", "bad@example.org", "slow@example.org")])
        (claimed,) = yield queue.claim("a", 5, lease=30)
        result = replies(
            ("ok@example.org", 250, None, "ok"),
            ("bad@example.org", 550, "5.1.1", "no such user"),
            ("slow@example.org", 451, "4.2.1", "busy"),
        )
        outcome = settle(claimed, result, None, NO_JITTER)
        assert (outcome.state, outcome.retry_in, outcome.attempts) == ("deferred", 10, 1)
        assert (outcome.id, outcome.fence) == (claimed.id, claimed.fence)
        assert (yield queue.record("a", outcome)) is True
        assert rows(path, "SELECT address, state, code FROM recipients ORDER BY position") == [
            ("ok@example.org", "sent", 250),
            ("bad@example.org", "failed", 550),
            ("slow@example.org", "pending", 451),
        ]
        clock.advance(10)
        (later,) = yield queue.claim("b", 5, lease=30)
        # The last recipient goes through; the message still failed (bad@ was refused).
        accepted = replies(("slow@example.org", 250, None, "ok"))
        final = settle(later, accepted, None, NO_JITTER)
        assert (final.state, final.code) == ("failed", 550)
        assert final.response == "bad@example.org: no such user"
        assert (yield queue.record("b", final)) is True
        status = read_queue_status(path)
        assert status.counts["failed"] == 1
        (row,) = status.unsent
        assert row.recipients == (
            "ok@example.org sent, bad@example.org failed, slow@example.org sent"
        )
    finally:
        yield queue.close()


@pytest_twisted.inlineCallbacks
def test_a_file_that_is_not_a_spool_is_refused(tmp_path: Path) -> Gen:
    bogus = tmp_path / "bogus.db"
    bogus.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(QueueError, match="not a twistmail spool"):
        yield SqliteQueue.open(bogus)
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
    conn.commit()
    conn.close()
    with pytest.raises(QueueError, match="not a twistmail spool"):
        yield SqliteQueue.open(other)
    # Left as it was: no spool tables, and not switched to WAL.
    assert rows(other, "SELECT name FROM sqlite_master") == [
        ("meta",),
        ("sqlite_autoindex_meta_1",),
    ]
    assert rows(other, "PRAGMA journal_mode") == [("delete",)]
    with pytest.raises(QueueError, match="no such spool"):
        yield SqliteQueue.open(tmp_path / "missing.db", create=False)
    assert not (tmp_path / "missing.db").exists()
    with pytest.raises(QueueError, match="no such spool"):
        read_queue_status(tmp_path / "missing.db")
    # No refused opening leaves its writer thread behind.
    assert not [t for t in threading.enumerate() if "twistmail-queue" in t.name]


# The schema version 1 made by twistmail before fencing numbers, verbatim.
_SCHEMA_V1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE messages (
    id INTEGER PRIMARY KEY,
    sender TEXT NOT NULL,
    payload BLOB NOT NULL,
    size INTEGER NOT NULL,
    eight_bit INTEGER NOT NULL,
    smtputf8 INTEGER NOT NULL,
    message_id TEXT,
    state TEXT NOT NULL
        CHECK (state IN ('queued', 'sending', 'deferred', 'sent', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    due REAL NOT NULL,
    owner TEXT,
    lease_until REAL,
    code INTEGER,
    response TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX messages_due ON messages (due, id) WHERE state IN ('queued', 'deferred');
CREATE INDEX messages_lease ON messages (lease_until) WHERE state = 'sending';
CREATE TABLE recipients (
    message INTEGER NOT NULL REFERENCES messages (id),
    position INTEGER NOT NULL,
    address TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'sent', 'failed')),
    code INTEGER,
    response TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (message, position)
) WITHOUT ROWID;
INSERT INTO meta (key, value) VALUES ('kind', 'twistmail-spool'), ('schema_version', '1');
"""


def make_v1_spool(path: Path) -> None:
    """A version-1 spool holding a queued message and one held by a (dead) version-1 drain."""
    data = b"Subject: old\r\n\r\nfrom v1\r\n.\r\n"
    conn = sqlite3.connect(path)
    try:
        conn.executescript(_SCHEMA_V1)
        for mid, state, owner, lease in ((1, "queued", None, None), (2, "sending", "old", T0)):
            conn.execute(
                "INSERT INTO messages (id, sender, payload, size, eight_bit, smtputf8, "
                "message_id, state, due, owner, lease_until, created_at, updated_at) "
                "VALUES (?, 'old@example.com', ?, ?, 0, 0, ?, ?, ?, ?, ?, ?, ?)",
                (
                    mid,
                    data,
                    len(data) - 3,
                    f"<v1.{mid}@test>",
                    state,
                    T0 - 10,
                    owner,
                    lease,
                    T0 - 10,
                    T0 - 10,
                ),
            )
            conn.execute(
                "INSERT INTO recipients (message, position, address, state) "
                "VALUES (?, 0, ?, 'pending')",
                (mid, f"rcpt{mid}@example.org"),
            )
        conn.commit()
    finally:
        conn.close()


@pytest_twisted.inlineCallbacks
def test_a_version_1_spool_is_migrated_in_place_and_its_messages_claimed(tmp_path: Path) -> Gen:
    path = tmp_path / "v1.db"
    make_v1_spool(path)
    clock = stopped_clock()
    queue = yield SqliteQueue.open(path, create=False, clock=clock.seconds)
    try:
        assert rows(path, "SELECT value FROM meta WHERE key = 'schema_version'") == [
            (SCHEMA_VERSION,)
        ]
        assert SCHEMA_VERSION == "5"
        claimed = yield queue.claim("new", 10, lease=30)
        assert [(c.id, c.envelope.message_id, c.fence) for c in claimed] == [
            (1, "<v1.1@test>", 1),
            (2, "<v1.2@test>", 1),  # the old drain's lease (to T0) has expired
        ]
        assert [str(r) for r in claimed[1].envelope.recipients] == ["rcpt2@example.org"]
        assert claimed[0].envelope.payload == b"Subject: old\r\n\r\nfrom v1\r\n.\r\n"
        outcome = Outcome(
            id=2,
            fence=claimed[1].fence,
            state="sent",
            attempts=1,
            code=250,
            response="ok",
            recipients=((0, "sent", 250, "ok"),),
        )
        assert (yield queue.record("new", outcome)) is True
    finally:
        yield queue.close()
    # Opening it again finds the current version: nothing to migrate, nothing lost.
    again = yield SqliteQueue.open(path, create=False)
    try:
        assert (yield again.summary()).counts["sent"] == 1
    finally:
        yield again.close()


def make_v2_spool(path: Path) -> None:
    """A version-2 spool (version 1 plus fencing numbers) with a queued message, one held by a
    (dead) drain under fence 4, and a failed one with a recipient refused."""
    make_v1_spool(path)
    conn = sqlite3.connect(path)
    try:
        conn.execute("ALTER TABLE messages ADD COLUMN fence INTEGER NOT NULL DEFAULT 0")
        conn.execute("UPDATE messages SET fence = 4 WHERE id = 2")
        conn.execute(
            "INSERT INTO messages (id, sender, payload, size, eight_bit, smtputf8, message_id, "
            "state, attempts, due, code, response, created_at, updated_at) VALUES "
            "(3, 'old@example.com', x'2e0d0a', 0, 0, 0, '<v2.3@test>', 'failed', 1, ?, 550, "
            "'rcpt3@example.org: no such user', ?, ?)",
            (T0 - 10, T0 - 10, T0 - 10),
        )
        conn.execute(
            "INSERT INTO recipients VALUES (3, 0, 'rcpt3@example.org', 'failed', 550, "
            "'no such user')"
        )
        conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
        conn.commit()
    finally:
        conn.close()


def temporary_tables(path: Path, sql: str) -> list[str]:
    """The temporary b-trees SQLite's plan for ``sql`` (all parameters NULL) opens."""
    conn = sqlite3.connect(path)
    try:
        plan = conn.execute(f"EXPLAIN {sql}", [None] * sql.count("?")).fetchall()
    finally:
        conn.close()
    return [op for _, op, *_ in plan if op == "OpenEphemeral"]


OUTCOME_WRITES = (
    "UPDATE messages SET state = ?, owner = NULL WHERE id = ? AND fence = ?",
    "UPDATE recipients SET state = ?, code = ? WHERE message = ? AND position = ?",
)


@pytest_twisted.inlineCallbacks
def test_a_version_2_spool_is_migrated_in_place_its_payloads_apart_and_no_temporary_table(
    tmp_path: Path,
) -> Gen:
    path = tmp_path / "v2.db"
    make_v2_spool(path)
    # Version 2 checked states with IN lists: SQLite built a temporary table for every write.
    assert all(temporary_tables(path, sql) for sql in OUTCOME_WRITES)
    every_column = (
        "SELECT id, sender, size, eight_bit, smtputf8, message_id, state, attempts, due, owner, "
        "lease_until, fence, code, response, created_at, updated_at FROM messages ORDER BY id"
    )
    before = rows(path, every_column)
    payloads = rows(path, "SELECT id, payload FROM messages ORDER BY id")
    recipient_columns = "SELECT message, position, address, state, code, response FROM recipients"
    recipients_before = rows(path, f"{recipient_columns} ORDER BY message, position")
    clock = stopped_clock()
    queue = yield SqliteQueue.open(path, create=False, clock=clock.seconds)
    try:
        assert rows(path, "SELECT value FROM meta WHERE key = 'schema_version'") == [("5",)]
        assert rows(path, every_column) == before
        # Every payload moved to its own table (a sent message's, emptied before, is none).
        assert rows(path, "SELECT message, data FROM payloads ORDER BY message") == payloads
        assert "payload" not in [c for _, c, *_ in rows(path, "PRAGMA table_info(messages)")]
        assert rows(path, f"{recipient_columns} ORDER BY message, position") == (recipients_before)
        assert not any(temporary_tables(path, sql) for sql in OUTCOME_WRITES)
        claimed = yield queue.claim("new", 10, lease=30)
        # The dead drain's claim (fence 4) is taken over with a larger fence.
        assert [(c.id, c.fence) for c in claimed] == [(1, 1), (2, 5)]
        summary = yield queue.summary()
        assert summary.counts["failed"] == 1
    finally:
        yield queue.close()
    conn = sqlite3.connect(path)
    try:
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            conn.execute("UPDATE messages SET state = 'lost' WHERE id = 1")
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            conn.execute("UPDATE recipients SET state = 'lost' WHERE message = 1")
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        indexes = {
            name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")
        }
        assert {"messages_due", "messages_lease"} <= indexes
    finally:
        conn.close()


def make_v4_spool(path: Path) -> None:
    """A version-4 spool (today's tables but no ``recipients.enhanced``) with a queued
    message and a failed one, one of whose two recipients was refused."""
    make_v2_spool(path)
    _connect(str(path), create=False).close()  # migrated to the current version
    conn = sqlite3.connect(path)
    try:
        conn.execute("ALTER TABLE recipients DROP COLUMN enhanced")
        conn.execute("INSERT INTO recipients VALUES (3, 1, 'other@example.org', 'sent', 250, 'ok')")
        conn.execute("UPDATE meta SET value = '4' WHERE key = 'schema_version'")
        conn.commit()
    finally:
        conn.close()


@pytest_twisted.inlineCallbacks
def test_a_version_4_spool_gains_enhanced_codes_in_place_nothing_else_changed(
    tmp_path: Path,
) -> Gen:
    path = tmp_path / "v4.db"
    make_v4_spool(path)
    columns = "SELECT message, position, address, state, code, response FROM recipients"
    recipients_before = rows(path, f"{columns} ORDER BY message, position")
    messages_before = rows(path, "SELECT * FROM messages ORDER BY id")
    clock = stopped_clock()
    queue = yield SqliteQueue.open(path, create=False, clock=clock.seconds)
    try:
        assert rows(path, "SELECT value FROM meta WHERE key = 'schema_version'") == [("5",)]
        assert rows(path, f"{columns} ORDER BY message, position") == recipients_before
        assert rows(path, "SELECT * FROM messages ORDER BY id") == messages_before
        old = yield queue.message(3)
        assert [(r.address, r.code, r.enhanced, r.response) for r in old.recipients] == [
            ("rcpt3@example.org", 550, None, "no such user"),
            ("other@example.org", 250, None, "ok"),
        ]
        (claimed, *_) = yield queue.claim("new", 10, lease=30)
        outcome = Outcome(
            id=claimed.id,
            fence=claimed.fence,
            state="failed",
            attempts=1,
            code=550,
            response="no such user",
            recipients=((0, "failed", 550, "no such user"),),
            enhanced=("5.1.1",),
        )
        assert (yield queue.record("new", outcome)) is True
        shown = yield queue.message(claimed.id)
        assert [(r.code, r.enhanced) for r in shown.recipients] == [(550, "5.1.1")]
    finally:
        yield queue.close()
    assert rows(path, "PRAGMA integrity_check") == [("ok",)]


@pytest_twisted.inlineCallbacks
def test_a_new_spool_and_a_migrated_one_have_the_same_tables(tmp_path: Path) -> Gen:
    make_v2_spool(tmp_path / "old.db")
    for name in ("old.db", "new.db"):
        queue = yield SqliteQueue.open(tmp_path / name)
        yield queue.close()

    def shape(name: str) -> list[Any]:
        return [
            *(
                rows(tmp_path / name, "SELECT * FROM pragma_table_info(?)", table)
                for table in ("messages", "payloads", "recipients", "idempotency", "meta")
            ),
            rows(
                tmp_path / name,
                "SELECT name, tbl_name FROM sqlite_master WHERE type = 'index' ORDER BY name",
            ),
        ]

    assert shape("old.db") == shape("new.db")
    # The status page's last failures come from their index, not a scan of every message.
    plan = rows(
        tmp_path / "old.db",
        "EXPLAIN QUERY PLAN SELECT id FROM messages WHERE state = 'failed' "
        "ORDER BY updated_at DESC, id DESC LIMIT 10",
    )
    assert any("messages_failed" in str(step) for step in plan), plan


@pytest_twisted.inlineCallbacks
def test_a_spool_of_a_newer_version_is_refused_and_left_alone(tmp_path: Path) -> Gen:
    path = tmp_path / "future.db"
    queue = yield SqliteQueue.open(path)
    yield queue.close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(QueueError, match=r"schema version '99'.*upgrade twistmail"):
        yield SqliteQueue.open(path)
    assert rows(path, "SELECT value FROM meta WHERE key = 'schema_version'") == [("99",)]


# Outcome rules --------------------------------------------------------------------------------


def replies(*each: tuple[str, int, str | None, str]) -> TransactionResult:
    """The server's replies to one transaction: (recipient, code, enhanced, text) each."""
    return TransactionResult(
        [RecipientReply(parse_address(rcpt), code, enh, text) for rcpt, code, enh, text in each],
        250,
        None,
        "queued",
    )


def claimed_message(*recipients: str, attempts: int = 0) -> ClaimedMessage:
    env = envelope(1, *recipients)
    return ClaimedMessage(
        id=1,
        fence=3,
        envelope=env,
        positions=tuple(range(len(env.recipients))),
        attempts=attempts,
        refused_before=None,
    )


def test_a_drop_defers_every_recipient_until_attempts_run_out() -> None:
    claimed = claimed_message("a@example.org", "b@example.org")
    drop = ConnectionLostError("connection lost during DATA", host="127.0.0.1:25")
    first = settle(claimed, None, drop, NO_JITTER)
    assert (first.state, first.retry_in, first.code, first.fence) == ("deferred", 10, None, 3)
    assert "connection lost" in first.response
    assert [r[1] for r in first.recipients] == ["pending", "pending"]
    third = settle(claimed_message("a@example.org", attempts=2), None, drop, NO_JITTER)
    assert third.state == "failed"
    assert third.attempts == 3
    assert "gave up after 3 attempts" in third.response


def test_backoff_doubles_with_the_attempts() -> None:
    transient = TransientError("busy", code=421, response="busy")
    delays = [
        settle(claimed_message(attempts=n), None, transient, NO_JITTER).retry_in for n in range(2)
    ]
    assert delays == [10.0, 20.0]


def test_a_5xx_fails_at_once_and_names_the_recipient() -> None:
    refused = PermanentError("refused", code=554, response="5.7.1 spam")
    outcome = settle(claimed_message("a@example.org"), None, refused, NO_JITTER)
    assert (outcome.state, outcome.code, outcome.attempts) == ("failed", 554, 1)
    assert (outcome.retry_in, outcome.fence) == (0, 3)
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
    first = backend.queue
    yield backend.open()
    assert backend.queue is first is not None
    assert (yield backend.send_messages([message()])) == 1
    yield backend.close()
    assert backend.queue is None
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
    spool = yield SqliteQueue.open(path)
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


@pytest_twisted.inlineCallbacks
def test_a_drain_makes_one_attempt_per_message_even_when_the_retry_is_due_at_once(
    capture_server: Any, tmp_path: Path
) -> Gen:
    server = capture_server(rcpt_replies={"busy": (451, "4.2.1 try later")})
    path = tmp_path / "spool.db"
    queue = yield SqliteQueue.open(path)
    mailer = Mailer(f"smtp://127.0.0.1:{server.port}", concurrency=2, max_attempts=1)
    retry_at_once = RetryPolicy(max_attempts=5, initial_delay=0.0, jitter=0.0)
    try:
        yield queue.enqueue([envelope(i, "busy@example.org") for i in range(6)])
        report = yield Drain(queue, mailer, retry=retry_at_once, batch=2).run()
    finally:
        yield mailer.close()
        yield queue.close()
    assert (report.claimed, report.deferred, report.failed, report.sent) == (6, 6, 0, 0)
    # Due again at once, but left for the next pass: one attempt each, none of them held.
    assert rows(path, "SELECT DISTINCT state, attempts, owner FROM messages") == [
        ("deferred", 1, None)
    ]


@pytest_twisted.inlineCallbacks
def test_a_drain_pass_leaves_messages_enqueued_during_it_for_the_next_pass(
    capture_server: Any, tmp_path: Path
) -> Gen:
    path = tmp_path / "spool.db"
    queue = yield SqliteQueue.open(path)
    producing: list[defer.Deferred[Any]] = []

    def produce(_: Any) -> None:  # every delivery enqueues another message, 20 at most
        if len(producing) < 20:
            producing.append(queue.enqueue([envelope(100 + len(producing))]))

    server = capture_server(on_message=produce)
    mailer = Mailer(f"smtp://127.0.0.1:{server.port}", concurrency=1, max_attempts=1)
    try:
        yield queue.enqueue([envelope(i) for i in range(5)])
        report = yield Drain(queue, mailer, retry=NO_JITTER, batch=2).run()
        yield defer.gatherResults(producing)
    finally:
        yield mailer.close()
        yield queue.close()
    assert (report.claimed, report.sent, report.limit_reached) == (5, 5, False)
    assert len(server.messages) == 5
    assert len(producing) == 5
    assert rows(path, "SELECT state, count(*) FROM messages GROUP BY state ORDER BY state") == [
        ("queued", 5),
        ("sent", 5),
    ]


def test_one_name_per_idea_the_old_spool_names_are_gone() -> None:
    import twistmail.queue
    import twistmail.queue.records
    import twistmail.queue.sqlite
    import twistmail.testing
    from twistmail.queue.memory import MemoryQueue

    old = ("SqliteSpool", "SpoolError", "SpoolSummary", "SpoolRow", "read_spool_status")
    for module in (twistmail.queue, twistmail.queue.records, twistmail.queue.sqlite):
        assert not [name for name in old if hasattr(module, name)], module
    assert {"SqliteQueue", "QueueError", "QueueSummary", "QueueRow", "read_queue_status"} <= set(
        twistmail.queue.__all__
    )
    assert twistmail.testing.MemoryQueue is MemoryQueue
    assert "MemoryQueue" in twistmail.testing.__all__


@pytest_twisted.inlineCallbacks
def test_a_drain_may_open_the_queue_without_an_fsync_per_commit(tmp_path: Path) -> Gen:
    path = tmp_path / "spool.db"
    writer = yield SqliteQueue.open(path)
    drainer = yield SqliteQueue.open(path, create=False, synchronous="NORMAL")
    try:
        assert (yield writer.settings()) == ("wal", 2)  # enqueues: every commit fsync'd
        assert (yield drainer.settings()) == ("wal", 1)  # outcome records: NORMAL
        # ... and both checkpoint less often than SQLite's default: fewer stalls of the
        # commits a drain (its outcomes) and a relay's clients (their enqueues) wait for.
        for queue in (writer, drainer):
            checkpoints = yield queue._db.read(
                lambda conn: conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
            )
            assert checkpoints == CHECKPOINT_PAGES > 1000
    finally:
        yield drainer.close()
        yield writer.close()


class HangingSender:
    """A sender whose attempts reach no server until cancelled (then: untried)."""

    capacity = 4
    concurrency = 4

    def __init__(self) -> None:
        self.started: list[Any] = []

    def attempt(self, envelope: Envelope, notify: Any, context: Any, ready: Any = None) -> Any:
        sender = self

        class Handle:
            def release_body(self) -> None:
                pass

            def cancel(self) -> None:
                sender.started.remove(context)
                notify(context, None, ConnectionLostError("cancelled", attempted=False))

        self.started.append(context)
        return Handle()

    def abort(self) -> None:
        pass


class ClaimsHeld:
    """A memory queue whose claims are answered only when the test says so."""

    def __init__(self, queue: MemoryQueue) -> None:
        self.queue = queue
        self.claims: list[tuple[int, defer.Deferred[list[ClaimedMessage]]]] = []

    def claim(self, owner: str, limit: int, *, lease: float) -> defer.Deferred[Any]:
        d: defer.Deferred[list[ClaimedMessage]] = defer.Deferred()
        self.claims.append((limit, d))
        return d

    def answer(self, owner: str) -> None:
        limit, d = self.claims[-1]
        self.queue.claim(owner, limit, lease=30).chainDeferred(d)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.queue, name)


def test_a_drain_asks_for_its_next_claim_before_its_buffer_runs_out() -> None:
    clock = task.Clock()
    queue = MemoryQueue(clock=clock.seconds)
    queue.enqueue([envelope(i) for i in range(20)])
    held = ClaimsHeld(queue)
    sender = HangingSender()
    drain = Drain(held, sender, retry=NO_JITTER, batch=6, reactor=clock)  # type: ignore[arg-type]
    done = drain.run()
    assert [limit for limit, _ in held.claims] == [6]
    held.answer(drain.owner)
    # Four attempts started (the sender's capacity), none ended: half the batch is left,
    # and the next claim is already asked for (it used to wait for an empty buffer).
    assert len(sender.started) == 4
    assert [limit for limit, _ in held.claims] == [6, 6]
    drain.abort()
    held.answer(drain.owner)
    report = done.result if done.called else None
    assert report is not None
    assert report.released == 12
    assert report.sent == 0


_FILE_STATE = (
    "SELECT m.id, m.state, m.attempts, m.due, m.code, m.response, m.owner, m.lease_until, "
    "(SELECT length(data) FROM payloads WHERE message = m.id), "
    "(SELECT group_concat(position || ':' || r.state || ':' || ifnull(r.code, '') || ':' "
    "|| r.response || ':' || ifnull(r.enhanced, ''), ' ') FROM recipients r "
    "WHERE r.message = m.id) FROM messages m ORDER BY m.id"
)


@pytest.mark.parametrize("lost", [False, True], ids=["all-held", "one-claim-lost"])
@pytest.mark.parametrize("together", [False, True], ids=["one-by-one", "in-one-group"])
@pytest_twisted.inlineCallbacks
def test_outcomes_recorded_together_leave_the_file_as_recorded_one_by_one(
    tmp_path: Path, together: bool, lost: bool
) -> Gen:
    # Written together (one group: a few statements for all of them) or one commit each,
    # the same outcomes leave the same rows; an outcome whose claim was lost is refused alike
    # (and the others of its group are still written).
    path = tmp_path / "spool.db"
    clock = stopped_clock()
    queue = yield SqliteQueue.open(path, clock=clock.seconds)
    try:
        yield queue.enqueue(
            [envelope(n) for n in range(1, 5)]
            + [envelope(5, "ok@example.org", "bad@example.org", "slow@example.org")]
        )
        claimed = yield queue.claim("a", 10, lease=30)
        one, two, three, four, five = claimed

        def outcome(
            c: ClaimedMessage,
            state: Any,
            retry_in: float,
            code: int,
            text: str,
            recipients: Any,
            enhanced: Any = (),
            fence: int = 0,
        ) -> Outcome:
            return Outcome(
                id=c.id,
                fence=c.fence + fence,
                state=state,
                attempts=1,
                retry_in=retry_in,
                code=code,
                response=text,
                recipients=recipients,
                enhanced=enhanced,
            )

        outcomes = [
            outcome(one, "sent", 0, 250, "ok", ((0, "sent", 250, "ok"),), ("2.0.0",)),
            outcome(two, "deferred", 60, 451, "later", ((0, "pending", 451, "later"),)),
            outcome(three, "failed", 0, 550, "no", ((0, "failed", 550, "no"),), ("5.1.1",)),
            # With ``lost``, a claim lost meanwhile (another drain holds the next fence):
            outcome(four, "sent", 0, 250, "ok", ((0, "sent", 250, "ok"),), fence=int(lost)),
            outcome(
                five,
                "deferred",
                30,
                451,
                "partly",
                (
                    (0, "sent", 250, "ok"),
                    (1, "failed", 550, "no such user"),
                    (2, "pending", 451, "later"),
                ),
                ("2.0.0", "5.1.1", None),
            ),
        ]
        commits = queue.commits
        statements: list[str] = []
        yield queue._db.read(lambda conn: conn.set_trace_callback(statements.append))
        if together:
            kept = yield defer.gatherResults([queue.record("a", o) for o in outcomes])
            assert queue.commits - commits <= 2
        else:
            kept = []
            for o in outcomes:
                kept.append((yield queue.record("a", o)))
        yield queue._db.read(lambda conn: conn.set_trace_callback(None))
        assert kept == [True, True, True, not lost, True]
        four_size = len(four.envelope.payload)
        # Together and all held: one UPDATE a table for all five, where one by one takes 12
        # (each statement hands the GIL to the reactor thread and back). With a claim lost, the
        # group's UPDATE changes four rows, not five, and is undone: one by one then, four's
        # recipient left alone. (No payload is deleted yet: see the next test.)
        writes = [s for s in statements if s.lstrip().startswith(("UPDATE", "DELETE"))]
        one_by_one = 5 + 6 if lost else 5 + 7
        assert len(writes) == (2 if together and not lost else one_by_one + together)
        yield queue.close()  # deletes the sent payloads
        assert rows(path, _FILE_STATE) == [
            (one.id, "sent", 1, T0, 250, "ok", None, None, None, "0:sent:250:ok:2.0.0"),
            (
                two.id,
                "deferred",
                1,
                T0 + 60,
                451,
                "later",
                None,
                None,
                len(two.envelope.payload),
                "0:pending:451:later:",
            ),
            (
                three.id,
                "failed",
                1,
                T0,
                550,
                "no",
                None,
                None,
                len(three.envelope.payload),
                "0:failed:550:no:5.1.1",
            ),
            (
                (four.id, "sending", 0, T0, None, "", "a", T0 + 30, four_size, "0:pending:::")
                if lost
                else (four.id, "sent", 1, T0, 250, "ok", None, None, None, "0:sent:250:ok:")
            ),
            (
                five.id,
                "deferred",
                1,
                T0 + 30,
                451,
                "partly",
                None,
                None,
                len(five.envelope.payload),
                "0:sent:250:ok:2.0.0 1:failed:550:no such user:5.1.1 2:pending:451:later:",
            ),
        ]
    finally:
        yield queue.close()


@pytest_twisted.inlineCallbacks
def test_a_group_of_more_outcomes_than_a_statement_carries_is_written_in_chunks(
    tmp_path: Path,
) -> Gen:
    path = tmp_path / "spool.db"
    queue = yield SqliteQueue.open(path)
    try:
        yield queue.enqueue([envelope(n) for n in range(250)])
        claimed = yield queue.claim("a", 250, lease=30)
        assert len(claimed) == 250
        statements: list[str] = []
        yield queue._db.read(lambda conn: conn.set_trace_callback(statements.append))
        kept = yield defer.gatherResults(
            [
                queue.record(
                    "a",
                    Outcome(
                        id=c.id,
                        fence=c.fence,
                        state="sent",
                        attempts=1,
                        code=250,
                        response=f"ok {c.id}",
                        recipients=((0, "sent", 250, f"ok {c.id}"),),
                    ),
                )
                for c in claimed
            ]
        )
        yield queue._db.read(lambda conn: conn.set_trace_callback(None))
        assert kept == [True] * 250
        writes = [s for s in statements if s.lstrip().startswith(("UPDATE", "DELETE"))]
        # 120 + 120 + 10 outcomes: two UPDATEs each chunk; 250 sent payloads: three DELETEs.
        assert len(writes) == 9
        assert rows(
            path,
            "SELECT count(*), count(DISTINCT m.response), sum(m.response = r.response) "
            "FROM messages m JOIN recipients r ON r.message = m.id "
            "WHERE m.state = 'sent' AND r.state = 'sent' AND m.owner IS NULL",
        ) == [(250, 250, 250)]
        assert rows(path, "SELECT count(*) FROM payloads") == [(0,)]
    finally:
        yield queue.close()
