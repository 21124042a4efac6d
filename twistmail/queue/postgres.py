"""The PostgreSQL queue: one queue shared by any number of workers on any number of machines.

:class:`PostgresQueue` provides :class:`~twistmail.interfaces.IQueue` on a PostgreSQL database
(``postgresql://user@host:port/db``), through psycopg 3. Nothing home-made coordinates the
workers: PostgreSQL's row locks, ``SKIP LOCKED``, transactions and ``LISTEN/NOTIFY`` do.

Tables live in one schema (``twistmail`` unless another is given), created on first use under
an advisory lock and versioned in its ``meta`` table: an older version is migrated in place,
a newer one refused with a message saying so.

Claims: one transaction takes up to ``limit`` due messages with ``SELECT ... FOR UPDATE SKIP
LOCKED`` (two workers never wait for, or take, the same row) and sets ``state='sending'``, the
owner, ``lease_until`` and the next fencing number. An outcome is written only with the
claim's owner and fencing number, so a worker whose lease expired and was taken over can
never overwrite the outcome of the worker that took over.

Time: due times and leases are seconds since the epoch on the database server's clock
(``now()``), never a worker's, unless a ``clock`` is given (for tests).

Threading: every statement runs on a thread of the queue's own pool (one connection a
thread), never on the reactor thread. A transaction that fails because the connection was
lost (server restart, network cut) or by a serialization failure is tried again, on a new
connection, with exponential backoff, for ever until :meth:`PostgresQueue.close`. A commit
whose answer was lost is recognised when tried again: an enqueue is found by its batch token
(not stored twice) and an outcome by its fencing number (reported recorded, never sent twice);
a keyed enqueue by its batch token too, a retry or cancel by its token in ``claim``.

Idempotency keys (:meth:`PostgresQueue.enqueue_once`) live in the ``idempotency`` table,
inserted in the message's transaction; requests with one key are serialised by a
transaction-scoped advisory lock on it, so many workers sending it at once queue it once.

Wake-ups: each enqueue sends ``NOTIFY`` on the schema's channel; :meth:`PostgresQueue.notified`
fires on the next one (from any process), so an idle worker waits on it and on
:meth:`~twistmail.interfaces.IQueue.next_due`, never on a fixed poll.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from twisted.internet import defer, threads
from twisted.internet.interfaces import IDelayedCall, IReactorFromThreads, IReactorThreads
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from .._twisted import Reactor, default_reactor
from ..groupcommit import GroupCommit
from ..interfaces import IQueue
from ..message import Envelope
from . import _postgres_campaigns
from ._postgres_db import (
    RETRY_FIRST,
    RETRY_MAX,
    SCHEMA_VERSION,
    _claim,
    _Connections,
    _insert,
    _listen,
    _next_due,
    _oldest_waiting,
    _Op,
    _prepare,
    _queued_at,
    _record,
    _release,
    _renew,
    _retryable,
    _summary,
    _transaction,
    _unsent,
    _wait_notify,
    describe_url,
    give_domain_slots,
    renew_domain_slots,
    reserve_slots,
    take_domain_slots,
)
from ._postgres_status import (
    bounce_recipient,
    cancel_message,
    insert_once,
    list_messages,
    one_message,
    overview,
    retry_message,
)
from .campaigns import CampaignRenderer
from .records import (
    ClaimedMessage,
    Idempotent,
    MessageStatus,
    Outcome,
    QueueError,
    QueueOverview,
    QueueRow,
    QueueSummary,
)

try:  # an optional dependency: pip install 'twistmail[postgresql]'
    import psycopg
except ImportError:  # pragma: no cover - reported when a PostgreSQL queue is opened
    psycopg = None  # type: ignore[assignment]

__all__ = ["SCHEMA_VERSION", "PostgresQueue", "describe_url"]

log = Logger()

_T = TypeVar("_T")


# The reactor-side object. ---------------------------------------------------------------------


@implementer(IQueue)
class PostgresQueue(_postgres_campaigns.Campaigns):
    """The queue in a PostgreSQL database, used from the reactor thread (see :class:`IQueue`).

    Get one with :meth:`PostgresQueue.open`; finish with :meth:`close`.
    """

    def __init__(
        self,
        connections: _Connections,
        pool: ThreadPool,
        reactor: Reactor,
        clock: Callable[[], float] | None,
        where: str,
        close_at_shutdown: bool = True,
    ) -> None:
        """Use :meth:`PostgresQueue.open`; this only wires an opened pool."""
        self.where = where
        self._connections = connections
        self._pool = pool
        self._reactor = reactor
        self._threads = IReactorFromThreads(reactor)
        self._clock = clock
        self._closed = False
        self._pending: set[defer.Deferred[Any]] = set()
        self._timers: dict[IDelayedCall, defer.Deferred[Any] | None] = {}
        self._channel = f"twistmail_queue_{connections.schema}"[:63]
        self._waiters: list[defer.Deferred[None]] = []
        self._listener: psycopg.Connection[Any] | None = None
        self._listen_pool: ThreadPool | None = None
        self._listen_delay = RETRY_FIRST
        self._renderer = CampaignRenderer()
        self.retries = 0
        """Transactions tried again after a lost connection (or a serialization failure)."""
        self._trigger: object = (
            reactor.addSystemEventTrigger("before", "shutdown", self._close_at_shutdown)
            if close_at_shutdown
            else None
        )
        # Enqueues asked for while one commits go together in the next transaction: one
        # commit (one WAL flush) for many submissions, and one thread, leaving the others to
        # claims and outcomes.
        self._enqueues: GroupCommit[list[Envelope]] = GroupCommit(self._insert_group)

    @classmethod
    def open(
        cls,
        url: str,
        *,
        schema: str = "twistmail",
        threads: int = 4,
        clock: Callable[[], float] | None = None,
        connect_timeout: float = 10.0,
        reactor: Reactor | None = None,
        close_at_shutdown: bool = True,
    ) -> defer.Deferred[PostgresQueue]:
        """Connect to the database at ``url`` and prepare ``schema`` (created if missing).

        ``threads`` connections run the queue's statements. ``clock()`` replaces the server's
        ``now()`` (tests only). ``close_at_shutdown=False`` leaves closing to the caller during
        reactor shutdown (a service that records outcomes while it stops).
        Fails with :class:`QueueError` (naming the server, never the
        password) when the server cannot be reached, or the schema holds something else or a
        newer queue.
        """
        if psycopg is None:
            return defer.fail(
                QueueError("a PostgreSQL queue needs psycopg: pip install 'twistmail[postgresql]'")
            )
        reactor = reactor if reactor is not None else default_reactor()
        where = describe_url(url)
        connections = _Connections(url, schema, connect_timeout)
        pool = ThreadPool(minthreads=1, maxthreads=threads, name=f"twistmail-queue {where}")
        pool.start()

        def prepare() -> None:
            conn = connections.get()
            _prepare(conn, schema, where)
            _postgres_campaigns.prepare(conn, schema)

        d = threads_defer(reactor, pool, prepare)

        def opened(_: None) -> PostgresQueue:
            return cls(connections, pool, reactor, clock, where, close_at_shutdown)

        def failed(failure: Failure) -> Failure:
            connections.close_all()
            pool.stop()
            if failure.check(QueueError):
                return failure
            if psycopg is not None and failure.check(psycopg.Error):
                raise QueueError(f"{where}: cannot use the queue ({failure.value})")
            return failure

        return d.addCallbacks(opened, failed)

    # The contract ---------------------------------------------------------------------------

    def enqueue(self, envelopes: Sequence[Envelope]) -> defer.Deferred[list[int]]:
        """Store ``envelopes`` as ``queued``, due now; fires with their ids once committed
        (durable: the queue's connections commit with ``synchronous_commit`` on)."""
        if self._closed:
            return defer.fail(QueueError(f"{self.where}: the queue is closed"))
        return self._enqueues.submit(list(envelopes))

    def _insert_group(self, batches: list[list[Envelope]]) -> defer.Deferred[list[Any]]:
        """One transaction storing every batch of a group; fires with each batch's ids."""
        envelopes = [env for batch in batches for env in batch]
        token, channel = uuid.uuid4(), self._channel

        def split(ids: list[int]) -> list[list[int]]:
            out, start = [], 0
            for batch in batches:
                out.append(ids[start : start + len(batch)])
                start += len(batch)
            return out

        return self._run(
            lambda conn, now, again: _insert(envelopes, token, channel, conn, now, again)
        ).addCallback(split)

    @property
    def commits(self) -> int:
        """Enqueue transactions committed so far (one per group of enqueues)."""
        return self._enqueues.commits

    def settings(self) -> defer.Deferred[str]:
        """The ``synchronous_commit`` setting of the queue's connections (never ``off``)."""

        def show(conn: psycopg.Connection[Any], now: float | None, again: bool) -> str:
            row = conn.execute("SHOW synchronous_commit").fetchone()
            assert row is not None
            return str(row[0])

        return self._run(show)

    def enqueue_once(
        self, scope: str, key: str, fingerprint: str, envelope: Envelope, *, keep: float = 86400.0
    ) -> defer.Deferred[Idempotent]:
        """Store ``envelope`` unless ``key`` was used in ``scope`` (see IQueue); the key and
        the message are committed in one transaction."""
        token, channel = uuid.uuid4(), self._channel
        return self._run(
            lambda conn, now, again: insert_once(
                scope, key, fingerprint, envelope, keep, token, channel, conn, now, again
            )
        )

    def claim(
        self, owner: str, limit: int, *, lease: float
    ) -> defer.Deferred[list[ClaimedMessage]]:
        """Take up to ``limit`` due messages for ``owner`` for ``lease`` seconds (see IQueue)."""
        token, renderer = uuid.uuid4(), self._renderer
        return self._run(
            lambda conn, now, again: _postgres_campaigns.render(
                _claim(owner, limit, lease, token, conn, now, again), conn, now, renderer
            )
        )

    def record(self, owner: str, outcome: Outcome) -> defer.Deferred[bool]:
        """Write an attempt's outcome unless ``owner`` lost the claim; False if it did."""
        return self._run(lambda conn, now, again: _record(owner, outcome, conn, now, again))

    def release(self, owner: str, claimed: Sequence[ClaimedMessage]) -> defer.Deferred[int]:
        """Give back claims not attempted (no attempt counted); fires with how many."""
        claims = [(c.id, c.fence) for c in claimed]
        return self._run(lambda conn, now, again: _release(owner, claims, conn, now, again))

    def renew(self, owner: str, lease: float) -> defer.Deferred[int]:
        """Extend every lease ``owner`` holds to ``lease`` seconds from now; fires with how many."""
        return self._run(lambda conn, now, again: _renew(owner, lease, conn, now, again))

    def retry(self, message: int) -> defer.Deferred[str]:
        """Put failed message ``message`` back in the queue (see IQueue)."""
        token, channel = uuid.uuid4(), self._channel
        return self._run(
            lambda conn, now, again: retry_message(message, token, channel, conn, now, again)
        )

    def cancel(self, message: int, reason: str) -> defer.Deferred[str]:
        """Fail message ``message`` if it is queued or deferred (see IQueue)."""
        token = uuid.uuid4()
        return self._run(
            lambda conn, now, again: cancel_message(message, reason, token, conn, now, again)
        )

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
        return self._run(
            lambda conn, now, again: bounce_recipient(
                message, position, failed, code, response, enhanced, conn, now
            )
        )

    def message(self, message: int) -> defer.Deferred[MessageStatus | None]:
        """Message ``message`` with its recipients' states; None if there is none."""
        return self._run(lambda conn, now, again: one_message(message, conn, now, again))

    def messages(
        self, state: str | None = None, *, after: int = 0, limit: int = 100
    ) -> defer.Deferred[list[MessageStatus]]:
        """Up to ``limit`` messages with an id above ``after`` (in ``state``), by id."""
        return self._run(
            lambda conn, now, again: list_messages(state, after, limit, conn, now, again)
        )

    def next_due(self) -> defer.Deferred[float | None]:
        """Seconds until the earliest waiting message is due: 0.0 if now, None if none waits."""
        return self._run(_next_due)

    def overview(self, failures: int = 10) -> defer.Deferred[QueueOverview]:
        """Counts, the oldest message not settled and the last ``failures`` failed ones."""
        return self._run(lambda conn, now, again: overview(failures, conn, now, again))

    def summary(self) -> defer.Deferred[QueueSummary]:
        """Counts by state, and how many messages are due, held or with an expired lease."""
        return self._run(_summary)

    def unsent(self, limit: int = 20) -> defer.Deferred[list[QueueRow]]:
        """The first ``limit`` messages not sent, with their recipients' states."""
        return self._run(lambda conn, now, again: _unsent(limit, conn, now, again))

    def queued_at(self, message: int) -> defer.Deferred[float | None]:
        """When message ``message`` was enqueued (the queue's clock); None if there is none."""
        return self._run(lambda conn, now, again: _queued_at(message, conn, now, again))

    def oldest_waiting(self) -> defer.Deferred[float | None]:
        """When the oldest message not yet sent or failed was enqueued; None if none waits."""
        return self._run(_oldest_waiting)

    def reserve_slots(
        self, name: str, count: int, interval: float
    ) -> defer.Deferred[tuple[float, float]]:
        """``count`` sending slots ``interval`` seconds apart on the shared schedule ``name``
        (``--rate``, kept for every worker of this queue): fires with ``(first, now)`` on the
        database's clock (see :class:`~twistmail.ratelimit.SharedRate`). Slots are never
        handed out twice, and a retry after a lost answer at worst skips a few."""
        return self._run(
            lambda conn, now, again: reserve_slots(name, count, interval, conn, now, again)
        )

    def take_domain_slots(
        self, holder: str, domain: str, count: int, *, cap: int, lease: float
    ) -> defer.Deferred[int]:
        """Up to ``count`` in-flight slots of ``domain`` for ``holder`` (``--per-domain``
        shared by every worker: ``cap`` held by all together) for ``lease`` seconds unless
        renewed; fires with how many it got."""
        return self._run(
            lambda conn, now, again: take_domain_slots(
                holder, domain, count, cap, lease, conn, now, again
            )
        )

    def give_domain_slots(self, holder: str, domain: str, count: int) -> defer.Deferred[int]:
        """Hand back ``count`` of ``holder``'s slots of ``domain``."""
        return self._run(
            lambda conn, now, again: give_domain_slots(holder, domain, count, conn, now, again)
        )

    def renew_domain_slots(self, holder: str, lease: float) -> defer.Deferred[int]:
        """Keep every slot of ``holder`` ``lease`` more seconds."""
        return self._run(
            lambda conn, now, again: renew_domain_slots(holder, lease, conn, now, again)
        )

    # Wake-ups -------------------------------------------------------------------------------

    def notified(self) -> defer.Deferred[None]:
        """Fires at the next enqueue into this queue, by any process (or after the listening
        connection was lost and made again: something may have come meanwhile)."""
        if self._closed:
            return defer.fail(QueueError(f"{self.where}: the queue is closed"))
        waiter: defer.Deferred[None] = defer.Deferred(lambda d: self._waiters.remove(d))
        self._waiters.append(waiter)
        if self._listen_pool is None:
            self._listen_pool = ThreadPool(1, 1, name=f"twistmail-listen {self.where}")
            self._listen_pool.start()
            self._relisten()
        return waiter

    def _wake_waiters(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _relisten(self) -> None:
        if self._closed:
            return
        assert self._listen_pool is not None
        d = threads_defer(
            self._reactor, self._listen_pool, _listen, self._connections, self._channel
        )

        def listening(conn: psycopg.Connection[Any]) -> None:
            if self._closed:
                conn.close()
                return
            self._listener = conn
            self._listen_delay = RETRY_FIRST
            self._wake_waiters()  # an enqueue may have come while nobody listened
            self._wait()

        d.addCallbacks(listening, self._listen_failed)

    def _wait(self) -> None:
        if self._closed or self._listener is None:
            return
        assert self._listen_pool is not None
        d = threads_defer(self._reactor, self._listen_pool, _wait_notify, self._listener, 0.5)

        def heard(count: int) -> None:
            if count:
                self._wake_waiters()
            self._wait()

        d.addCallbacks(heard, self._listen_failed)

    def _listen_failed(self, failure: Failure) -> None:
        if self._closed:
            return
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        log.warn(
            "listening for new messages in {where} failed, again in {delay:g} s: {error}",
            where=self.where,
            delay=self._listen_delay,
            error=str(failure.value),
        )
        self._later(self._listen_delay, self._relisten)
        self._listen_delay = min(RETRY_MAX, self._listen_delay * 2)

    # Running transactions -------------------------------------------------------------------

    def _run(self, op: _Op) -> defer.Deferred[Any]:
        if self._closed:
            return defer.fail(QueueError(f"{self.where}: the queue is closed"))
        result: defer.Deferred[Any] = defer.Deferred()
        self._pending.add(result)
        result.addBoth(self._settled, result)
        self._try(op, result, again=False, delay=RETRY_FIRST)
        return result

    def _settled(self, value: object, d: defer.Deferred[Any]) -> object:
        self._pending.discard(d)
        return value

    def _try(
        self,
        op: _Op,
        result: defer.Deferred[Any],
        *,
        again: bool,
        delay: float,
        backend: list[Any] | None = None,
    ) -> None:
        if result.called:
            return  # failed by close()
        now = self._clock() if self._clock is not None else None
        backend = [] if backend is None else backend
        attempt = threads_defer(
            self._reactor, self._pool, _transaction, self._connections, op, now, again, backend
        )

        def failed(failure: Failure) -> None:
            if result.called:
                return
            if self._closed or not _retryable(failure.value):  # type: ignore[arg-type]
                result.errback(failure)
                return
            self.retries += 1
            log.warn(
                "the queue's database {where} failed, trying again in {delay:g} s: {error}",
                where=self.where,
                delay=delay,
                error=str(failure.value).strip(),
            )
            self._later(
                delay,
                lambda: self._try(
                    op, result, again=True, delay=min(RETRY_MAX, delay * 2), backend=backend
                ),
                result,
            )

        attempt.addCallbacks(
            lambda value: None if result.called else result.callback(value), failed
        )

    def _later(
        self, delay: float, call: Callable[[], None], waiting: defer.Deferred[Any] | None = None
    ) -> None:
        """``call()`` in ``delay`` seconds, unless closed first (``waiting`` then fails)."""

        def fire() -> None:
            del self._timers[timer]
            call()

        timer = self._reactor.callLater(delay, fire)
        self._timers[timer] = waiting

    # Lifecycle ------------------------------------------------------------------------------

    def close(self) -> defer.Deferred[None]:
        """Let statements running finish, fail what waits to be tried again, close every
        connection and stop the threads; idempotent."""
        if self._closed:
            return self._when_closed()
        self._closed = True
        self._closed_waiters: list[defer.Deferred[None]] = []
        self._done = False
        if self._trigger is not None:
            trigger, self._trigger = self._trigger, None
            self._reactor.removeSystemEventTrigger(trigger)
        for timer, waiting in list(self._timers.items()):
            if timer.active():
                timer.cancel()
            if waiting is not None and not waiting.called:
                waiting.errback(QueueError(f"{self.where}: the queue was closed"))
        self._timers.clear()
        for waiter in list(self._waiters):
            waiter.cancel()
        listener, self._listener = self._listener, None
        listen_pool, self._listen_pool = self._listen_pool, None
        pool = self._pool

        def stop() -> None:
            if listen_pool is not None:
                listen_pool.stop()  # its thread waits at most 0.5 s for a notification
            if listener is not None:
                listener.close()
            pool.stop()
            self._connections.close_all()

        def stopped(_: object) -> None:
            self._done = True
            waiters, self._closed_waiters = self._closed_waiters, []
            for waiter in waiters:
                waiter.callback(None)

        running = [d for d in self._pending if not d.called]
        gathered = defer.DeferredList(running, consumeErrors=True)
        # Joined on a thread of the reactor's own pool: never on the reactor thread.
        gathered.addCallback(
            lambda _: threads.deferToThreadPool(
                self._threads, IReactorThreads(self._reactor).getThreadPool(), stop
            )
        ).addBoth(stopped)
        return self._when_closed()

    def _close_at_shutdown(self) -> defer.Deferred[None]:
        self._trigger = None  # firing: removing it now would make Twisted warn
        return self.close()

    def _when_closed(self) -> defer.Deferred[None]:
        if self._done:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._closed_waiters.append(waiter)
        return waiter


def threads_defer(
    reactor: Reactor, pool: ThreadPool, function: Callable[..., _T], *args: Any
) -> defer.Deferred[_T]:
    """``function(*args)`` on ``pool``; the Deferred fires on the reactor thread."""
    return threads.deferToThreadPool(IReactorFromThreads(reactor), pool, function, *args)
