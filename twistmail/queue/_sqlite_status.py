"""The SQLite queue's look-ups and changes for the relay's API: one message or a page of them
with their recipients, a failed message put back, a waiting one cancelled (see ``IQueue``).

Functions of an open connection, run on the queue's store thread by
:class:`~twistmail.queue.sqlite.SqliteQueue` (the changes inside its group-commit transaction).
"""

from __future__ import annotations

import sqlite3
from typing import Any

from .records import (
    MESSAGE_STATES,
    MessageStatus,
    QueueOverview,
    RecipientStatus,
    message_status,
)

__all__ = [
    "bounce_recipient",
    "cancel_message",
    "list_messages",
    "one_message",
    "overview",
    "retry_message",
]


_STATUS = (
    "SELECT id, message_id, sender, state, attempts, created_at, updated_at, due, code, "
    "response FROM messages"
)


def _statuses(conn: sqlite3.Connection, where: str, args: tuple[Any, ...]) -> list[MessageStatus]:
    rows = conn.execute(f"{_STATUS} {where}", args).fetchall()
    if not rows:
        return []
    ids = [row[0] for row in rows]
    recipients: dict[int, list[RecipientStatus]] = {i: [] for i in ids}
    marks = ",".join("?" * len(ids))
    for message, address, state, code, response, enhanced in conn.execute(
        f"SELECT message, address, state, code, response, enhanced FROM recipients "  # noqa: S608
        f"WHERE message IN ({marks}) ORDER BY message, position",
        ids,
    ):
        recipients[message].append(RecipientStatus(address, state, code, response, enhanced))
    return [message_status(row, recipients[row[0]]) for row in rows]


def one_message(conn: sqlite3.Connection, message: int) -> MessageStatus | None:
    found = _statuses(conn, "WHERE id = ?", (message,))
    return found[0] if found else None


def list_messages(
    conn: sqlite3.Connection, state: str | None, after: int, limit: int
) -> list[MessageStatus]:
    if state is None:
        return _statuses(conn, "WHERE id > ? ORDER BY id LIMIT ?", (after, max(0, limit)))
    return _statuses(
        conn, "WHERE state = ? AND id > ? ORDER BY id LIMIT ?", (state, after, max(0, limit))
    )


def overview(conn: sqlite3.Connection, failures: int) -> QueueOverview:
    counts = dict.fromkeys(MESSAGE_STATES, 0)
    counts.update(conn.execute("SELECT state, count(*) FROM messages GROUP BY state").fetchall())
    oldest = _statuses(
        conn,
        "WHERE id = (SELECT id FROM messages WHERE state IN ('queued', 'deferred', 'sending') "
        "ORDER BY created_at, id LIMIT 1)",
        (),
    )
    # The messages_failed index: the newest failures without reading the others.
    failed = _statuses(
        conn,
        "WHERE state = 'failed' ORDER BY updated_at DESC, id DESC LIMIT ?",
        (max(0, failures),),
    )
    return QueueOverview(counts, oldest[0] if oldest else None, failed)


def _state_of(conn: sqlite3.Connection, message: int) -> str:
    row = conn.execute("SELECT state FROM messages WHERE id = ?", (message,)).fetchone()
    return "missing" if row is None else str(row[0])


def retry_message(message: int, conn: sqlite3.Connection, now: float) -> str:
    state = _state_of(conn, message)
    if state != "failed":
        return state
    conn.execute(
        "UPDATE messages SET state = 'queued', attempts = 0, due = ?, code = NULL, "
        "response = '', updated_at = ? WHERE id = ?",
        (now, now, message),
    )
    conn.execute(
        "UPDATE recipients SET state = 'pending', code = NULL, response = '', enhanced = NULL "
        "WHERE message = ? AND state = 'failed'",
        (message,),
    )
    return "retried"


def cancel_message(message: int, reason: str, conn: sqlite3.Connection, now: float) -> str:
    state = _state_of(conn, message)
    if state not in ("queued", "deferred"):
        return state
    conn.execute(
        "UPDATE messages SET state = 'failed', code = NULL, response = ?, updated_at = ? "
        "WHERE id = ?",
        (reason, now, message),
    )
    conn.execute(
        "UPDATE recipients SET state = 'failed', code = NULL, response = ?, enhanced = NULL "
        "WHERE message = ? AND state = 'pending'",
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
    conn: sqlite3.Connection,
    now: float,
) -> str | None:
    """A bounce for recipient ``position`` of ``message`` (see IQueue.bounce); its address,
    or None if there is no such recipient."""
    row = conn.execute(
        "SELECT address, state FROM recipients WHERE message = ? AND position = ?",
        (message, position),
    ).fetchone()
    if row is None:
        return None
    address, state = row
    if state == "sent":
        if failed:
            conn.execute(
                "UPDATE recipients SET state = 'failed', code = ?, response = ?, enhanced = ? "
                "WHERE message = ? AND position = ?",
                (code, response, enhanced, message, position),
            )
        else:
            conn.execute(
                "UPDATE recipients SET response = ? WHERE message = ? AND position = ?",
                (response, message, position),
            )
        conn.execute("UPDATE messages SET updated_at = ? WHERE id = ?", (now, message))
    return str(address)
