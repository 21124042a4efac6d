"""Group commit: writes submitted while one group is being committed go together in the next.

Used by the PostgreSQL queue's enqueues: many concurrent writers then share one transaction
(and one commit) instead of queueing one transaction each. The SQLite stores do the same on
their own thread, which takes each next group itself (:class:`twistmail._sqlite.ThreadGroups`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from twisted.internet import defer
from twisted.python.failure import Failure

__all__ = ["GroupCommit", "answer_group"]

_Item = TypeVar("_Item")


def answer_group(waiters: Sequence[defer.Deferred[Any]], result: list[Any] | Failure) -> None:
    """Fire each of a group's ``waiters`` with its item's result, or every one with the group's
    failure."""
    if isinstance(result, Failure):
        for waiter in waiters:
            waiter.errback(result)
    else:
        for waiter, value in zip(waiters, result, strict=True):
            waiter.callback(value)


class GroupCommit(Generic[_Item]):
    """Submitted items, committed in groups by ``commit``.

    ``commit(items)`` returns a Deferred firing with one result per item, in order, once the
    group is durable; each :meth:`submit` Deferred then fires with its item's result, or every
    one of the group fails with the commit's failure.

    :ivar commits: groups committed so far.
    """

    def __init__(self, commit: Callable[[list[_Item]], defer.Deferred[list[Any]]]) -> None:
        self.commits = 0
        self._commit = commit
        self._items: list[_Item] = []
        self._waiters: list[defer.Deferred[Any]] = []
        self._committing = False
        self._idle_waiters: list[defer.Deferred[None]] = []

    def submit(self, item: _Item) -> defer.Deferred[Any]:
        """Queue ``item`` for the next group; fires with its result once committed."""
        waiter: defer.Deferred[Any] = defer.Deferred()
        self._items.append(item)
        self._waiters.append(waiter)
        if not self._committing:
            self._commit_group()
        return waiter

    def idle(self) -> defer.Deferred[None]:
        """Fires once nothing is queued or being committed."""
        if not self._committing and not self._items:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._idle_waiters.append(d)
        return d

    def _commit_group(self) -> None:
        items, waiters = self._items, self._waiters
        self._items, self._waiters = [], []
        self._committing = True

        def done(result: list[Any] | Failure) -> None:
            if not isinstance(result, Failure):
                self.commits += 1
            answer_group(waiters, result)
            # Still "committing" while waiters run: what they submit joins the next group.
            self._committing = False
            if self._items:
                self._commit_group()
            else:
                idle, self._idle_waiters = self._idle_waiters, []
                for notify in idle:
                    notify.callback(None)

        self._commit(items).addBoth(done)
