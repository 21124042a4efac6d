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
    waiting: set[defer.Deferred[Any]] = set()

    def tracked(work_items: Iterator[defer.Deferred[Any] | None]) -> Iterator[Any]:
        for item in work_items:
            if isinstance(item, defer.Deferred):
                waiting.add(item)
                item.addBoth(_forget, waiting, item)
                # Once the fan-out has ended, a late failure of a stopped task is moot.
                item.addErrback(lambda f: None if result.called else f)
            yield item

    tasks = [cooperator.cooperate(tracked(work())) for _ in range(n)]

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
        for d in list(waiting):
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


def _forget(result: object, waiting: set[defer.Deferred[Any]], d: defer.Deferred[Any]) -> object:
    waiting.discard(d)
    return result
