"""The durable journal of a ``twistmail send`` campaign: one SQLite row per CSV data row.

The journal records the outcome of every recipient message so an interrupted campaign resumes
where it stopped and sends nobody twice (beyond the messages in flight at the moment of a crash).

Durability: the file is in WAL mode with ``synchronous=NORMAL``. A committed transaction has been
written (``write()``) to the ``-wal`` file before :meth:`Journal.record`'s Deferred fires, so it
is in the operating system's page cache and survives the process being killed, even by SIGKILL.
Only an operating-system crash or power loss can drop the last few commits (never corrupting the
file); ``synchronous=FULL`` would cover that at the cost of one fsync per commit.

Threading: SQLite calls block, so every call on the campaign's connection runs on one dedicated
writer thread (:class:`~twistmail._sqlite.SqliteThread`), never on the reactor thread. Work on
that thread runs in submission order, so writes serialize and reads see every commit made before
them. Writes use group commit: records queued while a commit runs all go into the next single
transaction, and at most one commit is in flight. Reactor shutdown commits what was recorded and
closes a journal left open.

:func:`read_status` is the synchronous reader for ``twistmail status JOURNAL``, outside a reactor.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import sqlite3
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final, Literal, get_args

from twisted.internet import defer
from twisted.python.threadpool import ThreadPool

from .. import _sqlite
from .._sqlite import SqliteThread
from .._twisted import Reactor, default_reactor
from ..address import mailbox_key
from ..errors import CampaignChangedError, JournalError, MessageError
from .keyset import KeySet

__all__ = [
    "CampaignChangedError",
    "Journal",
    "JournalError",
    "JournalRow",
    "RowState",
    "StatusSummary",
    "is_set",
    "read_status",
]

RowState = Literal["pending", "sent", "deferred", "failed", "invalid", "duplicate"]
ROW_STATES: Final[tuple[str, ...]] = get_args(RowState)
# Version 2 adds the "duplicate" state; a version-1 journal is migrated when opened.
SCHEMA_VERSION: Final = "2"

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rows (
    row INTEGER PRIMARY KEY,
    email TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ({", ".join(repr(s) for s in ROW_STATES)})),
    code INTEGER,
    response TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    message_id TEXT,
    next_attempt_at REAL,
    updated_at REAL NOT NULL
);
"""

_UPSERT = """
INSERT INTO rows (row, email, state, code, response, attempts, message_id, next_attempt_at,
                  updated_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (row) DO UPDATE SET
    email = excluded.email, state = excluded.state, code = excluded.code,
    response = excluded.response, attempts = excluded.attempts,
    message_id = excluded.message_id, next_attempt_at = excluded.next_attempt_at,
    updated_at = excluded.updated_at
"""

_ROW_COLUMNS = (
    "row, email, state, code, response, attempts, message_id, next_attempt_at, updated_at"
)

_Record = tuple[int, str, str, int | None, str, int, str | None, float | None, float]


@dataclass(frozen=True, slots=True)
class JournalRow:
    """One journal row: the latest known fate of one CSV data row (``row`` is 1-based)."""

    row: int
    email: str
    state: RowState
    code: int | None
    response: str
    attempts: int
    message_id: str | None
    next_attempt_at: float | None
    updated_at: float


@dataclass(frozen=True, slots=True)
class StatusSummary:
    """What ``twistmail status`` shows: counts by state and the first rows not yet sent."""

    path: str
    campaign_id: str
    csv_fingerprint: str
    template_fingerprint: str
    created_at: float
    counts: dict[str, int]
    unsent: list[JournalRow] = field(default_factory=list)

    @property
    def total(self) -> int:
        """Number of rows in the journal."""
        return sum(self.counts.values())


def is_set(bitmap: bytes | bytearray, row: int) -> bool:
    """Whether bit ``row`` is set in a bitmap from :meth:`Journal.settled_rows`."""
    index = row >> 3
    return index < len(bitmap) and bool(bitmap[index] & (1 << (row & 7)))


def _set_bit(bitmap: bytearray, row: int) -> None:
    index = row >> 3
    if index >= len(bitmap):
        bitmap.extend(bytes(index + 1 - len(bitmap)))
    bitmap[index] |= 1 << (row & 7)


# Functions that run on the writer thread (or, for read_status, in the caller's thread). -----


def _connect(path: str) -> sqlite3.Connection:
    conn = _sqlite.connect(path, busy_timeout=5)
    try:
        _sqlite.configure(conn, "NORMAL", lambda text: JournalError(f"{path}: {text}"))
    except BaseException:
        conn.close()
        raise
    return conn


def _lock(path: str) -> int | None:
    """Hold an exclusive ``flock`` on the journal, so two campaigns cannot share one journal.

    ``flock`` locks are separate from the POSIX record locks SQLite takes, so they do not
    interfere; the descriptor is closed only after the SQLite connection (closing a descriptor
    drops the process's record locks on the file). Returns ``None`` where ``flock`` is absent.
    """
    if sys.platform == "win32":  # pragma: no cover - no flock
        return None
    import fcntl

    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise JournalError(
            f"{path}: in use by another twistmail run; wait for it to finish"
        ) from None
    return fd


def _close(conn: sqlite3.Connection, lock_fd: int | None) -> None:
    conn.close()
    if lock_fd is not None:
        os.close(lock_fd)


def _unlock(lock_fd: int | None) -> Callable[[], None] | None:
    return None if lock_fd is None else lambda: os.close(lock_fd)


def _read_meta(conn: sqlite3.Connection, path: str) -> dict[str, str]:
    try:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    except sqlite3.DatabaseError as e:
        raise JournalError(f"{path}: not a twistmail journal ({e})") from e
    version = meta.get("schema_version")
    if version not in ("1", SCHEMA_VERSION) or "campaign_id" not in meta:
        if version is not None and version.isdigit() and int(version) > int(SCHEMA_VERSION):
            raise JournalError(
                f"{path}: a journal of a newer twistmail (schema {version}); upgrade twistmail"
            )
        raise JournalError(f"{path}: not a twistmail journal, or one of another version")
    return meta


def _migrate(conn: sqlite3.Connection, meta: dict[str, str]) -> None:
    """Bring a version-1 journal to the current schema, inside the opening transaction."""
    if meta.get("schema_version") != "1":
        return
    # Version 2 allows one more state; SQLite cannot change a CHECK, so the table is rebuilt.
    conn.execute("ALTER TABLE rows RENAME TO rows_v1")
    for statement in _SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)
    conn.execute(f"INSERT INTO rows ({_ROW_COLUMNS}) SELECT {_ROW_COLUMNS} FROM rows_v1")  # noqa: S608
    conn.execute("DROP TABLE rows_v1")
    conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (SCHEMA_VERSION,))


def _start_campaign(conn: sqlite3.Connection, csv_fingerprint: str, template_fp: str) -> str:
    campaign_id = secrets.token_hex(12)
    meta = {
        "schema_version": SCHEMA_VERSION,
        "campaign_id": campaign_id,
        "csv_sha256": csv_fingerprint,
        "template_sha256": template_fp,
        "created_at": repr(time.time()),
    }
    conn.execute("DELETE FROM rows")
    conn.execute("DELETE FROM meta")
    conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", meta.items())
    return campaign_id


def _open_in_thread(
    path: str, csv_fingerprint: str, template_fingerprint: str, new_campaign: bool
) -> tuple[sqlite3.Connection, str, int | None]:
    conn = _connect(path)
    lock_fd: int | None = None
    try:
        lock_fd = _lock(path)
        with _sqlite.transaction(conn):
            # Not executescript(): it would COMMIT our BEGIN IMMEDIATE.
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            has_meta = conn.execute("SELECT count(*) FROM meta").fetchone()[0] > 0
            if has_meta:
                meta = _read_meta(conn, path)
                _migrate(conn, meta)
            if not has_meta or new_campaign:
                campaign_id = _start_campaign(conn, csv_fingerprint, template_fingerprint)
            else:
                changed = tuple(
                    name
                    for name, key, expected in (
                        ("CSV", "csv_sha256", csv_fingerprint),
                        ("template", "template_sha256", template_fingerprint),
                    )
                    if meta.get(key) != expected
                )
                if changed:
                    raise CampaignChangedError(path, changed)
                campaign_id = meta["campaign_id"]
    except BaseException:
        _close(conn, lock_fd)
        raise
    return conn, campaign_id, lock_fd


def _execute_many(conn: sqlite3.Connection, sql: str, rows: list[Any]) -> None:
    """``executemany`` in one write transaction, rolled back on any error."""
    with _sqlite.transaction(conn):
        conn.executemany(sql, rows)


def _write_batch(conn: sqlite3.Connection, batch: list[_Record]) -> list[None]:
    _execute_many(conn, _UPSERT, batch)
    return [None] * len(batch)


_INSERT_PENDING = (
    "INSERT INTO rows (row, email, state, updated_at) VALUES (?, ?, 'pending', ?) "
    "ON CONFLICT (row) DO NOTHING"
)


def _insert_pending(
    conn: sqlite3.Connection, rows: Iterator[tuple[int, str]], chunk: int
) -> tuple[int, bool]:
    """Insert up to ``chunk`` rows from ``rows`` as pending (existing rows are kept)."""
    now = time.time()
    batch = [(row, email, now) for row, email in itertools.islice(rows, chunk)]
    if batch:
        _execute_many(conn, _INSERT_PENDING, batch)
    return len(batch), len(batch) < chunk


def _settled_rows(conn: sqlite3.Connection, retry_failed: bool) -> bytearray:
    states = ["sent", "invalid", "duplicate"]
    if not retry_failed:
        states.append("failed")
    (top,) = conn.execute("SELECT coalesce(max(row), 0) FROM rows").fetchone()
    bitmap = bytearray((int(top) >> 3) + 1)
    placeholders = ", ".join("?" * len(states))
    for (row,) in conn.execute(f"SELECT row FROM rows WHERE state IN ({placeholders})", states):  # noqa: S608
        _set_bit(bitmap, row)
    return bitmap


def _taken_keys(conn: sqlite3.Connection, retry_failed: bool) -> KeySet:
    """The recipients of the rows a run skips as settled: sent, and failed unless retried."""
    keys = KeySet()
    states = "('sent')" if retry_failed else "('sent', 'failed')"
    for (email,) in conn.execute(f"SELECT email FROM rows WHERE state IN {states}"):  # noqa: S608
        with contextlib.suppress(MessageError):
            keys.add(mailbox_key(email))
    return keys


def _counts(conn: sqlite3.Connection) -> dict[str, int]:
    counts = dict.fromkeys(ROW_STATES, 0)
    counts.update(conn.execute("SELECT state, count(*) FROM rows GROUP BY state").fetchall())
    return counts


def _unsent_rows(conn: sqlite3.Connection, limit: int) -> list[JournalRow]:
    cursor = conn.execute(
        f"SELECT {_ROW_COLUMNS} FROM rows WHERE state != 'sent' ORDER BY row LIMIT ?",  # noqa: S608
        (limit,),
    )
    return [JournalRow(*values) for values in cursor]


def _deferred_rows(conn: sqlite3.Connection) -> list[tuple[int, float]]:
    cursor = conn.execute(
        "SELECT row, coalesce(next_attempt_at, 0) FROM rows WHERE state = 'deferred' "
        "ORDER BY coalesce(next_attempt_at, 0), row"
    )
    return [(int(row), float(at)) for row, at in cursor]


def read_status(path: str | os.PathLike[str], *, limit: int = 20) -> StatusSummary:
    """Summarize a journal synchronously (for ``twistmail status JOURNAL``, outside a reactor).

    Safe while a campaign is writing to the journal (WAL readers do not block the writer).
    ``unsent`` holds at most ``limit`` rows whose state is not ``sent``, in row order.

    :raises JournalError: if ``path`` does not exist or is not a twistmail journal.
    """
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise JournalError(f"{name}: no such journal")
    conn = sqlite3.connect(name, isolation_level=None)
    try:
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute("BEGIN")  # one snapshot for meta, counts and rows
        meta = _read_meta(conn, name)
        summary = StatusSummary(
            path=name,
            campaign_id=meta["campaign_id"],
            csv_fingerprint=meta.get("csv_sha256", ""),
            template_fingerprint=meta.get("template_sha256", ""),
            created_at=float(meta.get("created_at", "0")),
            counts=_counts(conn),
            unsent=_unsent_rows(conn, limit),
        )
        conn.execute("COMMIT")
        return summary
    finally:
        conn.close()


# The reactor-side object. -------------------------------------------------------------------


class Journal:
    """A campaign's journal, used from the reactor thread; all SQLite work runs on its own thread.

    Get one with :meth:`Journal.open`; finish with :meth:`close` (reactor shutdown closes a
    journal left open, committing what was recorded).

    :ivar campaign_id: random token made once per journal (and again on ``new_campaign``).
    """

    def __init__(self, db: SqliteThread[_Record], campaign_id: str) -> None:
        """Use :meth:`Journal.open`; this only wires an opened store thread."""
        self.path = db.path
        self.campaign_id = campaign_id
        self._db = db
        self._submit = db.submit

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        csv_fingerprint: str,
        template_fingerprint: str,
        new_campaign: bool = False,
        reactor: Reactor | None = None,
    ) -> defer.Deferred[Journal]:
        """Open the journal at ``path``, creating it if absent.

        An existing journal must carry the same CSV and template fingerprints (sha256 strings),
        else the Deferred fails with :class:`CampaignChangedError`. With ``new_campaign`` an
        existing journal starts over: its rows are discarded and a new campaign id is made, so
        every row is sent again under new Message-IDs. Only one open Journal may use a file at a
        time (an exclusive ``flock``); a second one fails with :class:`JournalError`.
        """
        reactor = reactor if reactor is not None else default_reactor()
        name = os.fspath(path)
        d = SqliteThread.start(
            reactor,
            f"twistmail-journal {name}",
            _open_in_thread,
            name,
            csv_fingerprint,
            template_fingerprint,
            new_campaign,
        )

        def opened(
            result: tuple[ThreadPool, tuple[sqlite3.Connection, str, int | None]],
        ) -> Journal:
            pool, (conn, campaign_id, lock_fd) = result
            db: SqliteThread[_Record] = SqliteThread(
                name,
                conn,
                pool,
                reactor,
                commit=_write_batch,
                closed=JournalError,
                after_close=_unlock(lock_fd),
            )
            return cls(db, campaign_id)

        return d.addCallback(opened)

    def message_id(self, row: int, domain: str) -> str:
        """The Message-ID of ``row``'s message: stable across runs and retries of this journal."""
        return f"<{self.campaign_id}.{row}@{domain}>"

    # Writes ---------------------------------------------------------------------------------

    def record(
        self,
        row: int,
        *,
        email: str,
        state: RowState,
        code: int | None = None,
        response: str = "",
        attempts: int = 0,
        message_id: str | None = None,
        next_attempt_at: float | None = None,
    ) -> defer.Deferred[None]:
        """Record ``row``'s latest state; the Deferred fires once that is committed to disk.

        Records made while a commit is running are committed together in the next transaction.
        A later record of the same row replaces the earlier one.

        :raises ValueError: for an unknown ``state`` (before anything is queued).
        :raises JournalError: once :meth:`close` has been called.
        """
        if state not in ROW_STATES:
            raise ValueError(f"unknown journal state {state!r}; expected one of {ROW_STATES}")
        if self._db.closing:
            raise JournalError(f"{self.path}: record() after close()")
        return self._submit(
            (row, email, state, code, response, attempts, message_id, next_attempt_at, time.time())
        )

    @property
    def commits(self) -> int:
        """Write transactions committed so far (one per group commit)."""
        return self._db.commits

    # Reads (they see every commit made before they were asked for) --------------------------

    def register_pending(
        self, rows: Iterable[tuple[int, str]], *, chunk: int = 10_000
    ) -> defer.Deferred[int]:
        """Record every ``(row, email)`` not yet in the journal as ``pending``.

        ``rows`` is consumed on the journal's thread (it may read a file), ``chunk`` rows per
        transaction, so records made meanwhile are committed between chunks. Fires with the
        number of rows read. Stops early, between chunks, once :meth:`close` is called.
        """
        iterator = iter(rows)

        async def run() -> int:
            total = 0
            while not self._db.closing:
                count, finished = await self._db.run(_insert_pending, iterator, chunk)
                total += count
                if finished:
                    break
            return total

        return defer.ensureDeferred(run())

    def settled_rows(self, retry_failed: bool = False) -> defer.Deferred[bytearray]:
        """A bitmap of rows not to send again; test a row with :func:`is_set`.

        Bit ``row`` is set for rows that are ``sent`` or ``invalid``, and ``failed`` unless
        ``retry_failed``. One bit per row: a million-row campaign resumes with ~125 KB.
        """
        return self._db.read(_settled_rows, retry_failed)

    def deferred_rows(self) -> defer.Deferred[list[tuple[int, float]]]:
        """``(row, next_attempt_at)`` of every deferred row, soonest first (unknown time = 0)."""
        return self._db.read(_deferred_rows)

    def taken_keys(self, retry_failed: bool = False) -> defer.Deferred[KeySet]:
        """The recipients (:func:`~twistmail.address.mailbox_key`) of the rows a run skips as
        settled (see :meth:`settled_rows`): a row rendered later for one of them is a
        duplicate."""
        return self._db.read(_taken_keys, retry_failed)

    def counts(self) -> defer.Deferred[dict[str, int]]:
        """Number of rows in each state (every state present, zero if none)."""
        return self._db.read(_counts)

    def unsent_rows(self, limit: int = 20) -> defer.Deferred[list[JournalRow]]:
        """At most ``limit`` rows whose state is not ``sent``, in row order."""
        return self._db.read(_unsent_rows, limit)

    def settings(self) -> defer.Deferred[tuple[str, int]]:
        """``(journal_mode, synchronous)`` of the journal's connection (1 is NORMAL)."""
        return self._db.settings()

    # Lifecycle ------------------------------------------------------------------------------

    def close(self) -> defer.Deferred[None]:
        """Commit everything recorded so far, close the file and stop the writer thread.

        Idempotent: every call returns a Deferred firing when the journal is closed.
        """
        return self._db.close()
