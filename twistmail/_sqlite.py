"""A SQLite database used from the reactor thread, with all its work on one thread of its own.

Both SQLite stores (the campaign journal and the queue) are built on :class:`SqliteThread`: it
owns the connection and its one-thread pool, runs each store's functions there in submission
order, commits writes in groups (:class:`ThreadGroups`: writes made while a commit runs all go
into the next transaction, which the thread starts as soon as the previous one is committed),
closes on request or at reactor shutdown, and fails reads and writes once closing has begun.
The stores keep only their SQL and their durability level (:func:`configure`).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Generic, Literal, TypeVar

from twisted.internet import defer, threads
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from ._onethread import OneThread
from ._twisted import Reactor
from .groupcommit import answer_group

__all__ = [
    "OneThread",
    "SqliteThread",
    "Synchronous",
    "ThreadGroups",
    "configure",
    "connect",
    "open_store",
    "read_settings",
    "transaction",
]

Synchronous = Literal["NORMAL", "FULL"]

_T = TypeVar("_T")
_Item = TypeVar("_Item")


# Functions that run on a store's thread. -----------------------------------------------------


def connect(path: str, *, busy_timeout: float) -> sqlite3.Connection:
    """A connection that leaves transactions to us and waits ``busy_timeout`` s for locks."""
    # isolation_level=None: we issue BEGIN/COMMIT ourselves, so one group is one transaction.
    # check_same_thread=False: opened on the store's thread, closed there too, but the pool's
    # thread objects are not promised to be the same one across a ThreadPool's life.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
    except BaseException:
        conn.close()
        raise
    return conn


def configure(
    conn: sqlite3.Connection,
    synchronous: Synchronous,
    fail: Callable[[str], Exception],
) -> None:
    """Switch ``conn``'s file to WAL mode and set its ``synchronous`` level.

    WAL: a commit is one sequential append to the ``-wal`` file, and readers never block the
    writer. ``NORMAL`` writes each commit to the WAL before it returns (it survives the process
    being killed); ``FULL`` also fsyncs it (it survives a power loss). ``fail(text)`` makes the
    store's own error when WAL is not available.
    """
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise fail(f"SQLite could not use WAL mode here (got {mode!r})")
    conn.execute(f"PRAGMA synchronous = {synchronous}")


def open_store(
    path: str,
    *,
    name: str,
    check: Callable[[sqlite3.Connection], None],
    synchronous: Synchronous,
    error: Callable[[str], Exception],
    pragmas: tuple[str, ...] = (),
) -> sqlite3.Connection:
    """A connection to the store file at ``path``: its schema made or checked by ``check`` in
    one write transaction, then (the file known to be the store's, so another database is left
    as it was) WAL, ``synchronous`` and ``pragmas``. Failures are ``error(text)`` naming the
    file and the store's ``name`` ("spool", "suppression list")."""
    try:
        conn = connect(path, busy_timeout=10)
    except sqlite3.Error as e:
        raise error(f"{path}: cannot open the {name} ({e})") from e
    try:
        with transaction(conn):
            check(conn)
        configure(conn, synchronous, lambda text: error(f"{path}: {text}"))
        for pragma in pragmas:
            conn.execute(f"PRAGMA {pragma}")
    except sqlite3.DatabaseError as e:
        conn.close()
        raise error(f"{path}: not a twistmail {name} ({e})") from e
    except BaseException:
        conn.close()
        raise
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction (``BEGIN IMMEDIATE``), rolled back on any error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def read_settings(conn: sqlite3.Connection) -> tuple[str, int]:
    """``(journal_mode, synchronous)`` of ``conn`` (synchronous: 1 is NORMAL, 2 is FULL)."""
    mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    synchronous = conn.execute("PRAGMA synchronous").fetchone()[0]
    return str(mode), int(synchronous)


# The reactor-side objects. --------------------------------------------------------------------


class ThreadGroups(Generic[_Item]):
    """Writes committed in groups on a store's one thread, the next group taken by the thread.

    :meth:`submit` queues an item; the thread commits everything queued when it gets to it as
    one group (``commit(items)`` returns one result per item, or raises to fail the whole group)
    and, once that group is committed, takes what was queued meanwhile as the next group at
    once: the group's results go back to the reactor while the next group commits. (A group
    handed to the thread only once the reactor has seen the previous group's results waits for
    two thread hand-offs in between: about 0.3 ms per group here, as long as the group's own
    SQL.) Other jobs given to the pool between two groups run between them, in order; and
    what a group's waiters do when it is answered (a write, then a read of what was written
    so far, as the HTTP API's retry does) keeps its order of old: their reads run before
    the writes they submitted.

    :ivar commits: groups committed so far.
    """

    def __init__(
        self,
        pool: ThreadPool,
        threads: IReactorFromThreads,
        commit: Callable[[list[_Item]], list[Any]],
    ) -> None:
        self.commits = 0
        self._pool = pool
        self._threads = threads
        self._commit = commit
        self._lock = threading.Lock()
        self._queued: list[tuple[_Item, defer.Deferred[Any]]] = []  # under _lock
        self._taking = False  # under _lock: a _take job is queued on the thread, or running
        self._answering = False  # reactor thread only: a group's waiters are being fired
        self._held: list[tuple[_Item, defer.Deferred[Any]]] = []  # submitted while answering
        self._waiting = 0  # reactor thread only: items submitted and not yet answered
        self._idle_waiters: list[defer.Deferred[None]] = []

    def submit(self, item: _Item) -> defer.Deferred[Any]:
        """Queue ``item`` for the next group; fires with its result once committed."""
        waiter: defer.Deferred[Any] = defer.Deferred()
        self._waiting += 1
        if self._answering:
            self._held.append((item, waiter))
            return waiter
        self._queue([(item, waiter)])
        return waiter

    def _queue(self, items: list[tuple[_Item, defer.Deferred[Any]]]) -> None:
        with self._lock:
            self._queued.extend(items)
            start = not self._taking
            self._taking = True
        if start:
            self._pool.callInThread(self._take)

    def idle(self) -> defer.Deferred[None]:
        """Fires once nothing is queued or being committed."""
        if not self._waiting:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._idle_waiters.append(d)
        return d

    def _take(self) -> None:
        """On the thread: commit what is queued as one group; come back for the next."""
        with self._lock:
            group, self._queued = self._queued, []
        try:
            results: list[Any] | Failure = self._commit([item for item, _ in group])
        except BaseException:
            results = Failure()
        with self._lock:
            again = self._taking = bool(self._queued)
        if again:
            # Behind any other job queued meanwhile (a read waits one group at most).
            self._pool.callInThread(self._take)
        self._threads.callFromThread(self._answer, group, results)

    def _answer(self, group: list[tuple[_Item, defer.Deferred[Any]]], results: Any) -> None:
        self._waiting -= len(group)
        # Writes the waiters submit are held until every waiter has run, so that the reads
        # they submit meanwhile run first (even if the thread is busy with another group).
        self._answering = True
        try:
            if not isinstance(results, Failure):
                self.commits += 1
            answer_group([waiter for _, waiter in group], results)
        finally:
            self._answering = False
        if self._held:
            held, self._held = self._held, []
            self._queue(held)
        if not self._waiting:
            idle, self._idle_waiters = self._idle_waiters, []
            for notify in idle:
                notify.callback(None)


class SqliteThread(Generic[_Item]):
    """One open SQLite connection and the single thread all its work runs on.

    Writes are items of the store's own kind, committed in groups by ``commit(conn, items)``
    (which returns one result per item, or raises to fail the whole group). ``closed(text)``
    makes the store's error for work asked of it once :meth:`close` was called.
    ``after_close`` runs on the thread once the connection is closed (e.g. to drop a lock).
    """

    def __init__(
        self,
        path: str,
        conn: sqlite3.Connection,
        pool: ThreadPool,
        reactor: Reactor,
        *,
        commit: Callable[[sqlite3.Connection, list[_Item]], list[Any]],
        closed: Callable[[str], Exception],
        before_close: Callable[[sqlite3.Connection], None] | None = None,
        after_close: Callable[[], None] | None = None,
        close_at_shutdown: bool = True,
    ) -> None:
        """Use :meth:`start` to get a running ``pool`` and the connection opened on it.

        ``before_close(conn)`` runs on the thread after the last write, before the connection
        closes (which it does even if ``before_close`` fails).

        ``close_at_shutdown=False``: the owner closes it itself during reactor shutdown (after
        its own last writes), so no shutdown trigger closes it first.
        """
        self.path = path
        self._conn = conn
        self._pool = pool
        self._reactor = reactor
        self._threads = IReactorFromThreads(reactor)
        self._closed_error = closed
        self._before_close = before_close
        self._after_close = after_close
        self._group: ThreadGroups[_Item] = ThreadGroups(
            pool, self._threads, lambda items: commit(self._conn, items)
        )
        self._closing: list[defer.Deferred[None]] | None = None  # None until close()
        self._closed = False
        self._close_failure: Failure | None = None
        self._trigger: object = (
            reactor.addSystemEventTrigger("before", "shutdown", self._close_at_shutdown)
            if close_at_shutdown
            else None
        )

    @staticmethod
    def start(
        reactor: Reactor, name: str, opening: Callable[..., _T], *args: Any
    ) -> defer.Deferred[tuple[ThreadPool, _T]]:
        """Start a one-thread pool called ``name`` and run ``opening(*args)`` on it.

        Fires with the running pool and what ``opening`` returned (typically the connection);
        if ``opening`` fails, the pool is stopped and the Deferred fails likewise.
        """
        pool = OneThread(name)
        pool.start()
        d = threads.deferToThreadPool(IReactorFromThreads(reactor), pool, opening, *args)

        def failed(failure: Failure) -> Failure:
            pool.stop()
            return failure

        return d.addCallbacks(lambda result: (pool, result), failed)

    @property
    def closing(self) -> bool:
        """Whether :meth:`close` has been called (or the reactor began shutting down)."""
        return self._closing is not None

    @property
    def commits(self) -> int:
        """Write transactions committed so far (one per group)."""
        return self._group.commits

    def submit(self, item: _Item) -> defer.Deferred[Any]:
        """Queue ``item`` for the next group commit; fires with its result once committed."""
        if self._closing is not None:
            return defer.fail(self._closed_error(f"{self.path}: write after close()"))
        return self._group.submit(item)

    def read(self, function: Callable[..., _T], *args: Any) -> defer.Deferred[_T]:
        """Run ``function(conn, *args)`` on the thread; it sees every commit made before it."""
        if self._closing is not None:
            return defer.fail(self._closed_error(f"{self.path}: read after close()"))
        return self._in_thread(function, self._conn, *args)

    def run(self, function: Callable[..., _T], *args: Any) -> defer.Deferred[_T]:
        """Like :meth:`read`, for the store's own multi-step work (checks nothing)."""
        return self._in_thread(function, self._conn, *args)

    def settings(self) -> defer.Deferred[tuple[str, int]]:
        """``(journal_mode, synchronous)`` of this connection (1 is NORMAL, 2 is FULL)."""
        return self.read(read_settings)

    def close(self) -> defer.Deferred[None]:
        """Commit what is queued, close the connection and stop the thread; idempotent.

        Every call returns a Deferred firing once closed (or failing as closing failed).
        """
        if self._closing is None:
            self._closing = []
            if self._trigger is not None:
                self._reactor.removeSystemEventTrigger(self._trigger)
                self._trigger = None

            def close_connection(_: None) -> defer.Deferred[None]:
                return self._in_thread(self._close_connection)

            def stop_pool(result: Failure | None) -> None:
                # The only thread is idle now, so stopping (joining) it takes no time.
                self._pool.stop()
                self._closed = True
                self._close_failure = result
                waiters, self._closing = self._closing or [], []
                for waiter in waiters:
                    self._fire_closed(waiter)

            self._group.idle().addCallback(close_connection).addBoth(stop_pool)
        waiter: defer.Deferred[None] = defer.Deferred()
        if self._closed:
            self._fire_closed(waiter)
        else:
            self._closing.append(waiter)
        return waiter

    def _close_connection(self) -> None:
        try:
            try:
                if self._before_close is not None:
                    self._before_close(self._conn)
            finally:
                self._conn.close()
        finally:
            if self._after_close is not None:
                self._after_close()

    def _close_at_shutdown(self) -> defer.Deferred[None]:
        # This trigger is firing: removing it now would make Twisted warn (and later raise).
        self._trigger = None
        return self.close()

    def _fire_closed(self, waiter: defer.Deferred[None]) -> None:
        if self._close_failure is None:
            waiter.callback(None)
        else:
            waiter.errback(self._close_failure)

    def _in_thread(self, function: Callable[..., _T], *args: Any) -> defer.Deferred[_T]:
        return threads.deferToThreadPool(self._threads, self._pool, function, *args)
