"""The PostgreSQL queue's keyed enqueue and its look-ups and changes for the relay's API: one
message or a page of them with their recipients, a failed message put back, a waiting one
cancelled (see ``IQueue``).

Functions of an open connection inside one transaction, run on the queue's threads by
:class:`~twistmail.queue.postgres.PostgresQueue` as ``op(conn, now, again)`` ops (``again``:
an earlier try failed with the connection, so its commit may have happened).
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from ..message import Envelope
from ._postgres_db import _insert, _timed
from .records import (
    MESSAGE_STATES,
    Idempotent,
    MessageStatus,
    QueueOverview,
    RecipientStatus,
    message_status,
)

if TYPE_CHECKING:
    import psycopg

__all__ = [
    "bounce_recipient",
    "cancel_message",
    "insert_once",
    "list_messages",
    "one_message",
    "overview",
    "retry_message",
]


_STATUS = (
    "SELECT id, message_id, sender, state, attempts, created_at, updated_at, due, code, "
    "response FROM messages"
)

# A few expired keys forgotten at each keyed enqueue (bounded work, no separate sweeper).
_FORGET_KEYS = _timed("""
DELETE FROM idempotency WHERE (scope, key) IN (
    SELECT scope, key FROM idempotency WHERE created_at < $NOW - %(keep)s
    ORDER BY created_at LIMIT 100 FOR UPDATE SKIP LOCKED
)
""")

_FORGET_KEY = _timed(
    "DELETE FROM idempotency WHERE scope = %(scope)s AND key = %(key)s "
    "AND created_at < $NOW - %(keep)s"
)

_ADD_KEY = _timed(
    "INSERT INTO idempotency (scope, key, fingerprint, message, created_at) "
    "VALUES (%(scope)s, %(key)s, %(fingerprint)s, %(message)s, $NOW)"
)

_RETRY = _timed("""
UPDATE messages SET state = 'queued', attempts = 0, due = $NOW, code = NULL, response = '',
    claim = %(token)s, updated_at = $NOW
WHERE id = %(id)s AND state = 'failed'
""")

_CANCEL = _timed("""
UPDATE messages SET state = 'failed', code = NULL, response = %(reason)s, claim = %(token)s,
    updated_at = $NOW
WHERE id = %(id)s AND state IN ('queued', 'deferred')
""")


_TOUCH = _timed("UPDATE messages SET updated_at = $NOW WHERE id = %(id)s")


def _statuses(
    conn: psycopg.Connection[Any], where: str, args: dict[str, Any]
) -> list[MessageStatus]:
    rows = conn.execute(f"{_STATUS} {where}", args).fetchall()
    if not rows:
        return []
    recipients: dict[int, list[RecipientStatus]] = {row[0]: [] for row in rows}
    for message, address, state, code, response, enhanced in conn.execute(
        "SELECT message, address, state, code, response, enhanced FROM recipients "
        "WHERE message = ANY(%s) ORDER BY message, position",
        (list(recipients),),
    ):
        recipients[message].append(RecipientStatus(address, state, code, response, enhanced))
    return [message_status(row, recipients[row[0]]) for row in rows]


def one_message(
    message: int, conn: psycopg.Connection[Any], now: float | None, again: bool
) -> MessageStatus | None:
    found = _statuses(conn, "WHERE id = %(id)s", {"id": message})
    return found[0] if found else None


def list_messages(
    state: str | None,
    after: int,
    limit: int,
    conn: psycopg.Connection[Any],
    now: float | None,
    again: bool,
) -> list[MessageStatus]:
    args = {"state": state, "after": after, "limit": max(0, limit)}
    if state is None:
        return _statuses(conn, "WHERE id > %(after)s ORDER BY id LIMIT %(limit)s", args)
    return _statuses(
        conn, "WHERE state = %(state)s AND id > %(after)s ORDER BY id LIMIT %(limit)s", args
    )


def overview(
    failures: int, conn: psycopg.Connection[Any], now: float | None, again: bool
) -> QueueOverview:
    counts = dict.fromkeys(MESSAGE_STATES, 0)
    counts.update(conn.execute("SELECT state, count(*) FROM messages GROUP BY state").fetchall())
    oldest = _statuses(
        conn,
        "WHERE id = (SELECT id FROM messages WHERE state IN ('queued', 'deferred', 'sending') "
        "ORDER BY created_at, id LIMIT 1)",
        {},
    )
    failed = _statuses(
        conn,
        "WHERE state = 'failed' ORDER BY updated_at DESC, id DESC LIMIT %(limit)s",
        {"limit": max(0, failures)},
    )
    return QueueOverview(counts, oldest[0] if oldest else None, failed)


def insert_once(
    scope: str,
    key: str,
    fingerprint: str,
    envelope: Envelope,
    keep: float,
    token: uuid.UUID,
    notify: str,
    conn: psycopg.Connection[Any],
    now: float | None,
    again: bool,
) -> Idempotent:
    if again:  # the first try may have committed the message and its key: its batch says
        row = conn.execute(
            "SELECT id, message_id FROM messages WHERE batch = %s", (token,)
        ).fetchone()
        if row is not None:
            return Idempotent(row[0], row[1], "queued")
    args = {"scope": scope, "key": key, "fingerprint": fingerprint, "keep": keep, "now": now}
    # Two requests with one key wait for each other here: the second sees the first's key.
    conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (f"{scope}\x1f{key}",))
    conn.execute(_FORGET_KEYS, args)
    conn.execute(_FORGET_KEY, args)
    found = conn.execute(
        "SELECT i.fingerprint, i.message, m.message_id FROM idempotency i "
        "LEFT JOIN messages m ON m.id = i.message "
        "WHERE i.scope = %(scope)s AND i.key = %(key)s",
        args,
    ).fetchone()
    if found is not None:
        stored, message, message_id = found
        return Idempotent(message, message_id, "repeat" if stored == fingerprint else "conflict")
    (message,) = _insert([envelope], token, notify, conn, now, again=False)
    conn.execute(_ADD_KEY, {**args, "message": message})
    return Idempotent(message, envelope.message_id, "queued")


def _state_of(conn: psycopg.Connection[Any], message: int, token: uuid.UUID) -> tuple[str, bool]:
    """The state of ``message`` ("missing" if none), and whether the op of ``token`` set it."""
    row = conn.execute("SELECT state, claim FROM messages WHERE id = %s", (message,)).fetchone()
    return ("missing", False) if row is None else (str(row[0]), row[1] == token)


def retry_message(
    message: int,
    token: uuid.UUID,
    notify: str,
    conn: psycopg.Connection[Any],
    now: float | None,
    again: bool,
) -> str:
    changed = conn.execute(_RETRY, {"id": message, "token": token, "now": now}).rowcount
    if not changed:
        state, ours = _state_of(conn, message, token)
        # A first try whose commit's answer was lost left the message queued under our token.
        return "retried" if again and ours and state == "queued" else state
    conn.execute(
        "UPDATE recipients SET state = 'pending', code = NULL, response = '', enhanced = NULL "
        "WHERE message = %s AND state = 'failed'",
        (message,),
    )
    conn.execute("SELECT pg_notify(%s, '')", (notify,))
    return "retried"


def cancel_message(
    message: int,
    reason: str,
    token: uuid.UUID,
    conn: psycopg.Connection[Any],
    now: float | None,
    again: bool,
) -> str:
    changed = conn.execute(
        _CANCEL, {"id": message, "reason": reason, "token": token, "now": now}
    ).rowcount
    if not changed:
        state, ours = _state_of(conn, message, token)
        return "cancelled" if again and ours and state == "failed" else state
    conn.execute(
        "UPDATE recipients SET state = 'failed', code = NULL, response = %s, enhanced = NULL "
        "WHERE message = %s AND state = 'pending'",
        (reason, message),
    )
    return "cancelled"


def bounce_recipient(
    message: int,
    position: int,
    failed: bool,
    code: int | None,
    response: str,
    enhanced: str | None,
    conn: psycopg.Connection[Any],
    now: float | None,
) -> str | None:
    """As the SQLite queue's (see IQueue.bounce); the recipient's address, None if there is
    none. Running it again changes nothing more."""
    row = conn.execute(
        "SELECT address, state FROM recipients WHERE message = %s AND position = %s FOR UPDATE",
        (message, position),
    ).fetchone()
    if row is None:
        return None
    address, state = row
    if state == "sent":
        if failed:
            conn.execute(
                "UPDATE recipients SET state = 'failed', code = %s, response = %s, "
                "enhanced = %s WHERE message = %s AND position = %s",
                (code, response, enhanced, message, position),
            )
        else:
            conn.execute(
                "UPDATE recipients SET response = %s WHERE message = %s AND position = %s",
                (response, message, position),
            )
        conn.execute(_TOUCH, {"id": message, "now": now})
    return str(address)
