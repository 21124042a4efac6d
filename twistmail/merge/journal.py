"""The durable journal of a ``twistmail send`` campaign: one SQLite row per recipient.

The journal records the outcome of every recipient message so an interrupted campaign resumes
where it stopped and sends nobody twice (beyond the messages in flight at the moment of a crash).
Rows are kept under the id of their key (:mod:`.identity`: the recipient's mailbox, or ``#N``
for a row without one), not their position, so a CSV fixed, extended or sorted differently
resumes too.

Durability: the file is in WAL mode with ``synchronous=NORMAL``. A committed transaction has been
written (``write()``) to the ``-wal`` file before :meth:`Journal.record`'s Deferred fires, so it
is in the operating system's page cache and survives the process being killed, even by SIGKILL.
Only an operating-system crash or power loss can drop the last few commits (never corrupting the
file); ``synchronous=FULL`` would cover that at the cost of one fsync per commit.

Threading: SQLite calls block, so every call on the campaign's connection runs on one dedicated
writer thread (:class:`~twistmail._sqlite.SqliteThread`), never on the reactor thread. Work on
that thread runs in submission order, so writes serialize and reads see every commit made before
them. Writes use group commit: records queued while a commit runs all go into the next single
transaction, which the thread starts as soon as the previous one is committed (one commit at a
time). Reactor shutdown commits what was recorded and
closes a journal left open.

:func:`read_status` is the synchronous reader for ``twistmail status JOURNAL``, outside a reactor.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from twisted.internet import defer
from twisted.python.threadpool import ThreadPool

from .. import _sqlite
from .._sqlite import SqliteThread
from .._twisted import Reactor, default_reactor
from ..errors import CampaignChangedError, JournalError
from .identity import campaign_message_id
from .schema import (
    ROW_STATES,
    SCHEMA_VERSION,
    UPSERT,
    JournalRecord,
    RowState,
    create_tables,
    migrate,
    row_columns,
)

_T = TypeVar("_T")

__all__ = [
    "CampaignChangedError",
    "Journal",
    "JournalError",
    "JournalRow",
    "RowState",
    "StatusSummary",
    "bounce_rows",
    "read_status",
]


@dataclass(frozen=True, slots=True)
class JournalRow:
    """One journal row: the latest known fate of one recipient.

    ``id`` identifies the recipient (:func:`.identity.row_id`); ``row`` is the 1-based CSV data row
    it was last seen at; ``changed`` is true for a row sent (or failed) whose cells have changed
    since, which is reported and not sent again.
    """

    id: int
    row: int
    email: str
    state: RowState
    code: int | None
    response: str
    attempts: int
    message_id: str | None
    next_attempt_at: float | None
    updated_at: float
    fingerprint: int | None
    changed: bool


@dataclass(frozen=True, slots=True)
class StatusSummary:
    """What ``twistmail status`` shows: counts by state, the rows changed since they were sent,
    and the first rows not yet sent."""

    path: str
    campaign_id: str
    template_fingerprint: str
    created_at: float
    counts: dict[str, int]
    unsent: list[JournalRow] = field(default_factory=list)
    changed: int = 0

    @property
    def total(self) -> int:
        """Number of rows in the journal."""
        return sum(self.counts.values())


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
    if version not in ("1", "2", SCHEMA_VERSION) or "campaign_id" not in meta:
        if version is not None and version.isdigit() and int(version) > int(SCHEMA_VERSION):
            raise JournalError(
                f"{path}: a journal of a newer twistmail (schema {version}); upgrade twistmail"
            )
        raise JournalError(f"{path}: not a twistmail journal, or one of another version")
    return meta


def _start_campaign(conn: sqlite3.Connection, template_fp: str) -> str:
    campaign_id = secrets.token_hex(12)
    meta = {
        "schema_version": SCHEMA_VERSION,
        "campaign_id": campaign_id,
        "template_sha256": template_fp,
        "created_at": repr(time.time()),
    }
    conn.execute("DELETE FROM rows")
    conn.execute("DELETE FROM meta")
    conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", meta.items())
    return campaign_id


def _open_in_thread(
    path: str, template_fingerprint: str, new_campaign: bool
) -> tuple[sqlite3.Connection, str, int | None]:
    conn = _connect(path)
    lock_fd: int | None = None
    try:
        lock_fd = _lock(path)
        with _sqlite.transaction(conn):
            has_meta = (
                conn.execute(
                    "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
                ).fetchone()[0]
                and conn.execute("SELECT count(*) FROM meta").fetchone()[0] > 0
            )
            if has_meta:
                meta = _read_meta(conn, path)
                migrate(conn, meta["schema_version"])
            else:
                create_tables(conn)
            if not has_meta or new_campaign:
                campaign_id = _start_campaign(conn, template_fingerprint)
            else:
                # The CSV may change (rows are kept by recipient); the template may not.
                if meta.get("template_sha256") != template_fingerprint:
                    raise CampaignChangedError(path, ("template",))
                campaign_id = meta["campaign_id"]
    except BaseException:
        _close(conn, lock_fd)
        raise
    return conn, campaign_id, lock_fd


def _execute_many(conn: sqlite3.Connection, sql: str, rows: list[Any]) -> None:
    """``executemany`` in one write transaction, rolled back on any error."""
    with _sqlite.transaction(conn):
        conn.executemany(sql, rows)


def _write_batch(conn: sqlite3.Connection, batch: list[JournalRecord]) -> list[None]:
    _execute_many(conn, UPSERT, batch)
    return [None] * len(batch)


def _counts(conn: sqlite3.Connection) -> dict[str, int]:
    counts = dict.fromkeys(ROW_STATES, 0)
    counts.update(conn.execute("SELECT state, count(*) FROM rows GROUP BY state").fetchall())
    return counts


def _unsent_rows(
    conn: sqlite3.Connection, limit: int, version: str = SCHEMA_VERSION
) -> list[JournalRow]:
    cursor = conn.execute(
        f"SELECT {row_columns(version)} FROM rows WHERE state != 'sent' "  # noqa: S608
        "ORDER BY row LIMIT ?",
        (limit,),
    )
    return [JournalRow(*values) for values in cursor]


def _changed_count(conn: sqlite3.Connection, version: str) -> int:
    if version != SCHEMA_VERSION:
        return 0  # not known before version 3
    return int(conn.execute("SELECT count(*) FROM rows WHERE changed").fetchone()[0])


def bounce_rows(
    path: str | os.PathLike[str],
    bounces: list[tuple[str, int, bool, int | None, str]],
) -> list[str | None]:
    """Apply bounces to the journal at ``path`` (blocking: run it in a thread); one
    transaction, under the journal's lock (a campaign running on it is a JournalError).

    Each bounce is ``(campaign, row_id, failed, code, response)``: ``campaign`` must begin the
    journal's campaign id (a bounce for an earlier campaign of the file changes nothing); a
    ``sent`` row becomes ``failed`` with ``code`` and ``response`` (``failed``) or keeps its
    state with ``response`` as news. Returns each row's address (None: no such row).
    """
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise JournalError(f"{name}: no such journal")
    conn = _connect(name)
    lock_fd: int | None = None
    try:
        lock_fd = _lock(name)
        campaign_id = _read_meta(conn, name)["campaign_id"]
        found: list[str | None] = []
        with _sqlite.transaction(conn):
            for campaign, row_id, failed, code, response in bounces:
                row = conn.execute("SELECT email, state FROM rows WHERE id = ?", (row_id,))
                hit = row.fetchone() if campaign and campaign_id.startswith(campaign) else None
                if hit is None:
                    found.append(None)
                    continue
                if hit[1] == "sent":
                    conn.execute(
                        "UPDATE rows SET state = ?, code = ?, response = ?, updated_at = ? "
                        "WHERE id = ?",
                        (
                            "failed" if failed else "sent",
                            code if failed else None,
                            response,
                            time.time(),
                            row_id,
                        ),
                    )
                found.append(str(hit[0]))
        return found
    finally:
        _close(conn, lock_fd)


def read_status(path: str | os.PathLike[str], *, limit: int = 20) -> StatusSummary:
    """Summarize a journal synchronously (for ``twistmail status JOURNAL``, outside a reactor).

    Safe while a campaign is writing to the journal (WAL readers do not block the writer).
    ``unsent`` holds at most ``limit`` rows whose state is not ``sent``, in row order. A
    journal of an earlier version is read as it is (a campaign run migrates it).

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
            template_fingerprint=meta.get("template_sha256", ""),
            created_at=float(meta.get("created_at", "0")),
            counts=_counts(conn),
            unsent=_unsent_rows(conn, limit, meta["schema_version"]),
            changed=_changed_count(conn, meta["schema_version"]),
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

    def __init__(self, db: SqliteThread[JournalRecord], campaign_id: str) -> None:
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
        template_fingerprint: str,
        new_campaign: bool = False,
        reactor: Reactor | None = None,
    ) -> defer.Deferred[Journal]:
        """Open the journal at ``path``, creating it if absent.

        An existing journal must carry the same template fingerprint (a sha256 string), else
        the Deferred fails with :class:`CampaignChangedError`; the CSV may change, as rows are
        kept by recipient. A journal of an earlier schema is migrated in place. With
        ``new_campaign`` an existing journal starts over: its rows are discarded and a new
        campaign id is made, so every row is sent again under new Message-IDs. Only one open
        Journal may use a file at a time (an exclusive ``flock``); a second one fails with
        :class:`JournalError`.
        """
        reactor = reactor if reactor is not None else default_reactor()
        name = os.fspath(path)
        d = SqliteThread.start(
            reactor,
            f"twistmail-journal {name}",
            _open_in_thread,
            name,
            template_fingerprint,
            new_campaign,
        )

        def opened(
            result: tuple[ThreadPool, tuple[sqlite3.Connection, str, int | None]],
        ) -> Journal:
            pool, (conn, campaign_id, lock_fd) = result
            db: SqliteThread[JournalRecord] = SqliteThread(
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

    def message_id(self, row_id: int, domain: str) -> str:
        """The Message-ID of the message for the row with id ``row_id`` (see
        :func:`.identity.row_id`): stable across runs, retries and row orders of the campaign."""
        return campaign_message_id(self.campaign_id, row_id, domain)

    # Writes ---------------------------------------------------------------------------------

    def record(
        self,
        row_id: int,
        *,
        row: int,
        email: str,
        state: RowState,
        code: int | None = None,
        response: str = "",
        attempts: int = 0,
        message_id: str | None = None,
        next_attempt_at: float | None = None,
        fingerprint: int | None = None,
    ) -> defer.Deferred[None]:
        """Record the latest state of the recipient with id ``row_id``, last seen at CSV row
        ``row`` with cells whose hash is ``fingerprint``; the Deferred fires once committed.

        Records made while a commit is running are committed together in the next transaction.
        A later record of the same id replaces the earlier one.

        :raises ValueError: for an unknown ``state`` (before anything is queued).
        :raises JournalError: once :meth:`close` has been called.
        """
        if state not in ROW_STATES:
            raise ValueError(f"unknown journal state {state!r}; expected one of {ROW_STATES}")
        if self._db.closing:
            raise JournalError(f"{self.path}: record() after close()")
        return self._submit(
            (
                row_id,
                row,
                email,
                state,
                code,
                response,
                attempts,
                message_id,
                next_attempt_at,
                time.time(),
                fingerprint,
            )
        )

    @property
    def commits(self) -> int:
        """Write transactions committed so far (one per group commit)."""
        return self._db.commits

    # Reads (they see every commit made before they were asked for) --------------------------

    def run(self, function: Callable[..., _T], *args: Any) -> defer.Deferred[_T]:
        """Run ``function(connection, *args)`` on the journal's thread, in turn with its
        commits; for the journal's own multi-step work (see :mod:`.resume`)."""
        return self._db.run(function, *args)

    def counts(self) -> defer.Deferred[dict[str, int]]:
        """Number of rows in each state (every state present, zero if none)."""
        return self._db.read(_counts)

    @property
    def closing(self) -> bool:
        """Whether :meth:`close` has been called."""
        return self._db.closing

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
