"""The suppression list in a PostgreSQL queue's schema (its ``suppressions`` table).

:class:`PostgresSuppressionList` provides :class:`~twistmail.interfaces.ISuppressionList` for
the relay and workers whose queue is PostgreSQL: every worker on every machine sees one list.
It opens its own connections (a small pool of its own threads, never the reactor thread) to
the queue's database and schema, preparing the schema as the queue does if it is new.

A statement that fails because the connection was lost is tried again on a new connection
(every operation is idempotent: an insert that is already there does nothing) with
exponential backoff, up to :data:`RETRIES` times.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from .._twisted import Reactor, default_reactor
from ..interfaces import ISuppressionList
from ..suppression.records import (
    Suppression,
    SuppressionError,
    checked,
    list_key,
    suppression_key,
)
from ..suppression.sqlite import keys_of
from ._postgres_db import RETRY_FIRST, RETRY_MAX, _Connections, _prepare, _retryable, _transaction
from .postgres import threads_defer
from .records import QueueError
from .url import DEFAULT_SCHEMA

try:  # an optional dependency: pip install 'twistmail[postgresql]'
    import psycopg
except ImportError:  # pragma: no cover - reported when opened
    psycopg = None  # type: ignore[assignment]

__all__ = ["RETRIES", "PostgresSuppressionList"]

RETRIES: Final = 8
"""Tries of one operation after a lost connection before it fails."""

_ADD = """
INSERT INTO suppressions (address, list_id, reason, detail, created_at)
SELECT address, list_id, reason, detail,
       coalesce(created_at, %(now)s::float8, extract(epoch from now()))
FROM unnest(%(addresses)s::text[], %(lists)s::text[], %(reasons)s::text[], %(details)s::text[],
            %(times)s::float8[]) AS t (address, list_id, reason, detail, created_at)
ON CONFLICT DO NOTHING
"""
# Ordered so that an all-mail entry ("") comes last and wins over the list's own.
_CHECK = """
SELECT address, reason, list_id, created_at, detail FROM suppressions
WHERE address = ANY(%s) AND list_id IN ('', %s) ORDER BY list_id DESC
"""
_ENTRIES = """
SELECT address, reason, list_id, created_at, detail FROM suppressions
WHERE (address, list_id) > (%s, %s) ORDER BY address, list_id LIMIT %s
"""

_Op = Callable[[Any, "float | None", bool], Any]


def _row(row: Sequence[Any]) -> Suppression:
    address, reason, list_id, created_at, detail = row
    return Suppression(address, reason, list_id, created_at, detail)


def _add(entries: list[Suppression], conn: Any, now: float | None, again: bool) -> int:
    if not entries:
        return 0
    cursor = conn.execute(
        _ADD,
        {
            "addresses": [e.address for e in entries],
            "lists": [e.list_id for e in entries],
            "reasons": [e.reason for e in entries],
            "details": [e.detail for e in entries],
            "times": [e.created_at for e in entries],
            "now": now,
        },
    )
    return int(cursor.rowcount)


def _remove(address: str, list_id: str | None, conn: Any, now: float | None, again: bool) -> int:
    if list_id is None:
        cursor = conn.execute("DELETE FROM suppressions WHERE address = %s", (address,))
    else:
        cursor = conn.execute(
            "DELETE FROM suppressions WHERE address = %s AND list_id = %s", (address, list_id)
        )
    return int(cursor.rowcount)


def _check(
    keys: list[str], list_id: str, conn: Any, now: float | None, again: bool
) -> dict[str, Suppression]:
    rows = conn.execute(_CHECK, (keys, list_id)).fetchall()
    return {row[0]: _row(row) for row in rows}


def _entries(
    after: tuple[str, str] | None, limit: int, conn: Any, now: float | None, again: bool
) -> list[Suppression]:
    after = after if after is not None else ("", "")
    rows = conn.execute(_ENTRIES, (*after, max(0, limit))).fetchall()
    return [_row(row) for row in rows]


@implementer(ISuppressionList)
class PostgresSuppressionList:
    """The suppression list of a PostgreSQL queue (see the module docstring and the interface).

    Get one with :meth:`PostgresSuppressionList.open`; finish with :meth:`close`.
    """

    def __init__(
        self,
        connections: _Connections,
        pool: ThreadPool,
        reactor: Reactor,
        clock: Callable[[], float] | None,
        where: str,
    ) -> None:
        """Use :meth:`PostgresSuppressionList.open`; this only wires an opened pool."""
        self.where = where
        self._connections = connections
        self._pool = pool
        self._reactor = reactor
        self._clock = clock
        self._closed = False
        self._pending: set[defer.Deferred[Any]] = set()
        self._stopped = False
        self._waiters: list[defer.Deferred[None]] | None = None
        self._trigger: object = reactor.addSystemEventTrigger("before", "shutdown", self._shutdown)

    @classmethod
    def open(
        cls,
        url: str,
        *,
        schema: str = DEFAULT_SCHEMA,
        threads: int = 2,
        clock: Callable[[], float] | None = None,
        connect_timeout: float = 10.0,
        reactor: Reactor | None = None,
    ) -> defer.Deferred[PostgresSuppressionList]:
        """Connect to the queue's database at ``url`` and ``schema`` (prepared as the queue
        prepares it when new). ``clock()`` replaces the server's ``now()`` (tests only).
        Fails with :class:`SuppressionError` (naming the server, never the password)."""
        from .postgres import describe_url

        if psycopg is None:
            return defer.fail(
                SuppressionError("PostgreSQL needs psycopg: pip install 'twistmail[postgresql]'")
            )
        reactor = reactor if reactor is not None else default_reactor()
        where = describe_url(url)
        connections = _Connections(url, schema, connect_timeout)
        pool = ThreadPool(minthreads=1, maxthreads=threads, name=f"twistmail-suppression {where}")
        pool.start()

        def prepare() -> None:
            _prepare(connections.get(), schema, where)

        def failed(failure: Failure) -> Failure:
            connections.close_all()
            pool.stop()
            if failure.check(QueueError) or (psycopg is not None and failure.check(psycopg.Error)):
                text = f"{where}: cannot use the suppression list ({failure.value})"
                raise SuppressionError(text)
            return failure

        d = threads_defer(reactor, pool, prepare)
        return d.addCallbacks(lambda _: cls(connections, pool, reactor, clock, where), failed)

    def add(self, entries: Sequence[Suppression]) -> defer.Deferred[int]:
        """Store the entries not there yet; fires with how many were new, once committed.

        After a lost connection the count may leave out entries the lost try stored."""
        try:
            ready = [checked(entry) for entry in entries]
        except SuppressionError:
            return defer.fail()
        return self._run(lambda conn, now, again: _add(ready, conn, now, again))

    def remove(self, address: str, list_id: str | None = None) -> defer.Deferred[int]:
        """Remove ``address``'s entry for ``list_id`` (every entry when None); how many."""
        try:
            key = suppression_key(address)
            lists = list_key(list_id) if list_id is not None else None
        except SuppressionError:
            return defer.fail()
        return self._run(lambda conn, now, again: _remove(key, lists, conn, now, again))

    def check(
        self, addresses: Iterable[str], list_id: str = ""
    ) -> defer.Deferred[dict[str, Suppression]]:
        """The entries stopping mail on ``list_id`` to any of ``addresses``, by address."""
        try:
            lists = list_key(list_id)
        except SuppressionError:
            return defer.fail()
        keys = keys_of(addresses)
        if not keys and not self._closed:
            return defer.succeed({})
        return self._run(lambda conn, now, again: _check(keys, lists, conn, now, again))

    def entries(
        self, *, after: tuple[str, str] | None = None, limit: int = 1000
    ) -> defer.Deferred[list[Suppression]]:
        """Up to ``limit`` entries after ``after``, by (address, list id)."""
        return self._run(lambda conn, now, again: _entries(after, limit, conn, now, again))

    def _run(self, op: _Op) -> defer.Deferred[Any]:
        if self._closed:
            return defer.fail(SuppressionError(f"{self.where}: the suppression list is closed"))
        d = defer.ensureDeferred(self._tries(op))
        self._pending.add(d)
        d.addBoth(self._settled, d)
        return d

    def _settled(self, value: object, d: defer.Deferred[Any]) -> object:
        self._pending.discard(d)
        return value

    async def _tries(self, op: _Op) -> Any:
        delay, backend = RETRY_FIRST, []  # type: ignore[var-annotated]
        for attempt in range(RETRIES + 1):
            now = self._clock() if self._clock is not None else None
            try:
                return await threads_defer(
                    self._reactor,
                    self._pool,
                    _transaction,
                    self._connections,
                    op,
                    now,
                    attempt > 0,
                    backend,
                )
            except Exception as e:
                if self._closed or attempt == RETRIES or not _retryable(e):
                    if psycopg is not None and isinstance(e, psycopg.Error):
                        raise SuppressionError(f"{self.where}: {str(e).strip()}") from None
                    raise
            await task.deferLater(IReactorTime(self._reactor), delay, lambda: None)
            delay = min(RETRY_MAX, delay * 2)
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> defer.Deferred[None]:
        """Let running statements finish, close the connections, stop the threads; idempotent."""
        if self._stopped:
            return defer.succeed(None)
        if self._waiters is None:
            self._waiters = []
            self._closed = True
            if self._trigger is not None:
                trigger, self._trigger = self._trigger, None
                self._reactor.removeSystemEventTrigger(trigger)
            running = defer.DeferredList(list(self._pending), consumeErrors=True)
            pool, connections = self._pool, self._connections

            def stop() -> None:
                pool.stop()
                connections.close_all()

            def stopped(_: object) -> None:
                self._stopped = True
                waiters, self._waiters = self._waiters or [], []
                for waiter in waiters:
                    waiter.callback(None)

            # Joined on a thread of the reactor's own pool: never on the reactor thread.
            running.addCallback(
                lambda _: threads_defer(
                    self._reactor, IReactorThreads(self._reactor).getThreadPool(), stop
                )
            ).addBoth(stopped)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._waiters.append(waiter)
        return waiter

    def _shutdown(self) -> defer.Deferred[None]:
        self._trigger = None  # firing: removing it now would make Twisted warn
        return self.close()
