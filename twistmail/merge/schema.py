"""The tables of a campaign journal, and the migration of journals written by earlier versions.

Version 3 keeps one row per recipient, under the id of its *key* (see :mod:`.identity`)
instead of its CSV row number, with a fingerprint of the cells each message was made from.
Versions 1 (row numbers) and 2 (row numbers, plus the ``duplicate`` state) are migrated in
place when a campaign opens them: each row takes the key of its address (``#N`` when it has
none, and for a row recorded as a duplicate), a second row sent to the same mailbox
(``--allow-duplicates``) takes ``key#2`` and so on, as the current version keys them. Their
fingerprints are unknown, so a row migrated as sent is never reported as changed.

Rows keep SQLite's own sequential rowid, in the order they were first seen, and their id in a
unique index: outcomes recorded in CSV order then touch few pages per commit, where rows
placed by a hashed key would dirty a page each. The state has no CHECK constraint (SQLite
evaluates an ``IN`` list for every write, which cost more than the rest of the insert); the
journal refuses an unknown state before writing.
"""

from __future__ import annotations

import sqlite3
from typing import Final, Literal, get_args

from twistmail.address import mailbox_key
from twistmail.errors import MessageError

from .identity import row_id

__all__ = [
    "ROW_COLUMNS",
    "ROW_STATES",
    "SCHEMA_VERSION",
    "UPSERT",
    "JournalRecord",
    "RowState",
    "create_tables",
    "migrate",
    "row_columns",
]

RowState = Literal["pending", "sent", "deferred", "failed", "invalid", "duplicate", "suppressed"]
ROW_STATES: Final[tuple[str, ...]] = get_args(RowState)
SCHEMA_VERSION: Final = "3"

_TABLES = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rows (
    id INTEGER NOT NULL,
    row INTEGER NOT NULL,
    email TEXT NOT NULL,
    state TEXT NOT NULL,
    code INTEGER,
    response TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    message_id TEXT,
    next_attempt_at REAL,
    updated_at REAL NOT NULL,
    fingerprint INTEGER,
    changed INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX IF NOT EXISTS rows_by_id ON rows (id)
"""

ROW_COLUMNS: Final = (
    "id, row, email, state, code, response, attempts, message_id, next_attempt_at, "
    "updated_at, fingerprint, changed"
)
_OLD_ROW_COLUMNS: Final = (
    "row, row, email, state, code, response, attempts, message_id, next_attempt_at, "
    "updated_at, NULL, 0"
)

UPSERT: Final = f"""
INSERT INTO rows ({ROW_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0)
ON CONFLICT (id) DO UPDATE SET
    row = excluded.row, email = excluded.email, state = excluded.state, code = excluded.code,
    response = excluded.response, attempts = excluded.attempts,
    message_id = excluded.message_id, next_attempt_at = excluded.next_attempt_at,
    updated_at = excluded.updated_at, fingerprint = excluded.fingerprint, changed = 0
"""  # noqa: S608 - constants only

JournalRecord = tuple[
    int, int, str, str, int | None, str, int, str | None, float | None, float, int | None
]
"""What :data:`UPSERT` takes: id, row, email, state, code, response, attempts, message_id,
next_attempt_at, updated_at, fingerprint."""


def row_columns(version: str) -> str:
    """The select list giving :data:`ROW_COLUMNS` from a journal of schema ``version``."""
    return ROW_COLUMNS if version == SCHEMA_VERSION else _OLD_ROW_COLUMNS


def create_tables(conn: sqlite3.Connection) -> None:
    """Create the current tables (inside the caller's transaction)."""
    # Not executescript(): it would COMMIT the caller's BEGIN IMMEDIATE.
    for statement in _TABLES.split(";"):
        if statement.strip():
            conn.execute(statement)


def _key_of(email: str) -> str | None:
    try:
        return mailbox_key(email) or None
    except MessageError:
        return None


def migrate(conn: sqlite3.Connection, version: str) -> None:
    """Bring a journal of schema ``version`` to the current one, inside the caller's
    transaction; nothing to do for the current version."""
    if version == SCHEMA_VERSION:
        return
    conn.execute("ALTER TABLE rows RENAME TO rows_old")
    create_tables(conn)
    conn.create_function("twistmail_key", 1, _key_of, deterministic=True)
    conn.create_function("twistmail_id", 1, row_id, deterministic=True)
    # The n-th row (by row number) of a mailbox: the first keeps the bare key.
    conn.execute(
        f"""
        INSERT INTO rows ({ROW_COLUMNS})
        SELECT twistmail_id(CASE
                   WHEN mailbox IS NULL OR (state = 'duplicate' AND nth > 1) THEN '#' || row
                   WHEN nth = 1 THEN mailbox
                   ELSE mailbox || '#' || nth
               END),
               row, email, state, code, response, attempts, message_id, next_attempt_at,
               updated_at, NULL, 0
        FROM (
            SELECT *, row_number() OVER (PARTITION BY mailbox ORDER BY row) AS nth
            FROM (SELECT *, twistmail_key(email) AS mailbox FROM rows_old)
        )
        """  # noqa: S608 - constants only
    )
    conn.execute("DROP TABLE rows_old")
    conn.execute("DELETE FROM meta WHERE key = 'csv_sha256'")
    conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (SCHEMA_VERSION,))
