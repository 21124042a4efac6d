"""Bounded fan-out: N cooperative tasks draining shared work.

One ``task.coiterate`` over one generator runs serially (the Cooperator waits on each yielded
Deferred), so bounded parallelism is N ``cooperate()`` tasks whose generators share state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from twisted.internet import defer, task

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
    tasks = [cooperator.cooperate(work()) for _ in range(n)]

    def cancel(_: defer.Deferred[None]) -> None:
        for t in tasks:
            with contextlib.suppress(task.TaskDone, task.TaskFailed):
                t.stop()

    result: defer.Deferred[None] = defer.Deferred(cancel)
    done = defer.gatherResults([t.whenDone() for t in tasks], consumeErrors=True)

    def finished(outcome: object) -> None:
        cooperator.stop()
        if result.called:
            return
        if isinstance(outcome, defer.FirstError):  # pragma: no cover - via errback below
            result.errback(outcome.subFailure)
        else:
            result.callback(None)

    def failed(reason: Any) -> None:
        cooperator.stop()
        for t in tasks:
            with contextlib.suppress(task.TaskDone, task.TaskFailed):
                t.stop()
        if not result.called:
            sub = reason.value.subFailure if reason.check(defer.FirstError) else reason
            if sub.check(task.TaskStopped):
                return
            result.errback(sub)

    done.addCallbacks(finished, failed)
    return result
