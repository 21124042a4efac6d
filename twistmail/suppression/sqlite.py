"""The suppression list in a SQLite file: a file of its own (``twistmail send``), or a SQLite
queue's file (the relay and workers keep it beside the messages).

The ``suppressions`` table is created with ``CREATE TABLE IF NOT EXISTS`` and versioned under its
own ``suppression_schema`` key of the file's ``meta`` table, so it can live in a queue's file
without touching the queue's schema version. A new file is marked ``twistmail-suppression``; a
file that is neither that nor a twistmail spool is refused and left as it was.

Durability: WAL mode, ``synchronous=FULL``: an entry's Deferred fires once it is fsync'd (an
unsubscribe survives a power cut). Threading: every SQLite call runs on the store's own thread
(:class:`~twistmail._sqlite.SqliteThread`), never on the reactor thread; writes made while a
commit runs are committed together.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

from twisted.internet import defer
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from .. import _sqlite
from .._sqlite import SqliteThread
from .._twisted import Reactor, default_reactor
from ..address import Address
from ..interfaces import ISuppressionList
from .records import Suppression, SuppressionError, checked, lookup, removal

__all__ = ["SCHEMA_VERSION", "SqliteSuppressionList", "default_suppression_path"]

SCHEMA_VERSION: Final = "1"
"""The ``suppression_schema`` value in ``meta``."""

KIND: Final = "twistmail-suppression"
_KINDS: Final = (KIND, "twistmail-spool")

_TABLE = """
CREATE TABLE IF NOT EXISTS suppressions (
    address TEXT NOT NULL,
    list_id TEXT NOT NULL DEFAULT '',
    reason TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    PRIMARY KEY (address, list_id)
) WITHOUT ROWID"""

_COLUMNS = "address, reason, list_id, created_at, detail"
_CHUNK = 500  # addresses per IN (...) list: under SQLite's 999 host parameters anywhere

_Op = Callable[[sqlite3.Connection, float], Any]


def default_suppression_path() -> str:
    """``$XDG_DATA_HOME/twistmail/suppression.db`` (``~/.local/share/...`` by default)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "share"
    )
    return os.path.join(base, "twistmail", "suppression.db")


def _connect(path: str, create: bool) -> sqlite3.Connection:
    if not os.path.isfile(path):
        if not create:
            raise SuppressionError(f"{path}: no such suppression list")
        directory = os.path.dirname(path)
        if directory:
            os.makedirs(directory, exist_ok=True)
    return _sqlite.open_store(
        path,
        name="suppression list",
        check=lambda conn: _check_or_create(conn, path),
        synchronous="FULL",
        error=SuppressionError,
    )


def _check_or_create(conn: sqlite3.Connection, path: str) -> None:
    tables = {
        name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    }
    conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    if not tables:
        conn.execute("INSERT INTO meta (key, value) VALUES ('kind', ?)", (KIND,))
    meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    if meta.get("kind") not in _KINDS:
        raise SuppressionError(f"{path}: neither a twistmail suppression list nor a spool")
    version = meta.get("suppression_schema")
    if version is None:
        conn.execute(_TABLE)
        conn.execute(
            "INSERT INTO meta (key, value) VALUES ('suppression_schema', ?)", (SCHEMA_VERSION,)
        )
    elif version != SCHEMA_VERSION:
        raise SuppressionError(
            f"{path}: a suppression list of schema version {version!r}, which this twistmail "
            f"(suppression schema {SCHEMA_VERSION}) cannot use; upgrade twistmail to use it"
        )


def _run_group(conn: sqlite3.Connection, ops: list[_Op], now: float) -> list[Any]:
    with _sqlite.transaction(conn):
        return [op(conn, now) for op in ops]


def _add(entries: list[Suppression], conn: sqlite3.Connection, now: float) -> int:
    new = 0
    for entry in entries:
        at = now if entry.created_at is None else entry.created_at
        cursor = conn.execute(
            "INSERT INTO suppressions (address, list_id, reason, detail, created_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (entry.address, entry.list_id, entry.reason, entry.detail, at),
        )
        new += cursor.rowcount
    return new


def _remove(address: str, list_id: str | None, conn: sqlite3.Connection, now: float) -> int:
    if list_id is None:
        cursor = conn.execute("DELETE FROM suppressions WHERE address = ?", (address,))
    else:
        cursor = conn.execute(
            "DELETE FROM suppressions WHERE address = ? AND list_id = ?", (address, list_id)
        )
    return cursor.rowcount


def _row(row: tuple[Any, ...]) -> Suppression:
    address, reason, list_id, created_at, detail = row
    return Suppression(address, reason, list_id, created_at, detail)


def _check(conn: sqlite3.Connection, keys: list[str], list_id: str) -> dict[str, Suppression]:
    found: dict[str, Suppression] = {}
    for start in range(0, len(keys), _CHUNK):
        chunk = keys[start : start + _CHUNK]
        marks = ", ".join("?" * len(chunk))
        # Ordered so that an all-mail entry ("") comes last and wins over the list's own.
        rows = conn.execute(
            f"SELECT {_COLUMNS} FROM suppressions WHERE address IN ({marks}) "  # noqa: S608
            "AND (list_id = '' OR list_id = ?) ORDER BY list_id DESC",
            (*chunk, list_id),
        ).fetchall()
        for row in rows:
            found[row[0]] = _row(row)
    return found


def _entries(
    conn: sqlite3.Connection, after: tuple[str, str] | None, limit: int
) -> list[Suppression]:
    after = after if after is not None else ("", "")
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM suppressions WHERE (address, list_id) > (?, ?) "  # noqa: S608
        "ORDER BY address, list_id LIMIT ?",
        (*after, max(0, limit)),
    ).fetchall()
    return [_row(row) for row in rows]


@implementer(ISuppressionList)
class SqliteSuppressionList:
    """The suppression list in a SQLite file (see the module docstring and the interface).

    Get one with :meth:`SqliteSuppressionList.open`; finish with :meth:`close`.
    """

    def __init__(self, db: SqliteThread[_Op]) -> None:
        """Use :meth:`SqliteSuppressionList.open`; this only wires an opened store thread."""
        self.path = db.path
        self._db = db

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        create: bool = True,
        clock: Callable[[], float] = time.time,
        reactor: Reactor | None = None,
        close_at_shutdown: bool = True,
    ) -> defer.Deferred[SqliteSuppressionList]:
        """Open the list in the file at ``path`` (a queue's file too), creating it (and its
        directory) unless ``create`` is false. Fails with :class:`SuppressionError` for a
        missing file (``create=False``), another kind of database, or a newer version.
        ``close_at_shutdown=False``: the caller closes it during reactor shutdown."""
        reactor = reactor if reactor is not None else default_reactor()
        name = os.fspath(path)
        d = SqliteThread.start(reactor, f"twistmail-suppression {name}", _connect, name, create)

        def opened(result: tuple[ThreadPool, sqlite3.Connection]) -> SqliteSuppressionList:
            pool, conn = result

            def commit(conn: sqlite3.Connection, ops: list[_Op]) -> list[Any]:
                return _run_group(conn, ops, clock())

            return cls(
                SqliteThread(
                    name,
                    conn,
                    pool,
                    reactor,
                    commit=commit,
                    closed=_closed,
                    close_at_shutdown=close_at_shutdown,
                )
            )

        return d.addCallback(opened)

    def add(self, entries: Sequence[Suppression]) -> defer.Deferred[int]:
        """Store the entries not there yet; fires with how many were new, once fsync'd."""
        try:
            ready = [checked(entry) for entry in entries]
        except SuppressionError:
            return defer.fail()
        return self._db.submit(lambda conn, now: _add(ready, conn, now))

    def remove(self, address: str, list_id: str | None = None) -> defer.Deferred[int]:
        """Remove ``address``'s entry for ``list_id`` (every entry when None); how many."""
        try:
            key, lists = removal(address, list_id)
        except SuppressionError:
            return defer.fail()
        return self._db.submit(lambda conn, now: _remove(key, lists, conn, now))

    def check(
        self, addresses: Iterable[str | Address], list_id: str = ""
    ) -> defer.Deferred[dict[str, Suppression]]:
        """The entries stopping mail on ``list_id`` to any of ``addresses``, by address."""
        try:
            keys, lists = lookup(addresses, list_id)
        except SuppressionError:
            return defer.fail()
        if not keys and not self._db.closing:
            return defer.succeed({})
        return self._db.read(_check, keys, lists)

    def entries(
        self, *, after: tuple[str, str] | None = None, limit: int = 1000
    ) -> defer.Deferred[list[Suppression]]:
        """Up to ``limit`` entries after ``after``, by (address, list id)."""
        return self._db.read(_entries, after, limit)

    def close(self) -> defer.Deferred[None]:
        """Commit what is pending, close the file and stop the thread; idempotent."""
        return self._db.close()


def _closed(text: str) -> SuppressionError:
    return SuppressionError(text)
