"""Bounded fan-out: N cooperative tasks draining shared work.

One ``task.coiterate`` over one generator runs serially (the Cooperator waits on each yielded
Deferred), so bounded parallelism is N ``cooperate()`` tasks whose generators share state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from twisted.internet import defer, task
from twisted.python.failure import Failure

__all__ = ["fan_out"]


def fan_out(
    reactor: Any, work: Callable[[], Iterator[defer.Deferred[Any] | None]], n: int
) -> defer.Deferred[None]:
    """Run ``n`` copies of the generator function ``work`` cooperatively; fire when all end.

    Each generator yields Deferreds (or ``None``); a task waits for its yielded Deferred before
    resuming. Cancelling the result stops every task and cancels what they wait on. The first
    failure stops the rest and is passed on.
    """
    cooperator = task.Cooperator(scheduler=lambda f: reactor.callLater(0, f), started=True)
    # What each task waits on now (a slot per task, overwritten: no bookkeeping per item).
    waiting: list[defer.Deferred[Any] | None] = [None] * n

    def tracked(slot: int, work_items: Iterator[defer.Deferred[Any] | None]) -> Iterator[Any]:
        for item in work_items:
            if isinstance(item, defer.Deferred):
                waiting[slot] = item
                # Once the fan-out has ended, a late failure of a stopped task is moot.
                item.addErrback(_unless_ended, result)
            yield item

    tasks = [cooperator.cooperate(tracked(slot, work())) for slot in range(n)]

    def stop_all() -> None:
        # Not cooperator.stop(): a paused task that is completing right now is still in the
        # cooperator, and completing it twice raises AlreadyCalledError.
        for t in tasks:
            with contextlib.suppress(task.TaskFinished):
                t.stop()

    cancelling: list[bool] = []

    def cancel(_: defer.Deferred[None]) -> None:
        # Cancel what the workers wait on first (each such task ends with the CancelledError),
        # then stop the workers that were between two items. A task must not be stopped while
        # what it waits on is still to be cancelled: it would complete twice.
        cancelling.append(True)
        for d in waiting:
            if d is not None and not d.called:
                d.cancel()
        stop_all()

    result: defer.Deferred[None] = defer.Deferred(cancel)
    done = defer.gatherResults([t.whenDone() for t in tasks], consumeErrors=True)

    def finished(_: object) -> None:
        cooperator.stop()
        if not result.called:
            result.callback(None)

    def failed(reason: Failure) -> None:
        if not cancelling:
            stop_all()
        if result.called:
            return
        error = reason.value
        sub: Failure = error.subFailure if isinstance(error, defer.FirstError) else reason
        if sub.check(task.TaskStopped):
            return
        result.errback(sub)

    done.addCallbacks(finished, failed)
    return result


def _unless_ended(failure: Failure, result: defer.Deferred[None]) -> Failure | None:
    return None if result.called else failure
