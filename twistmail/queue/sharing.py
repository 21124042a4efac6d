"""How the long-running deliverers of one queue (relays, workers) share it, as its store decides.

:func:`deliverers_for` gives, for a queue URL, the :class:`Deliverers` of its store; a relay
uses nothing else to start delivering, so it never asks which store it has:

- **A SQLite file** (:class:`OneDeliverer`) has one deliverer at a time: :meth:`hold` takes the
  file's ``PATH.deliver.lock`` (``flock``; the kernel drops it when the process dies, so a lock
  found free means every earlier holder is dead), :meth:`recover` gives back at once the claims
  those dead holders left (``take_back``), and :meth:`watch` wakes the deliverer when another
  process commits to the file (its write-ahead log changes; Linux's inotify).
- **A PostgreSQL database** (:class:`ManyDeliverers`) has any number, on any machines:
  :meth:`hold` takes nothing, :meth:`recover` gives nothing back (a dead deliverer's claims
  return to the others when their lease runs out; the fencing number keeps its late outcomes
  out), and :meth:`watch` wakes the deliverer on ``NOTIFY`` (any process's enqueue).

Each also gives the messages-per-second limit of ``--rate``: the local token bucket for one
deliverer, a bucket kept in the database for many (:mod:`twistmail.queue.shared_rate`).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from .._sqlite import Synchronous
from .._twisted import Reactor
from ..ratelimit import DomainLimiter, SharedDomainLimiter, SharedRate, TokenBucket
from .records import QueueError
from .url import open_queue, parse_queue_url

if TYPE_CHECKING:
    from ..interfaces import IQueue
    from ..smtp._protocol import Throttle

__all__ = [
    "Deliverers",
    "ManyDeliverers",
    "OneDeliverer",
    "deliverers_for",
    "watch_notifications",
]

log = Logger()


class Deliverers(Protocol):
    """What a long-running deliverer does with its store (see the module's docstring)."""

    where: str
    """The queue, for logs (never a password)."""

    def hold(self) -> None:
        """Become one of the queue's deliverers; :class:`QueueError` if that cannot be now."""

    def open(self, reactor: Reactor, synchronous: Synchronous = "FULL") -> defer.Deferred[IQueue]:
        """Open the queue for delivering (closed by the caller, even during shutdown);
        ``synchronous`` as :func:`~twistmail.queue.url.open_queue` takes it."""

    def share(self, queue: IQueue) -> None:
        """Deliver from ``queue``, opened by the caller (instead of :meth:`open`), so that
        :meth:`throttle` and :meth:`domain_limiter` are the ones all deliverers share."""

    def recover(self, owner_prefix: str) -> defer.Deferred[int]:
        """Give back what dead deliverers whose owner starts with ``owner_prefix`` held;
        fires with how many messages."""

    def watch(self, wake: Callable[[], None], reactor: Reactor) -> Callable[[], None]:
        """Call ``wake`` when another process adds messages; returns the undo."""

    def throttle(self, rate: float, clock: IReactorTime) -> Throttle:
        """What paces this deliverer's MAIL commands so that all of them together send at
        most ``rate`` a second (after :meth:`open`)."""

    def domain_limiter(
        self, cap: int, clock: IReactorTime, holder: str, lease: float = 60.0
    ) -> DomainLimiter | SharedDomainLimiter:
        """What keeps at most ``cap`` deliveries in flight per recipient domain, all of this
        queue's deliverers together (after :meth:`open`); ``holder`` names this one, whose
        slots outlive it by at most ``lease`` seconds."""

    def release(self) -> None:
        """Stop being a deliverer (idempotent)."""


def deliverers_for(url: str) -> Deliverers:
    """The deliverers' terms of the queue at ``url``; ValueError for a URL not a queue's."""
    parsed = parse_queue_url(url)
    if parsed.kind == "sqlite":
        return OneDeliverer(parsed.target)
    return ManyDeliverers(url)


class OneDeliverer:
    """A SQLite queue file: one deliverer at a time, holding ``PATH.deliver.lock``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.where = path
        self.lock_path = path + ".deliver.lock"
        self._fd: int | None = None
        self._queue: Any = None
        self._notifier: Any = None

    def hold(self) -> None:
        """Take the lock; QueueError naming the holder's pid if another process has it, or
        if the file is not a queue."""
        from .sqlite import read_queue_status

        if os.path.exists(self.path):
            read_queue_status(self.path, limit=0)  # QueueError: not a queue, or a newer one
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise QueueError(
                f"{self.path}: another process (pid {holder}) is already delivering from this "
                f"queue; stop it first (lock {self.lock_path})"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def open(self, reactor: Reactor, synchronous: Synchronous = "FULL") -> defer.Deferred[IQueue]:
        """The file (``synchronous=FULL``: every enqueue fsync'd)."""
        from .sqlite import SqliteQueue

        def opened(queue: SqliteQueue) -> IQueue:
            self._queue = queue
            return queue

        return SqliteQueue.open(
            self.path, reactor=reactor, synchronous=synchronous, close_at_shutdown=False
        ).addCallback(opened)

    def recover(self, owner_prefix: str) -> defer.Deferred[int]:
        """Every claim of ``owner_prefix`` owners, given back at once (their holders are dead:
        the lock was free)."""
        assert self._queue is not None, "open() first"
        taken: defer.Deferred[int] = self._queue.take_back(owner_prefix)
        return taken

    def watch(self, wake: Callable[[], None], reactor: Reactor) -> Callable[[], None]:
        """``wake`` when the file's write-ahead log changes (Linux only: elsewhere, messages
        another process adds wait for the next submission or due time)."""
        try:
            from twisted.internet import inotify
            from twisted.python.filepath import FilePath
        except ImportError:  # not Linux
            return lambda: None

        # Our own commits land here too: wake() does nothing unless the deliverer sleeps, and
        # a claim that finds nothing writes nothing, so this cannot feed itself.
        def written(_watch: object, _path: object, _mask: int) -> None:
            wake()

        try:
            notifier = inotify.INotify(reactor=reactor)
            notifier.startReading()
            notifier.watch(
                FilePath(self.path + "-wal"), mask=inotify.IN_MODIFY, callbacks=[written]
            )
        except (OSError, inotify.INotifyError) as e:
            log.warn("not watching the queue for other writers: {error}", error=e)
            return lambda: None
        return notifier.loseConnection

    def share(self, queue: IQueue) -> None:
        """Nothing to keep: this process's rate and caps are the queue's."""

    def throttle(self, rate: float, clock: IReactorTime) -> Throttle:
        """A token bucket of this process: the one deliverer's rate is the queue's."""
        return TokenBucket(clock, rate)

    def domain_limiter(
        self, cap: int, clock: IReactorTime, holder: str, lease: float = 60.0
    ) -> DomainLimiter | SharedDomainLimiter:
        """This process's caps: the one deliverer's are the queue's."""
        return DomainLimiter(cap)

    def release(self) -> None:
        """Drop the lock (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class ManyDeliverers:
    """A PostgreSQL queue: any number of deliverers on any machines, coordinated by leases,
    ``SKIP LOCKED`` and ``LISTEN/NOTIFY``."""

    def __init__(self, url: str) -> None:
        from .postgres import describe_url

        self.url = url
        self.where = describe_url(parse_queue_url(url).target)
        self._queue: Any = None
        self._renewals: list[task.LoopingCall] = []

    def hold(self) -> None:
        """Nothing to take: every deliverer is welcome."""

    def open(self, reactor: Reactor, synchronous: Synchronous = "FULL") -> defer.Deferred[IQueue]:
        """The schema the URL names (created on first use); every commit durable."""

        def opened(queue: IQueue) -> IQueue:
            self._queue = queue
            return queue

        return open_queue(self.url, reactor=reactor, close_at_shutdown=False).addCallback(opened)

    def share(self, queue: IQueue) -> None:
        """Take slots from ``queue``'s tables."""
        self._queue = queue

    def recover(self, owner_prefix: str) -> defer.Deferred[int]:
        """Nothing at once: other deliverers may be alive, so a dead one's claims come back
        when their lease runs out."""
        return defer.succeed(0)

    def watch(self, wake: Callable[[], None], reactor: Reactor) -> Callable[[], None]:
        """``wake`` on every ``NOTIFY`` of the queue (an enqueue or retry by any process)."""
        assert self._queue is not None, "open() first"
        return watch_notifications(self._queue, wake)

    def throttle(self, rate: float, clock: IReactorTime) -> Throttle:
        """Slots of one schedule in the database, shared by every deliverer of the queue
        (:class:`~twistmail.ratelimit.SharedRate`); each takes a few at a time."""
        assert self._queue is not None, "open() first"
        queue = self._queue

        def reserve(count: int) -> defer.Deferred[tuple[float, float]]:
            reserved: defer.Deferred[tuple[float, float]] = queue.reserve_slots(
                "rate", count, shared.interval
            )
            return reserved

        shared = SharedRate(clock, rate, reserve)
        return shared

    def domain_limiter(
        self, cap: int, clock: IReactorTime, holder: str, lease: float = 60.0
    ) -> DomainLimiter | SharedDomainLimiter:
        """Slots in the ``domain_slots`` table, ``cap`` per domain for all deliverers
        together, held under a lease of ``lease`` seconds renewed every third of it while
        this deliverer runs (a dead one's come free when it runs out)."""
        assert self._queue is not None, "open() first"
        queue = self._queue

        def take(domain: str, count: int) -> defer.Deferred[int]:
            taken: defer.Deferred[int] = queue.take_domain_slots(
                holder, domain, count, cap=cap, lease=lease
            )
            return taken

        def give(domain: str, count: int) -> defer.Deferred[object]:
            given: defer.Deferred[object] = queue.give_domain_slots(holder, domain, count)
            return given

        renewal = task.LoopingCall(queue.renew_domain_slots, holder, lease)
        renewal.clock = clock
        renewal.start(lease / 3, now=False).addErrback(
            lambda f: log.failure("renewing the domain slots failed", f)
        )
        self._renewals.append(renewal)
        return SharedDomainLimiter(clock, cap, take, give)

    def release(self) -> None:
        """Stop renewing the domain slots (what is still held expires)."""
        for renewal in self._renewals:
            if renewal.running:
                renewal.stop()
        self._renewals.clear()


def watch_notifications(queue: object, wake: Callable[[], None]) -> Callable[[], None]:
    """Call ``wake`` whenever ``queue`` (a PostgreSQL queue) says something was enqueued
    (``notified()``); returns the undo."""
    notified = queue.notified  # type: ignore[attr-defined]
    waiting: list[defer.Deferred[None]] = []

    def ended(failure: Failure) -> None:
        failure.trap(defer.CancelledError, QueueError)  # stopped, or the queue closed

    def listen(_: object = None) -> None:
        if waiting:
            wake()
        d = notified()
        waiting[:] = [d]
        d.addCallbacks(listen, ended)

    listen()
    return lambda: waiting[0].cancel()
