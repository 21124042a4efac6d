"""The SQLite queue (the spool file): messages waiting for delivery, kept durably in one file.

:class:`SqliteQueue` provides :class:`~twistmail.interfaces.IQueue`; the ``spool`` backend
enqueues into it and ``twistmail drain --spool PATH`` delivers from it.

Each message is stored as its SMTP envelope (sender, Message-ID, and the DATA payload ready for
the wire in a table of its own, so that changing a message's state rewrites a small row, not
its data) with one row per recipient, so a message some of whose recipients were accepted is
retried for the others only.

Message states: ``queued`` (never tried), ``sending`` (claimed by a worker, under a lease),
``deferred`` (a 4xx, drop or timeout; tried again from ``due``), ``sent`` (every recipient
accepted; the payload is then deleted, the row kept as a record) and ``failed`` (a recipient
refused permanently, or attempts ran out; kept with its reason, payload included, never
deleted). Recipient states: ``pending``, ``sent``, ``failed``.

Durability: WAL mode with ``synchronous=FULL``. Every commit appends to the ``-wal`` file and
fsyncs it before the Deferred of the write fires, so an enqueued message survives a power loss,
not just a killed process. WAL rather than a rollback journal because a WAL commit is one
sequential append and one fsync (a rollback journal with FULL needs several fsyncs per
commit), and because readers (``twistmail drain --status``, a second drain) never block the
writer.

Threading: every SQLite call of a :class:`SqliteQueue` runs on its own single writer thread
(:class:`~twistmail._sqlite.SqliteThread`), never on the reactor thread. Writes made while a
commit runs are committed together in the next transaction (group commit), so many concurrent
enqueues share one fsync. Reactor shutdown commits pending writes and closes a queue left open.

Claims: a worker takes messages with ``BEGIN IMMEDIATE`` and one ``UPDATE ... RETURNING`` that
sets ``state='sending'``, its ``owner`` token, a ``lease_until`` time and the next ``fence``
(fencing number), so two workers (in any processes) never hold the same message. A message
whose worker died keeps ``sending`` until its lease expires, then is claimed again: delivery is
at-least-once after a crash. An outcome is written only with the claim's owner and fence, so a
worker whose lease expired cannot overwrite what the worker that took over recorded.

Time: every time stored or compared (``due``, ``lease_until``) comes from the queue's clock
(``time.time`` unless another is given), read on the writer thread once per transaction.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any, Final, TypeVar, cast

from twisted.internet import defer
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from .. import _sqlite
from .._sqlite import SqliteThread
from .._twisted import Reactor, default_reactor
from ..address import Address, parse_address, parse_sender
from ..interfaces import IQueue
from ..message import Envelope
from ..suppression.records import SHOWN_STATE_SQL
from . import _sqlite_campaigns
from ._sqlite_status import (
    bounce_recipient,
    cancel_message,
    list_messages,
    one_message,
    overview,
    retry_message,
)
from .campaigns import CampaignRenderer
from .records import (
    MESSAGE_STATES,
    ClaimedMessage,
    Idempotent,
    MessageStatus,
    Outcome,
    QueueError,
    QueueOverview,
    QueueRow,
    QueueSummary,
    migrations_from,
)

__all__ = ["SqliteQueue", "read_queue_status"]


SCHEMA_VERSION: Final = "5"
"""2 added ``messages.fence``; 3 moved the payloads to their own table (a claim or an outcome
rewrote the whole ~4 KB page of each message it changed) and wrote the state checks as
comparisons (a ``CHECK (state IN (...))`` of five values made SQLite build a temporary table
on every write of a state); 4 added the ``idempotency`` keys; 5 added ``recipients.enhanced``
(the RFC 3463 enhanced status code of the last reply) and an index of the failed messages by
time (the status page's last failures). Older files are migrated in place when opened."""

CHECKPOINT_PAGES: Final = 10_000
"""WAL pages after which a connection to the queue checkpoints (SQLite's default: 1,000).

A drain waits for its outcome commits (the duplicate bound) and a relay's clients for their
enqueue's commit; the commit that checkpoints copies the WAL into the file and fsyncs both.
Fewer, larger checkpoints stall them less often and copy a page changed by many commits once
(the relay's HTTP door: p99 of the 202 from 54.8 to 46.9 ms, its longest wait from 73 to
60 ms, medians of 3 runs of ``scripts/bench --mode api``). The WAL may grow to ~40 MB."""

# secure_delete = FAST: a deleted payload (every sent message's) is zeroed only where that costs
# no extra write. Some builds (Debian's) default to ON, which zeroes each freed ~4 KB payload
# page and appends it to the WAL: 12.8 KB written per delivered message instead of 4.8 KB
# (claim + record of 20,000 messages: 60 -> 55 us CPU per message). Freed pages are reused by
# later enqueues; ``VACUUM`` rewrites the file without them.

_T = TypeVar("_T")
_Op = Callable[[sqlite3.Connection, float], Any]
Clock = Callable[[], float]


def _one_of(column: str, *values: str) -> str:
    """``CHECK`` text: ``column`` is one of ``values`` (as ``=`` tests, never an IN list)."""
    return " OR ".join(f"{column} = '{value}'" for value in values)


_MESSAGES = f"""
CREATE TABLE IF NOT EXISTS {{name}} (
    id INTEGER PRIMARY KEY,
    sender TEXT NOT NULL,
    size INTEGER NOT NULL,
    eight_bit INTEGER NOT NULL,
    smtputf8 INTEGER NOT NULL,
    message_id TEXT,
    state TEXT NOT NULL
        CHECK ({_one_of("state", "queued", "sending", "deferred", "sent", "failed")}),
    attempts INTEGER NOT NULL DEFAULT 0,
    due REAL NOT NULL,
    owner TEXT,
    lease_until REAL,
    fence INTEGER NOT NULL DEFAULT 0,
    code INTEGER,
    response TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
)"""
_MESSAGE_COLUMNS = (
    "id, sender, size, eight_bit, smtputf8, message_id, state, attempts, due, owner, "
    "lease_until, fence, code, response, created_at, updated_at"
)
# The DATA payload of each message not sent (a sent message's is deleted).
_PAYLOADS = """
CREATE TABLE IF NOT EXISTS payloads (
    message INTEGER PRIMARY KEY REFERENCES messages (id),
    data BLOB NOT NULL
)"""
_MESSAGE_INDEXES = (
    "CREATE INDEX IF NOT EXISTS messages_due ON messages (due, id) "
    "WHERE state IN ('queued', 'deferred')",
    "CREATE INDEX IF NOT EXISTS messages_lease ON messages (lease_until) WHERE state = 'sending'",
)
_RECIPIENTS = f"""
CREATE TABLE IF NOT EXISTS {{name}} (
    message INTEGER NOT NULL REFERENCES messages (id),
    position INTEGER NOT NULL,
    address TEXT NOT NULL,
    state TEXT NOT NULL CHECK ({_one_of("state", "pending", "sent", "failed")}),
    code INTEGER,
    response TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (message, position)
) WITHOUT ROWID"""
_RECIPIENT_COLUMNS = "message, position, address, state, code, response"
# Idempotency keys (the HTTP API's), each with the message it queued, kept >= their ``keep``.
_IDEMPOTENCY = """
CREATE TABLE IF NOT EXISTS idempotency (
    scope TEXT NOT NULL,
    key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    message INTEGER NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (scope, key)
) WITHOUT ROWID"""
_IDEMPOTENCY_INDEX = "CREATE INDEX IF NOT EXISTS idempotency_created ON idempotency (created_at)"

# The tables as schema 4 made them; a new file gets them, then the migrations from 4 on (which
# only add columns: so the migrations of older files, which rebuild tables with these
# statements, reach the same shape).
_BASE_VERSION: Final = "4"
_BASE_SCHEMA: Final[tuple[str, ...]] = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    _MESSAGES.format(name="messages"),
    *_MESSAGE_INDEXES,
    _PAYLOADS,
    _RECIPIENTS.format(name="recipients"),
    _IDEMPOTENCY,
    _IDEMPOTENCY_INDEX,
)


def _rebuilt(table: str, create: str, columns: str) -> tuple[str, ...]:
    """Statements copying ``table`` into a new one made by ``create`` under the same name
    (SQLite cannot change a table's CHECK constraints or drop a column in place)."""
    # Table and column names are this module's constants, never input.
    return (
        create.format(name=f"{table}_new"),
        f"INSERT INTO {table}_new ({columns}) SELECT {columns} FROM {table}",  # noqa: S608
        f"DROP TABLE {table}",  # and its indexes
        f"ALTER TABLE {table}_new RENAME TO {table}",
    )


# From each older schema version to the next, run in the opening transaction.
_MIGRATIONS: Final[dict[str, tuple[str, ...]]] = {
    "1": ("ALTER TABLE messages ADD COLUMN fence INTEGER NOT NULL DEFAULT 0",),
    "2": (
        _PAYLOADS,
        "INSERT INTO payloads (message, data) SELECT id, payload FROM messages "
        "WHERE state != 'sent'",
        *_rebuilt("messages", _MESSAGES, _MESSAGE_COLUMNS),
        *_MESSAGE_INDEXES,
        *_rebuilt("recipients", _RECIPIENTS, _RECIPIENT_COLUMNS),
    ),
    "3": (_IDEMPOTENCY, _IDEMPOTENCY_INDEX),
    # A nullable column is added without rewriting the table (no copy of a large spool).
    "4": (
        "ALTER TABLE recipients ADD COLUMN enhanced TEXT",
        "CREATE INDEX IF NOT EXISTS messages_failed ON messages (updated_at, id) "
        "WHERE state = 'failed'",
    ),
}

_SCHEMA: Final[tuple[str, ...]] = (
    *_BASE_SCHEMA,
    *migrations_from(_BASE_VERSION, SCHEMA_VERSION, _MIGRATIONS, QueueError),
)

_INSERT_MESSAGE = """
INSERT INTO messages (sender, size, eight_bit, smtputf8, message_id, state, due, created_at,
                      updated_at)
VALUES (?, ?, ?, ?, ?, 'queued', ?, ?, ?)
"""

# Each arm takes at most ``limit`` from its own index before the merge, so a claim reads about
# ``limit`` index entries however many messages wait (one ORDER BY over the whole UNION sorted
# every due message on every claim).
_CLAIM = """
UPDATE messages SET state = 'sending', owner = ?, lease_until = ?, fence = fence + 1,
    updated_at = ?
WHERE id IN (
    SELECT id FROM (
        SELECT * FROM (
            SELECT id, due FROM messages WHERE state IN ('queued', 'deferred') AND due <= ?
            ORDER BY due, id LIMIT ?
        )
        UNION ALL
        SELECT * FROM (
            SELECT id, due FROM messages WHERE state = 'sending' AND lease_until <= ?
            ORDER BY due, id LIMIT ?
        )
    ) ORDER BY due, id LIMIT ?
)
RETURNING id, fence, sender, (SELECT data FROM payloads WHERE message = messages.id), size,
    eight_bit, smtputf8, message_id, attempts,
    (SELECT group_concat(position || ' ' || address, char(10)) FROM recipients
     WHERE message = messages.id AND state = 'pending')
"""

# A recipient refused by an earlier attempt (only a message attempted before can have one).
_REFUSED_BEFORE = """
SELECT address, code, response FROM recipients WHERE message = ? AND state = 'failed'
ORDER BY position LIMIT 1
"""

_RECORD = """
UPDATE messages SET state = ?, attempts = ?, due = ?, code = ?, response = ?, owner = NULL,
    lease_until = NULL, updated_at = ?
WHERE id = ? AND owner = ? AND fence = ? AND state = 'sending'
"""

_RECORD_RECIPIENT = """
UPDATE recipients SET state = ?, code = ?, response = ?, enhanced = ?
WHERE message = ? AND position = ?
"""

# _RECORD and _RECORD_RECIPIENT for many outcomes: v.column1.. are a row's values in order.
_RECORD_ALL = """
UPDATE messages SET state = v.column1, attempts = v.column2, due = v.column3, code = v.column4,
    response = v.column5, owner = NULL, lease_until = NULL, updated_at = ?
FROM (VALUES {rows}) AS v
WHERE messages.id = v.column6 AND messages.owner = v.column7 AND messages.fence = v.column8
    AND messages.state = 'sending'
"""

_RECORD_ALL_RECIPIENTS = """
UPDATE recipients SET state = v.column1, code = v.column2, response = v.column3,
    enhanced = v.column4
FROM (VALUES {rows}) AS v
WHERE recipients.message = v.column5 AND recipients.position = v.column6
"""

_RELEASE = """
UPDATE messages SET state = CASE WHEN attempts = 0 THEN 'queued' ELSE 'deferred' END,
    owner = NULL, lease_until = NULL, updated_at = ?
WHERE id = ? AND owner = ? AND fence = ? AND state = 'sending'
"""

_TAKE_BACK = """
UPDATE messages SET state = CASE WHEN attempts = 0 THEN 'queued' ELSE 'deferred' END,
    owner = NULL, lease_until = NULL, updated_at = ?
WHERE state = 'sending' AND substr(owner, 1, ?) = ?
"""

_NEXT_DUE = """
SELECT min(at) FROM (
    SELECT min(due) AS at FROM messages WHERE state IN ('queued', 'deferred')
    UNION ALL
    SELECT min(lease_until) FROM messages WHERE state = 'sending'
)
"""


# Functions that run on the writer thread. -----------------------------------------------------


def _connect(
    path: str, create: bool, synchronous: _sqlite.Synchronous = "FULL"
) -> sqlite3.Connection:
    if not create and not os.path.isfile(path):
        raise QueueError(f"{path}: no such spool")
    return _sqlite.open_store(
        path,
        name="spool",
        check=lambda conn: _check_or_create_schema(conn, path),
        synchronous=synchronous,
        error=QueueError,
        pragmas=(f"wal_autocheckpoint = {CHECKPOINT_PAGES}", "secure_delete = FAST"),
    )


def _check_or_create_schema(conn: sqlite3.Connection, path: str) -> None:
    tables = {
        name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    }
    if not tables:
        for statement in _SCHEMA:  # not executescript(): it would COMMIT
            conn.execute(statement)
        conn.execute(
            "INSERT INTO meta (key, value) VALUES ('kind', 'twistmail-spool'), "
            "('schema_version', ?)",
            (SCHEMA_VERSION,),
        )
        _sqlite_campaigns.prepare(conn, path)
        return
    meta = dict(conn.execute("SELECT key, value FROM meta").fetchall()) if "meta" in tables else {}
    if meta.get("kind") != "twistmail-spool":
        raise QueueError(f"{path}: not a twistmail spool")
    for statement in migrations_from(
        meta.get("schema_version", ""),
        SCHEMA_VERSION,
        _MIGRATIONS,
        lambda version: QueueError(
            f"{path}: a twistmail spool of schema version {version!r}, which this twistmail "
            f"(schema {SCHEMA_VERSION}) cannot use; upgrade twistmail to use this file"
        ),
    ):
        conn.execute(statement)
    conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (SCHEMA_VERSION,))
    _sqlite_campaigns.prepare(conn, path)


# Payloads of sent messages are deleted this many at a time (see _run_group).
_DROP_AT: Final = 100


def _run_group(conn: sqlite3.Connection, ops: list[_Op], now: float, sent: list[int]) -> list[Any]:
    """Run every op in one write transaction at ``now``; roll back all of them on any error.

    Outcomes next to each other in the group are written together (:func:`_record_all`).
    The payloads of messages recorded as sent are not deleted with each group: their ids are
    added to ``sent`` and the payloads deleted once ``_DROP_AT`` of them are waiting, in the
    group that reaches that many (and by :func:`_drop_sent` when the queue closes). Most groups
    of a drain's outcomes then write a few pages, not also the ~10 their freed payloads touched,
    so their commits, which the drain's duplicate bound waits for, end sooner (8% less CPU on
    the store thread, 4% off the drain's wall time). A process killed meanwhile leaves up to
    ``_DROP_AT - 1`` sent payloads in the file, unused.
    """
    with _sqlite.transaction(conn):
        results = _run_ops(conn, ops, now)
        sent += (
            op.outcome.id
            for op, kept in zip(ops, results, strict=True)
            if kept is True and type(op) is _Record and op.outcome.state == "sent"
        )
        dropping = len(sent) >= _DROP_AT
        if dropping:
            _delete_payloads(conn, sent)
    if dropping:  # committed: those are gone
        sent.clear()
    return results


def _drop_sent(conn: sqlite3.Connection, sent: list[int]) -> None:
    """Delete the payloads still waiting in ``sent`` (see :func:`_run_group`)."""
    if sent:
        with _sqlite.transaction(conn):
            _delete_payloads(conn, sent)
        sent.clear()


def _delete_payloads(conn: sqlite3.Connection, messages: list[int]) -> None:
    """Delete the payloads of those of ``messages`` that are sent (no other: an id of a group
    rolled back after it was noted may be among them)."""
    for at in range(0, len(messages), _ROWS_A_STATEMENT):
        chunk = messages[at : at + _ROWS_A_STATEMENT]
        conn.execute(
            "DELETE FROM payloads WHERE message IN (SELECT id FROM messages "  # noqa: S608
            f"WHERE id IN ({','.join('?' * len(chunk))}) AND state = 'sent')",
            chunk,
        )


def _run_ops(conn: sqlite3.Connection, ops: list[_Op], now: float) -> list[Any]:
    """Each op's result, outcomes side by side written together (:func:`_record_all`)."""
    results: list[Any] = []
    start, count = 0, len(ops)
    while start < count:
        end = start
        while end < count and type(ops[end]) is _Record:
            end += 1
        if end - start > 1:
            results += _record_all(cast("list[_Record]", ops[start:end]), conn, now)
            start = end
        else:
            results.append(ops[start](conn, now))
            start += 1
    return results


def _insert(envelopes: Sequence[Envelope], conn: sqlite3.Connection, now: float) -> list[int]:
    ids = []
    for env in envelopes:
        cursor = conn.execute(
            _INSERT_MESSAGE,
            (
                str(env.sender),
                env.size,
                int(env.eight_bit),
                int(env.smtputf8),
                env.message_id,
                now,
                now,
                now,
            ),
        )
        message = cursor.lastrowid
        assert message is not None
        conn.execute("INSERT INTO payloads (message, data) VALUES (?, ?)", (message, env.payload))
        conn.executemany(
            "INSERT INTO recipients (message, position, address, state) VALUES (?, ?, ?, "
            "'pending')",
            [(message, i, str(rcpt)) for i, rcpt in enumerate(env.recipients)],
        )
        ids.append(message)
    return ids


def _insert_once(
    scope: str,
    key: str,
    fingerprint: str,
    envelope: Envelope,
    keep: float,
    conn: sqlite3.Connection,
    now: float,
) -> Idempotent:
    # Forget a few expired keys at each keyed enqueue (bounded work, no separate sweeper).
    conn.execute(
        "DELETE FROM idempotency WHERE (scope, key) IN (SELECT scope, key FROM idempotency "
        "WHERE created_at < ? ORDER BY created_at LIMIT 100)",
        (now - keep,),
    )
    conn.execute(
        "DELETE FROM idempotency WHERE scope = ? AND key = ? AND created_at < ?",
        (scope, key, now - keep),
    )
    row = conn.execute(
        "SELECT i.fingerprint, i.message, m.message_id FROM idempotency i "
        "LEFT JOIN messages m ON m.id = i.message WHERE i.scope = ? AND i.key = ?",
        (scope, key),
    ).fetchone()
    if row is not None:
        stored, message, message_id = row
        return Idempotent(message, message_id, "repeat" if stored == fingerprint else "conflict")
    (message,) = _insert([envelope], conn, now)
    conn.execute(
        "INSERT INTO idempotency (scope, key, fingerprint, message, created_at) "
        "VALUES (?, ?, ?, ?, ?)",
        (scope, key, fingerprint, message, now),
    )
    return Idempotent(message, envelope.message_id, "queued")


def _claim(
    owner: str, limit: int, lease: float, conn: sqlite3.Connection, now: float
) -> list[ClaimedMessage]:
    # max(0, ...): SQLite reads a negative LIMIT as no limit at all.
    limit = max(0, limit)
    rows = conn.execute(_CLAIM, (owner, now + lease, now, now, limit, now, limit, limit)).fetchall()
    rows.sort()  # by id
    senders: dict[str, Address] = {}
    claimed = []
    for row in rows:
        message, fence, sender, payload, size, eight_bit, smtputf8, mid, attempts, pending = row
        # Each pending recipient as "position address", one a line, in position order
        # (addresses hold no line break: they were parsed when enqueued).
        positions, addresses = _pending(pending or "")
        envelope_sender = senders.get(sender)
        if envelope_sender is None:
            envelope_sender = senders[sender] = parse_sender(sender, field="sender")
        refused = None
        if attempts:
            refused = conn.execute(_REFUSED_BEFORE, (message,)).fetchone()
        claimed.append(
            ClaimedMessage(
                id=message,
                fence=fence,
                envelope=Envelope(
                    envelope_sender,
                    addresses,
                    payload,
                    size,
                    bool(eight_bit),
                    bool(smtputf8),
                    mid,
                ),
                positions=positions,
                attempts=attempts,
                refused_before=refused,
            )
        )
    return claimed


def _pending(lines: str) -> tuple[tuple[int, ...], tuple[Address, ...]]:
    """The positions and addresses of ``"position address"`` lines, by position."""
    if "\n" not in lines and lines:  # one recipient: most messages
        position, address = lines.split(" ", 1)
        return (int(position),), (parse_address(address, field="recipients"),)
    pairs = [line.split(" ", 1) for line in lines.split("\n")] if lines else []
    if len(pairs) > 1:
        pairs.sort(key=lambda pair: int(pair[0]))
    return (
        tuple(int(position) for position, _ in pairs),
        tuple(parse_address(address, field="recipients") for _, address in pairs),
    )


def _record(owner: str, outcome: Outcome, conn: sqlite3.Connection, now: float) -> bool:
    o = outcome
    due = now + o.retry_in if o.state == "deferred" else now
    cursor = conn.execute(
        _RECORD, (o.state, o.attempts, due, o.code, o.response, now, o.id, owner, o.fence)
    )
    if cursor.rowcount != 1:
        return False  # the lease expired and another claim took the message over
    recipients = o.recipients
    if len(recipients) == 1:
        ((position, state, code, text),) = recipients
        conn.execute(_RECORD_RECIPIENT, (state, code, text, o.enhanced_at(0), o.id, position))
    else:
        conn.executemany(
            _RECORD_RECIPIENT,
            [
                (state, code, text, o.enhanced_at(i), o.id, position)
                for i, (position, state, code, text) in enumerate(recipients)
            ],
        )
    return True


class _Record:
    """The write of one attempt's outcome: an op :func:`_run_group` can tell from the others."""

    __slots__ = ("outcome", "owner")

    def __init__(self, owner: str, outcome: Outcome) -> None:
        self.owner = owner
        self.outcome = outcome

    def __call__(self, conn: sqlite3.Connection, now: float) -> bool:
        return _record(self.owner, self.outcome, conn, now)


# Rows a statement of _record_all carries (at most 8 values a row: under SQLite's oldest limit
# of 999 bound values).
_ROWS_A_STATEMENT: Final = 120


def _record_all(records: list[_Record], conn: sqlite3.Connection, now: float) -> list[bool]:
    """:func:`_record` of each of ``records``, as one statement a table for all of them.

    Each statement is a step of the SQLite thread, and each step hands the GIL back and forth
    with the reactor thread: three a message made the outcomes of a 20,000-message drain wait
    for the reactor about half of the time they took. When an owner lost a claim meanwhile (the
    rows updated are fewer than the outcomes), the statements are undone and the outcomes are
    written one by one instead, each with its own answer.
    """
    messages: list[Any] = []
    recipients: list[Any] = []
    for record in records:
        o = record.outcome
        due = now + o.retry_in if o.state == "deferred" else now
        messages.append((o.state, o.attempts, due, o.code, o.response, o.id, record.owner, o.fence))
        recipients += (
            (state, code, text, o.enhanced_at(i), o.id, position)
            for i, (position, state, code, text) in enumerate(o.recipients)
        )
    conn.execute("SAVEPOINT record_all")
    try:
        if _update_from_values(conn, _RECORD_ALL, messages, now) == len(records):
            _update_from_values(conn, _RECORD_ALL_RECIPIENTS, recipients)
            return [True] * len(records)
        conn.execute("ROLLBACK TO record_all")
    finally:
        conn.execute("RELEASE record_all")
    return [record(conn, now) for record in records]


def _update_from_values(
    conn: sqlite3.Connection, statement: str, rows: list[Any], *first: Any
) -> int:
    """Run ``statement`` (an ``UPDATE ... FROM (VALUES {rows}) AS v``) over ``rows``, a chunk
    at a time, each after the values ``first``; the rows it changed in all."""
    changed = 0
    width = len(rows[0]) if rows else 0
    for at in range(0, len(rows), _ROWS_A_STATEMENT):
        chunk = rows[at : at + _ROWS_A_STATEMENT]
        values = ",".join(["(" + ",".join("?" * width) + ")"] * len(chunk))
        params = [*first]
        for row in chunk:
            params += row
        changed += conn.execute(statement.format(rows=values), params).rowcount
    return changed


def _release(
    owner: str, claims: Sequence[tuple[int, int]], conn: sqlite3.Connection, now: float
) -> int:
    return sum(
        conn.execute(_RELEASE, (now, message, owner, fence)).rowcount for message, fence in claims
    )


def _take_back(prefix: str, conn: sqlite3.Connection, now: float) -> int:
    return conn.execute(_TAKE_BACK, (now, len(prefix), prefix)).rowcount


def _queued_at(conn: sqlite3.Connection, message: int) -> float | None:
    row = conn.execute("SELECT created_at FROM messages WHERE id = ?", (message,)).fetchone()
    return None if row is None else float(row[0])


def _oldest_waiting(conn: sqlite3.Connection) -> float | None:
    (at,) = conn.execute(
        "SELECT min(created_at) FROM messages WHERE state IN ('queued', 'deferred', 'sending')"
    ).fetchone()
    return None if at is None else float(at)


def _renew(owner: str, lease: float, conn: sqlite3.Connection, now: float) -> int:
    cursor = conn.execute(
        "UPDATE messages SET lease_until = ? WHERE owner = ? AND state = 'sending'",
        (now + lease, owner),
    )
    return cursor.rowcount


def _summary(conn: sqlite3.Connection, now: float) -> QueueSummary:
    counts = dict.fromkeys(MESSAGE_STATES, 0)
    counts.update(conn.execute("SELECT state, count(*) FROM messages GROUP BY state").fetchall())
    (due,) = conn.execute(
        "SELECT count(*) FROM messages WHERE state IN ('queued', 'deferred') AND due <= ?", (now,)
    ).fetchone()
    (expired,) = conn.execute(
        "SELECT count(*) FROM messages WHERE state = 'sending' AND lease_until <= ?", (now,)
    ).fetchone()
    return QueueSummary(counts, int(due), counts["sending"] - int(expired), int(expired))


def _next_due(conn: sqlite3.Connection, now: float) -> float | None:
    (at,) = conn.execute(_NEXT_DUE).fetchone()
    return None if at is None else max(0.0, float(at) - now)


def _unsent(conn: sqlite3.Connection, limit: int) -> list[QueueRow]:
    rows = conn.execute(
        "SELECT m.id, m.message_id, m.state, m.attempts, m.due, m.code, m.response, "  # noqa: S608
        f"group_concat(r.address || ' ' || {SHOWN_STATE_SQL}, ', ') FROM messages m "
        "JOIN recipients r ON r.message = m.id WHERE m.state != 'sent' "
        "GROUP BY m.id ORDER BY m.id LIMIT ?",
        (max(0, limit),),
    ).fetchall()
    return [QueueRow(*row) for row in rows]


def _at(clock: Clock, function: Callable[..., _T]) -> Callable[..., _T]:
    """``function(conn, *args)`` run as ``function(conn, clock(), *args)``, the clock read then."""

    def timed(conn: sqlite3.Connection, *args: Any) -> _T:
        return function(conn, clock(), *args)

    return timed


def read_queue_status(
    path: str | os.PathLike[str], *, limit: int = 20, clock: Clock = time.time
) -> QueueSummary:
    """Counts and the first ``limit`` unsent messages of a spool file, read synchronously.

    For ``twistmail drain --status`` outside a reactor; safe while workers are running. Leases
    and due times are compared with ``clock()``.

    :raises QueueError: if ``path`` does not exist or is not a spool.
    """
    name = os.fspath(path)
    conn = _connect(name, create=False)
    try:
        conn.execute("BEGIN")  # one snapshot
        summary = _summary(conn, clock())
        summary.unsent.extend(_unsent(conn, limit))
        conn.execute("COMMIT")
        return summary
    finally:
        conn.close()


# The reactor-side object. ---------------------------------------------------------------------


@implementer(IQueue)
class SqliteQueue(_sqlite_campaigns.Campaigns):
    """The queue in one SQLite file, used from the reactor thread (see :class:`IQueue`).

    Get one with :meth:`SqliteQueue.open`; finish with :meth:`close`. Times stored in the file
    (``due``, ``lease_until``) come from the queue's clock, so every process using one file
    should use the same clock (the default, wall-clock seconds).
    """

    def __init__(self, db: SqliteThread[_Op], clock: Clock) -> None:
        """Use :meth:`SqliteQueue.open`; this only wires an opened store thread."""
        self.path = db.path
        self._db = db
        self._clock = clock
        self._renderer = CampaignRenderer()

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        create: bool = True,
        clock: Clock = time.time,
        synchronous: _sqlite.Synchronous = "FULL",
        reactor: Reactor | None = None,
        close_at_shutdown: bool = True,
    ) -> defer.Deferred[SqliteQueue]:
        """Open the spool file at ``path``, creating it unless ``create`` is false.

        ``clock()`` gives the store's now in seconds (e.g. ``task.Clock().seconds`` in tests).
        ``synchronous`` is this connection's SQLite setting: ``"FULL"`` (every commit fsync'd:
        what an enqueue needs) or ``"NORMAL"`` (a commit survives a killed process but a power
        cut may lose the last ones: enough for a drain's outcome records, whose loss means a
        message is sent again, as with the campaign journal).
        ``close_at_shutdown=False`` leaves closing to the caller during reactor shutdown (a
        service that records outcomes while it stops).
        A version-1 file is migrated in place. Fails with :class:`QueueError` for a missing
        file (``create=False``), a file that is not a spool, or one of a newer version.
        """
        reactor = reactor if reactor is not None else default_reactor()
        name = os.fspath(path)
        d = SqliteThread.start(
            reactor, f"twistmail-queue {name}", _connect, name, create, synchronous
        )

        def opened(result: tuple[ThreadPool, sqlite3.Connection]) -> SqliteQueue:
            pool, conn = result

            sent: list[int] = []  # the thread's: see _run_group

            def commit(conn: sqlite3.Connection, ops: list[_Op]) -> list[Any]:
                return _run_group(conn, ops, clock(), sent)

            db = SqliteThread(
                name,
                conn,
                pool,
                reactor,
                commit=commit,
                closed=QueueError,
                before_close=lambda conn: _drop_sent(conn, sent),
                close_at_shutdown=close_at_shutdown,
            )
            return cls(db, clock)

        return d.addCallback(opened)

    # Writes (group commit) ------------------------------------------------------------------

    def enqueue(self, envelopes: Sequence[Envelope]) -> defer.Deferred[list[int]]:
        """Store ``envelopes`` as ``queued``, due now; fires with their ids once fsync'd."""
        batch = list(envelopes)
        return self._write(lambda conn, now: _insert(batch, conn, now))

    def enqueue_once(
        self, scope: str, key: str, fingerprint: str, envelope: Envelope, *, keep: float = 86400.0
    ) -> defer.Deferred[Idempotent]:
        """Store ``envelope`` unless ``key`` was used in ``scope`` (see IQueue); the key and
        the message are committed (fsync'd) in one transaction."""
        return self._write(
            lambda conn, now: _insert_once(scope, key, fingerprint, envelope, keep, conn, now)
        )

    def claim(
        self, owner: str, limit: int, *, lease: float
    ) -> defer.Deferred[list[ClaimedMessage]]:
        """Take up to ``limit`` due messages for ``owner`` for ``lease`` seconds (see IQueue)."""
        renderer = self._renderer
        return self._write(
            lambda conn, now: _sqlite_campaigns.render(
                _claim(owner, limit, lease, conn, now), conn, now, renderer
            )
        )

    def record(self, owner: str, outcome: Outcome) -> defer.Deferred[bool]:
        """Write an attempt's outcome unless ``owner`` lost the claim; False if it did."""
        return self._write(_Record(owner, outcome))

    def release(self, owner: str, claimed: Sequence[ClaimedMessage]) -> defer.Deferred[int]:
        """Give back claims not attempted (no attempt counted); fires with how many."""
        claims = [(c.id, c.fence) for c in claimed]
        return self._write(lambda conn, now: _release(owner, claims, conn, now))

    def renew(self, owner: str, lease: float) -> defer.Deferred[int]:
        """Extend every lease ``owner`` holds to ``lease`` seconds from now; fires with how many."""
        return self._write(lambda conn, now: _renew(owner, lease, conn, now))

    def retry(self, message: int) -> defer.Deferred[str]:
        """Put failed message ``message`` back in the queue (see IQueue)."""
        return self._write(lambda conn, now: retry_message(message, conn, now))

    def cancel(self, message: int, reason: str) -> defer.Deferred[str]:
        """Fail message ``message`` if it is queued or deferred (see IQueue)."""
        return self._write(lambda conn, now: cancel_message(message, reason, conn, now))

    def bounce(
        self,
        message: int,
        position: int,
        *,
        failed: bool,
        code: int | None,
        response: str,
        enhanced: str | None = None,
    ) -> defer.Deferred[str | None]:
        """A bounce for a delivered recipient (see IQueue)."""
        return self._write(
            lambda conn, now: bounce_recipient(
                message, position, failed, code, response, enhanced, conn, now
            )
        )

    def take_back(self, owner_prefix: str) -> defer.Deferred[int]:
        """Give back at once every claim of the owners whose token starts with
        ``owner_prefix`` (owners known to be dead), counting no attempt; fires with how many."""
        return self._write(lambda conn, now: _take_back(owner_prefix, conn, now))

    def _write(self, op: _Op) -> defer.Deferred[Any]:
        return self._db.submit(op)

    @property
    def commits(self) -> int:
        """Write transactions committed so far (one per group of writes)."""
        return self._db.commits

    # Reads ----------------------------------------------------------------------------------

    def next_due(self) -> defer.Deferred[float | None]:
        """Seconds until the earliest waiting message is due: 0.0 if now, None if none waits."""
        return self._db.read(_at(self._clock, _next_due))

    def summary(self) -> defer.Deferred[QueueSummary]:
        """Counts by state, and how many messages are due, held or with an expired lease."""
        return self._db.read(_at(self._clock, _summary))

    def unsent(self, limit: int = 20) -> defer.Deferred[list[QueueRow]]:
        """The first ``limit`` messages not sent, with their recipients' states."""
        return self._db.read(_unsent, limit)

    def message(self, message: int) -> defer.Deferred[MessageStatus | None]:
        """Message ``message`` with its recipients' states; None if there is none."""
        return self._db.read(one_message, message)

    def messages(
        self, state: str | None = None, *, after: int = 0, limit: int = 100
    ) -> defer.Deferred[list[MessageStatus]]:
        """Up to ``limit`` messages with an id above ``after`` (in ``state``), by id."""
        return self._db.read(list_messages, state, after, limit)

    def overview(self, failures: int = 10) -> defer.Deferred[QueueOverview]:
        """Counts, the oldest message not settled and the last ``failures`` failed ones."""
        return self._db.read(overview, failures)

    def queued_at(self, message: int) -> defer.Deferred[float | None]:
        """When message ``message`` was enqueued (the queue's clock); None if there is none."""
        return self._db.read(_queued_at, message)

    def oldest_waiting(self) -> defer.Deferred[float | None]:
        """When the oldest message not yet sent or failed was enqueued; None if none waits."""
        return self._db.read(_oldest_waiting)

    def settings(self) -> defer.Deferred[tuple[str, int]]:
        """``(journal_mode, synchronous)`` of this queue's own connection (2 is FULL)."""
        return self._db.settings()

    # Lifecycle ------------------------------------------------------------------------------

    def close(self) -> defer.Deferred[None]:
        """Commit what is pending, close the file and stop the thread; idempotent."""
        return self._db.close()
