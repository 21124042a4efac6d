"""Group commit: writes submitted while one group is being committed go together in the next.

Used by the SQLite store thread (:class:`twistmail._sqlite.SqliteThread`) that the campaign
journal and the SQLite queue share, each committing on its own single thread: many concurrent
writers then share one transaction (and one fsync) instead of queueing one transaction each.

The committing thread takes the next group itself as soon as a commit ends: what was
submitted meanwhile is committed at once, without waiting for the reactor to hear of the
previous commit and hand over the next group (a round trip through two thread wake-ups that
took longer than the commit it waited for). The reactor hears of each committed group once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from twisted.internet import defer
from twisted.python.failure import Failure

__all__ = ["GroupCommit"]

_Item = TypeVar("_Item")


class GroupCommit(Generic[_Item]):
    """Submitted items, committed in groups by ``commit`` on a thread of their own.

    ``commit(items)`` runs on that thread (started by ``in_thread(function)``) and returns one
    result per item, in order, once the group is durable, or raises to fail the whole group.
    The thread commits groups while there are items, at most ``burst`` in a row before it gives
    other work queued for the thread (reads) a turn; ``from_thread(function, *args)`` brings
    each group's results back to the reactor thread, where each :meth:`submit` Deferred then
    fires with its item's result. :meth:`submit` and :meth:`idle` are called from the reactor
    thread only.

    :ivar commits: groups committed so far (counted on the reactor thread).
    """

    def __init__(
        self,
        commit: Callable[[list[_Item]], list[Any]],
        in_thread: Callable[[Callable[[], None]], None],
        from_thread: Callable[..., None],
        *,
        burst: int = 8,
    ) -> None:
        self.commits = 0
        self._commit = commit
        self._in_thread = in_thread
        self._from_thread = from_thread
        self._burst = burst
        self._lock = threading.Lock()
        # Shared with the thread, under the lock:
        self._items: list[_Item] = []
        self._waiters: list[defer.Deferred[Any]] = []
        self._running = False
        # The reactor thread's own:
        self._outstanding = 0
        self._idle_waiters: list[defer.Deferred[None]] = []

    def submit(self, item: _Item) -> defer.Deferred[Any]:
        """Queue ``item`` for the next group; fires with its result once committed."""
        waiter: defer.Deferred[Any] = defer.Deferred()
        self._outstanding += 1
        with self._lock:
            self._items.append(item)
            self._waiters.append(waiter)
            if self._running:
                return waiter
            self._running = True
        self._in_thread(self._work)
        return waiter

    def idle(self) -> defer.Deferred[None]:
        """Fires once nothing is queued or being committed."""
        if not self._outstanding:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._idle_waiters.append(d)
        return d

    # On the committing thread. ------------------------------------------------------------

    def _work(self) -> None:
        for _ in range(self._burst):
            with self._lock:
                items, waiters = self._items, self._waiters
                if not items:
                    self._running = False
                    return
                self._items, self._waiters = [], []
            try:
                result: list[Any] | Failure = self._commit(items)
            except BaseException:
                result = Failure()
            self._from_thread(self._done, waiters, result)
        # Still running: queue the rest behind what else waits for the thread.
        self._in_thread(self._work)

    # Back on the reactor thread. ----------------------------------------------------------

    def _done(self, waiters: list[defer.Deferred[Any]], result: list[Any] | Failure) -> None:
        self._outstanding -= len(waiters)
        if isinstance(result, Failure):
            for waiter in waiters:
                waiter.errback(result)
        else:
            self.commits += 1
            for waiter, value in zip(waiters, result, strict=True):
                waiter.callback(value)
        if not self._outstanding:
            idle, self._idle_waiters = self._idle_waiters, []
            for notify in idle:
                notify.callback(None)
