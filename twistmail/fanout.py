"""Bounded fan-out: N workers draining shared work, each resumed as soon as its wait ends.

Each worker is a generator that yields Deferreds (or ``None``). When a yielded Deferred fires,
its worker takes its next item right there, inside that callback, instead of one reactor turn
later as a ``task.Cooperator`` would: a reply that completes one message starts the next one
while the connection is still handling that reply, so both go out in one write. A worker whose
items complete synchronously gives the reactor a turn every ``_BURST`` items, so a run of
invalid rows or instant results cannot starve I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure

__all__ = ["fan_out"]

# Items a worker may run back to back without waiting before it yields to the reactor.
_BURST = 100


def fan_out(
    reactor: Any, work: Callable[[], Iterator[defer.Deferred[Any] | None]], n: int
) -> defer.Deferred[None]:
    """Run ``n`` copies of the generator function ``work``; fire when all of them end.

    Each generator yields Deferreds (or ``None``); a worker waits for its yielded Deferred
    before resuming. Cancelling the result stops every worker and cancels what they wait on.
    The first failure (of a yielded Deferred or of a generator) stops the rest and is passed
    on; later failures of what stopped workers were waiting on are dropped.
    """
    run = _FanOut(reactor, n)
    run.workers = [_Worker(run, work()) for _ in range(n)]
    for worker in run.workers:
        worker.step()
    return run.result


class _FanOut:
    def __init__(self, reactor: Any, n: int) -> None:
        self.reactor = reactor
        self.live = n
        self.ended = n == 0
        self.workers: list[_Worker] = []
        self.result: defer.Deferred[None] = defer.Deferred(self._cancel)
        if n == 0:
            self.result.callback(None)

    def worker_done(self) -> None:
        self.live -= 1
        if self.live == 0 and not self.ended:
            self.ended = True
            self.result.callback(None)

    def fail(self, failure: Failure) -> None:
        if self.ended:
            return  # a stopped worker's late failure is moot
        self._end()
        self.result.errback(failure)

    def _end(self) -> None:
        self.ended = True
        for worker in self.workers:
            later = worker.later
            if later is not None and later.active():
                later.cancel()
            worker.later = None

    def _cancel(self, _: defer.Deferred[None]) -> None:
        # End first: the CancelledErrors of what the workers wait on are then dropped, and
        # Deferred.cancel fails the result with its own CancelledError.
        self._end()
        for worker in self.workers:
            waiting = worker.waiting
            if waiting is not None and not waiting.called:
                waiting.cancel()


class _Worker:
    __slots__ = ("again", "items", "later", "run", "running", "waiting")

    def __init__(self, run: _FanOut, items: Iterator[defer.Deferred[Any] | None]) -> None:
        self.run = run
        self.items = items
        self.waiting: defer.Deferred[Any] | None = None
        self.later: IDelayedCall | None = None
        self.running = False
        self.again = False

    def step(self) -> None:
        """Take items until one has to be waited for, the work ends, or the burst is used."""
        self.later = None
        run = self.run
        self.running = True
        try:
            for _ in range(_BURST):
                if run.ended:
                    return
                try:
                    item = next(self.items)
                except StopIteration:
                    run.worker_done()
                    return
                except BaseException:
                    run.fail(Failure())
                    return
                if isinstance(item, defer.Deferred):
                    self.again = False
                    self.waiting = item
                    item.addBoth(self._resume)
                    if not self.again:
                        return  # _resume will call step when the Deferred fires
            if not run.ended:
                self.later = run.reactor.callLater(0, self.step)
        finally:
            self.running = False

    def _resume(self, result: object) -> None:
        self.waiting = None
        if isinstance(result, Failure):
            self.run.fail(result)
        elif self.running:
            self.again = True  # fired while step() is on the stack: it carries on
        else:
            self.step()
