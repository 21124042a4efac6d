"""The spool: messages waiting for delivery, kept durably in one SQLite file.

Each message is stored as its SMTP envelope (sender, DATA payload ready for the wire,
Message-ID) with one row per recipient, so a message some of whose recipients were accepted is
retried for the others only.

Message states: ``queued`` (never tried), ``sending`` (claimed by a drain, under a lease),
``deferred`` (a 4xx, drop or timeout; tried again from ``due``), ``sent`` (every recipient
accepted; the payload is then dropped, the row kept as a record) and ``failed`` (a recipient
refused permanently, or attempts ran out; kept with its reason, payload included, never
deleted). Recipient states: ``pending``, ``sent``, ``failed``.

Durability: WAL mode with ``synchronous=FULL``. Every commit appends to the ``-wal`` file and
fsyncs it before the Deferred of the write fires, so an enqueued message survives a power loss,
not just a killed process. WAL rather than a rollback journal because a WAL commit is one
sequential append and one fsync (a rollback journal with FULL needs several fsyncs per
commit), and because readers (``twistmail drain --status``, a second drain) never block the
writer.

Threading: every SQLite call of a :class:`SqliteSpool` runs on its own single writer thread,
never on the reactor thread. Writes made while a commit runs are committed together in the next
transaction (group commit), so many concurrent enqueues share one fsync.

Claims: a drain takes messages with ``BEGIN IMMEDIATE`` and one ``UPDATE ... RETURNING`` that
sets ``state='sending'``, its ``owner`` token and a ``lease_until`` time, so two drains (in any
processes) never hold the same message. A message whose drain died keeps ``sending`` until its
lease expires, then is claimed again: delivery is at-least-once after a crash.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any, Final, TypeVar

from twisted.internet import defer, threads
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from ..address import parse_address, parse_sender
from ..groupcommit import GroupCommit
from ..message import Envelope
from .records import MESSAGE_STATES, ClaimedMessage, Outcome, SpoolError, SpoolRow, SpoolSummary

__all__ = ["SqliteSpool", "read_spool_status"]


SCHEMA_VERSION: Final = "1"

_T = TypeVar("_T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
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
CREATE INDEX IF NOT EXISTS messages_due ON messages (due, id)
    WHERE state IN ('queued', 'deferred');
CREATE INDEX IF NOT EXISTS messages_lease ON messages (lease_until) WHERE state = 'sending';
CREATE TABLE IF NOT EXISTS recipients (
    message INTEGER NOT NULL REFERENCES messages (id),
    position INTEGER NOT NULL,
    address TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'sent', 'failed')),
    code INTEGER,
    response TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (message, position)
) WITHOUT ROWID
"""

_INSERT_MESSAGE = """
INSERT INTO messages (sender, payload, size, eight_bit, smtputf8, message_id, state, due,
                      created_at, updated_at)
VALUES (?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?)
"""

_CLAIM = """
UPDATE messages SET state = 'sending', owner = ?, lease_until = ?, updated_at = ?
WHERE id IN (
    SELECT id FROM (
        SELECT id, due FROM messages WHERE state IN ('queued', 'deferred') AND due <= ?
        UNION ALL
        SELECT id, due FROM messages WHERE state = 'sending' AND lease_until < ?
    ) ORDER BY due, id LIMIT ?
)
RETURNING id, sender, payload, size, eight_bit, smtputf8, message_id, attempts
"""

_RECORD = """
UPDATE messages SET state = ?, attempts = ?, due = ?, code = ?, response = ?, owner = NULL,
    lease_until = NULL, updated_at = ?,
    payload = CASE WHEN ? = 'sent' THEN x'' ELSE payload END
WHERE id = ? AND owner = ? AND state = 'sending'
"""

_RELEASE = """
UPDATE messages SET state = CASE WHEN attempts = 0 THEN 'queued' ELSE 'deferred' END,
    owner = NULL, lease_until = NULL, updated_at = ?
WHERE id = ? AND owner = ? AND state = 'sending'
"""


def _default_reactor() -> Any:
    from twisted.internet import reactor

    return reactor


# Functions that run on the writer thread. -----------------------------------------------------


def _connect(path: str, *, create: bool) -> sqlite3.Connection:
    if not create and not os.path.isfile(path):
        raise SpoolError(f"{path}: no such spool")
    try:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so one group is one commit.
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as e:
        raise SpoolError(f"{path}: cannot open the spool ({e})") from e
    try:
        conn.execute("PRAGMA busy_timeout = 10000")
        conn.execute("BEGIN IMMEDIATE")
        try:
            _check_or_create_schema(conn, path)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        # Only once the file is known to be a spool (another database is left as it was).
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise SpoolError(f"{path}: SQLite could not use WAL mode here (got {mode!r})")
        conn.execute("PRAGMA synchronous = FULL")
    except sqlite3.DatabaseError as e:
        conn.close()
        raise SpoolError(f"{path}: not a twistmail spool ({e})") from e
    except BaseException:
        conn.close()
        raise
    return conn


def _check_or_create_schema(conn: sqlite3.Connection, path: str) -> None:
    tables = {
        name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    }
    if not tables:
        for statement in _SCHEMA.split(";"):  # not executescript(): it would COMMIT
            if statement.strip():
                conn.execute(statement)
        conn.execute(
            "INSERT INTO meta (key, value) VALUES ('kind', 'twistmail-spool'), "
            "('schema_version', ?)",
            (SCHEMA_VERSION,),
        )
        return
    meta = dict(conn.execute("SELECT key, value FROM meta").fetchall()) if "meta" in tables else {}
    if meta.get("kind") != "twistmail-spool" or meta.get("schema_version") != SCHEMA_VERSION:
        raise SpoolError(f"{path}: not a twistmail spool, or one of another version")


def _run_group(
    conn: sqlite3.Connection, ops: list[Callable[[sqlite3.Connection], Any]]
) -> list[Any]:
    """Run every op in one write transaction; roll back all of them on any error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        results = [op(conn) for op in ops]
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return results


def _insert(envelopes: Sequence[Envelope], now: float, conn: sqlite3.Connection) -> list[int]:
    ids = []
    for env in envelopes:
        cursor = conn.execute(
            _INSERT_MESSAGE,
            (
                str(env.sender),
                env.payload,
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
        conn.executemany(
            "INSERT INTO recipients (message, position, address, state) VALUES (?, ?, ?, "
            "'pending')",
            [(message, i, str(rcpt)) for i, rcpt in enumerate(env.recipients)],
        )
        ids.append(message)
    return ids


def _claim(
    owner: str, limit: int, lease: float, due_by: float, now: float, conn: sqlite3.Connection
) -> list[ClaimedMessage]:
    rows = conn.execute(_CLAIM, (owner, now + lease, now, due_by, now, limit)).fetchall()
    claimed = []
    for message, sender, payload, size, eight_bit, smtputf8, message_id, attempts in sorted(rows):
        positions, addresses = [], []
        refused: tuple[str, int | None, str] | None = None
        for position, address, state, code, response in conn.execute(
            "SELECT position, address, state, code, response FROM recipients WHERE message = ? "
            "ORDER BY position",
            (message,),
        ):
            if state == "pending":
                positions.append(position)
                addresses.append(parse_address(address, field="recipients"))
            elif state == "failed" and refused is None:
                refused = (address, code, response)
        envelope = Envelope(
            sender=parse_sender(sender, field="sender"),
            recipients=tuple(addresses),
            payload=bytes(payload),
            size=size,
            eight_bit=bool(eight_bit),
            smtputf8=bool(smtputf8),
            message_id=message_id,
        )
        claimed.append(ClaimedMessage(message, envelope, tuple(positions), attempts, refused))
    return claimed


def _record(owner: str, outcome: Outcome, now: float, conn: sqlite3.Connection) -> bool:
    o = outcome
    cursor = conn.execute(
        _RECORD,
        (o.state, o.attempts, o.due, o.code, o.response, now, o.state, o.id, owner),
    )
    if cursor.rowcount != 1:
        return False  # the lease expired and another drain took the message over
    conn.executemany(
        "UPDATE recipients SET state = ?, code = ?, response = ? "
        "WHERE message = ? AND position = ?",
        [(state, code, text, o.id, position) for position, state, code, text in o.recipients],
    )
    return True


def _release(owner: str, ids: Sequence[int], now: float, conn: sqlite3.Connection) -> int:
    return sum(conn.execute(_RELEASE, (now, message, owner)).rowcount for message in ids)


def _renew(owner: str, lease: float, now: float, conn: sqlite3.Connection) -> int:
    cursor = conn.execute(
        "UPDATE messages SET lease_until = ? WHERE owner = ? AND state = 'sending'",
        (now + lease, owner),
    )
    return cursor.rowcount


def _summary(conn: sqlite3.Connection, now: float) -> SpoolSummary:
    counts = dict.fromkeys(MESSAGE_STATES, 0)
    counts.update(conn.execute("SELECT state, count(*) FROM messages GROUP BY state").fetchall())
    (due,) = conn.execute(
        "SELECT count(*) FROM messages WHERE state IN ('queued', 'deferred') AND due <= ?", (now,)
    ).fetchone()
    (expired,) = conn.execute(
        "SELECT count(*) FROM messages WHERE state = 'sending' AND lease_until < ?", (now,)
    ).fetchone()
    return SpoolSummary(counts, int(due), counts["sending"] - int(expired), int(expired))


def _unsent(conn: sqlite3.Connection, limit: int) -> list[SpoolRow]:
    rows = conn.execute(
        "SELECT m.id, m.message_id, m.state, m.attempts, m.due, m.code, m.response, "
        "group_concat(r.address || ' ' || r.state, ', ') FROM messages m "
        "JOIN recipients r ON r.message = m.id WHERE m.state != 'sent' "
        "GROUP BY m.id ORDER BY m.id LIMIT ?",
        (limit,),
    ).fetchall()
    return [SpoolRow(*row) for row in rows]


def _settings(conn: sqlite3.Connection) -> tuple[str, int]:
    mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    synchronous = conn.execute("PRAGMA synchronous").fetchone()[0]
    return str(mode), int(synchronous)


def read_spool_status(path: str | os.PathLike[str], *, limit: int = 20) -> SpoolSummary:
    """Counts and the first ``limit`` unsent messages of a spool, read synchronously.

    For ``twistmail drain --status`` outside a reactor; safe while drains are running.

    :raises SpoolError: if ``path`` does not exist or is not a spool.
    """
    name = os.fspath(path)
    conn = _connect(name, create=False)
    try:
        conn.execute("BEGIN")  # one snapshot
        summary = _summary(conn, time.time())
        summary.unsent.extend(_unsent(conn, limit))
        conn.execute("COMMIT")
        return summary
    finally:
        conn.close()


# The reactor-side object. ---------------------------------------------------------------------


class SqliteSpool:
    """A spool file used from the reactor thread; all SQLite work runs on its own thread.

    Get one with :meth:`SqliteSpool.open`; finish with :meth:`close`. Times stored in the file
    (``due``, ``lease_until``) are wall-clock seconds, shared by every process using it.
    """

    def __init__(self, path: str, conn: sqlite3.Connection, pool: ThreadPool, reactor: Any):
        """Use :meth:`SqliteSpool.open`; this only wires an opened connection and pool."""
        self.path = path
        self._conn = conn
        self._pool = pool
        self._reactor = reactor
        self._group: GroupCommit[Callable[[sqlite3.Connection], Any]] = GroupCommit(
            lambda ops: self._in_thread(_run_group, self._conn, ops)
        )
        self._closing: list[defer.Deferred[None]] | None = None  # None until close()
        self._closed = False
        self._close_failure: Failure | None = None
        self._trigger: Any = reactor.addSystemEventTrigger(
            "before", "shutdown", self._close_at_shutdown
        )

    @classmethod
    def open(
        cls, path: str | os.PathLike[str], *, create: bool = True, reactor: Any = None
    ) -> defer.Deferred[SqliteSpool]:
        """Open the spool at ``path``, creating the file unless ``create`` is false.

        Fails with :class:`SpoolError` for a missing file (``create=False``) or a file that is
        not a spool.
        """
        reactor = reactor if reactor is not None else _default_reactor()
        name = os.fspath(path)
        pool = ThreadPool(minthreads=1, maxthreads=1, name=f"twistmail-spool {name}")
        pool.start()
        d = threads.deferToThreadPool(reactor, pool, _connect, name, create=create)

        def failed(failure: Failure) -> Failure:
            pool.stop()
            return failure

        return d.addCallbacks(lambda conn: cls(name, conn, pool, reactor), failed)

    # Writes (group commit) ------------------------------------------------------------------

    def enqueue(
        self, envelopes: Sequence[Envelope], *, now: float | None = None
    ) -> defer.Deferred[list[int]]:
        """Store ``envelopes`` as ``queued``, due ``now``; fires with their ids once committed."""
        return self._write(_insert, list(envelopes), _now(now))

    def claim(
        self,
        owner: str,
        limit: int,
        *,
        lease: float,
        due_by: float | None = None,
        now: float | None = None,
    ) -> defer.Deferred[list[ClaimedMessage]]:
        """Take up to ``limit`` messages for ``owner`` for ``lease`` seconds, oldest due first.

        Claims queued and deferred messages due by ``due_by`` (default: now) and ``sending``
        messages whose lease has expired. Each comes back with its pending recipients only.
        """
        current = _now(now)
        cutoff = current if due_by is None else due_by
        return self._write(_claim, owner, limit, lease, cutoff, current)

    def record(
        self, owner: str, outcome: Outcome, *, now: float | None = None
    ) -> defer.Deferred[bool]:
        """Write an attempt's outcome and release the message; False if ``owner`` lost it."""
        return self._write(_record, owner, outcome, _now(now))

    def release(
        self, owner: str, ids: Sequence[int], *, now: float | None = None
    ) -> defer.Deferred[int]:
        """Give back claimed messages not attempted; fires with how many were released."""
        return self._write(_release, owner, list(ids), _now(now))

    def renew(self, owner: str, lease: float, *, now: float | None = None) -> defer.Deferred[int]:
        """Extend every lease ``owner`` holds to ``lease`` seconds from now."""
        return self._write(_renew, owner, lease, _now(now))

    def _write(self, function: Callable[..., _T], *args: Any) -> defer.Deferred[_T]:
        """Queue a write for the next group commit."""
        if self._closing is not None:
            return defer.fail(SpoolError(f"{self.path}: the spool is closed"))
        d: defer.Deferred[_T] = self._group.submit(lambda conn: function(*args, conn))
        return d

    @property
    def commits(self) -> int:
        """Write transactions committed so far (one per group of writes)."""
        return self._group.commits

    # Reads ----------------------------------------------------------------------------------

    def summary(self, *, now: float | None = None) -> defer.Deferred[SpoolSummary]:
        """Counts by state, and how many messages are due, held or with an expired lease."""
        return self._read(_summary, _now(now))

    def unsent(self, limit: int = 20) -> defer.Deferred[list[SpoolRow]]:
        """The first ``limit`` messages not sent, with their recipients' states."""
        return self._read(_unsent, limit)

    def settings(self) -> defer.Deferred[tuple[str, int]]:
        """``(journal_mode, synchronous)`` of this spool's own connection (2 is FULL)."""
        return self._read(_settings)

    def _read(self, function: Callable[..., _T], *args: Any) -> defer.Deferred[_T]:
        if self._closing is not None:
            return defer.fail(SpoolError(f"{self.path}: the spool is closed"))
        return self._in_thread(function, self._conn, *args)

    # Lifecycle ------------------------------------------------------------------------------

    def close(self) -> defer.Deferred[None]:
        """Commit what is pending, close the file and stop the thread; idempotent."""
        if self._closing is None:
            self._closing = []
            if self._trigger is not None:
                self._reactor.removeSystemEventTrigger(self._trigger)
                self._trigger = None
            idle = self._group.idle()

            def close_connection(_: None) -> defer.Deferred[None]:
                return self._in_thread(self._conn.close)

            def stop_pool(result: Failure | None) -> None:
                self._pool.stop()  # its only thread is idle now
                self._closed = True
                self._close_failure = result
                waiters, self._closing = self._closing or [], []
                for waiter in waiters:
                    self._fire_closed(waiter)

            idle.addCallback(close_connection).addBoth(stop_pool)
        waiter: defer.Deferred[None] = defer.Deferred()
        if self._closed:
            self._fire_closed(waiter)
        else:
            self._closing.append(waiter)
        return waiter

    def _close_at_shutdown(self) -> defer.Deferred[None]:
        self._trigger = None  # firing now: removing it would be an error
        return self.close()

    def _fire_closed(self, waiter: defer.Deferred[None]) -> None:
        if self._close_failure is None:
            waiter.callback(None)
        else:
            waiter.errback(self._close_failure)

    def _in_thread(self, function: Callable[..., _T], *args: Any) -> defer.Deferred[_T]:
        return threads.deferToThreadPool(self._reactor, self._pool, function, *args)


def _now(now: float | None) -> float:
    return time.time() if now is None else now
