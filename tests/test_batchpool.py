"""BatchPool: work on threads of its own, outcomes back on the reactor thread in order."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.testing import MemoryReactor
from zope.interface import implementer

from twistmail._batchpool import BatchPool

WAIT = 10.0  # seconds: a bound on waiting for threads, never reached when things work


@implementer(IReactorFromThreads)
class ThreadedMemoryReactor(MemoryReactor):
    """A MemoryReactor whose ``callFromThread`` queues the call for :meth:`run_until`."""

    def __init__(self) -> None:
        super().__init__()
        self.from_threads: queue.Queue[tuple[Callable[..., object], tuple[Any, ...]]] = (
            queue.Queue()
        )
        self.removed: list[object] = []

    def callFromThread(self, f: Callable[..., object], *args: Any, **kw: Any) -> None:
        assert not kw
        self.from_threads.put((f, args))

    def addSystemEventTrigger(  # type: ignore[override]
        self, phase: str, event: str, f: Callable[..., object], *args: Any, **kw: Any
    ) -> tuple[str, str, int]:
        super().addSystemEventTrigger(phase, event, f, *args, **kw)
        return (phase, event, len(self.triggers[phase][event]) - 1)

    def removeSystemEventTrigger(self, trigger: tuple[str, str, int]) -> None:
        phase, event, index = trigger
        del self.triggers[phase][event][index]
        self.removed.append(trigger)

    def run_until(self, done: Callable[[], bool]) -> None:
        """Run calls from threads, as the reactor thread would, until ``done()``."""
        while not done():
            f, args = self.from_threads.get(timeout=WAIT)
            f(*args)

    def fire_shutdown(self) -> None:
        for phase in ("before", "during", "after"):
            for f, args, kw in self.triggers.get(phase, {}).get("shutdown", []):
                f(*args, **kw)


Outcome = tuple[Any, Any, "BaseException | None"]


def pool_of(
    reactor: ThreadedMemoryReactor,
    work: Callable[[Any], Any],
    threads: int = 2,
    max_batch: int = 16,
) -> tuple[BatchPool[Any, Any], list[Outcome]]:
    outcomes: list[Outcome] = []

    def done(context: Any, result: Any, error: BaseException | None) -> None:
        assert threading.current_thread() is threading.main_thread()
        outcomes.append((context, result, error))

    pool: BatchPool[Any, Any] = BatchPool(
        reactor, work, done, threads=threads, max_batch=max_batch, name="test-batchpool"
    )
    return pool, outcomes


def alive(name: str = "test-batchpool") -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(name)]


def test_every_outcome_reaches_the_reactor_thread_in_submission_order() -> None:
    reactor = ThreadedMemoryReactor()
    pool, outcomes = pool_of(reactor, lambda n: n * n, threads=3, max_batch=4)
    for n in range(500):
        pool.submit(n, context=n)
    reactor.run_until(lambda: len(outcomes) == 500)
    pool.stop()
    assert outcomes == [(n, n * n, None) for n in range(500)]


def test_a_batch_done_early_waits_for_the_one_before_it() -> None:
    reactor = ThreadedMemoryReactor()
    first_may_finish = threading.Event()
    started: list[int] = []

    def work(n: int) -> int:
        started.append(n)
        if n == 0:
            first_may_finish.wait(WAIT)
        return n

    pool, outcomes = pool_of(reactor, work, threads=2, max_batch=1)
    pool.submit(0, context=0)
    pool.submit(1, context=1)
    # Item 1 is done (on the other thread) while item 0 is not: it is held, not reported.
    f, args = reactor.from_threads.get(timeout=WAIT)
    f(*args)
    assert sorted(started) == [0, 1]
    assert outcomes == []
    first_may_finish.set()
    reactor.run_until(lambda: len(outcomes) == 2)
    pool.stop()
    assert [context for context, _, _ in outcomes] == [0, 1]


def test_an_item_whose_work_raises_fails_alone() -> None:
    reactor = ThreadedMemoryReactor()

    def work(n: int) -> int:
        if n % 5 == 3:
            raise ValueError(f"bad item {n}")
        return n + 100

    pool, outcomes = pool_of(reactor, work)
    for n in range(20):
        pool.submit(n, context=n)
    reactor.run_until(lambda: len(outcomes) == 20)
    pool.stop()
    for n, (context, result, error) in enumerate(outcomes):
        assert context == n
        if n % 5 == 3:
            assert result is None
            assert isinstance(error, ValueError)
            assert str(error) == f"bad item {n}"
        else:
            assert (result, error) == (n + 100, None)


def test_a_cancelled_job_is_not_reported() -> None:
    reactor = ThreadedMemoryReactor()
    gate = threading.Event()
    pool, outcomes = pool_of(reactor, lambda n: gate.wait(WAIT) and n, threads=1, max_batch=1)
    jobs = [pool.submit(n, context=n) for n in range(3)]
    jobs[1].cancel()
    gate.set()
    reactor.run_until(lambda: len(outcomes) == 2)
    pool.stop()
    assert [context for context, _, _ in outcomes] == [0, 2]


def test_threads_start_with_the_first_item_and_stop_with_stop() -> None:
    reactor = ThreadedMemoryReactor()
    pool, outcomes = pool_of(reactor, lambda n: n, threads=2)
    assert pool.threads == []
    assert alive() == []
    pool.submit(1)
    assert len(pool.threads) == 2
    reactor.run_until(lambda: len(outcomes) == 1)
    pool.stop()
    assert pool.threads == []
    assert alive() == []
    assert reactor.removed == [("during", "shutdown", 0)]  # its shutdown trigger is gone too
    with pytest.raises(RuntimeError, match="stopped"):
        pool.submit(2)


def test_the_reactor_shutting_down_stops_the_threads_after_their_work() -> None:
    reactor = ThreadedMemoryReactor()
    pool, outcomes = pool_of(reactor, lambda n: n, threads=2, max_batch=2)
    for n in range(50):
        pool.submit(n, context=n)
    reactor.fire_shutdown()  # joins the threads; what was submitted is still worked on
    assert alive() == []
    reactor.run_until(lambda: len(outcomes) == 50)
    assert [context for context, _, _ in outcomes] == list(range(50))


def test_a_thread_leaves_a_share_of_what_waits_to_the_others() -> None:
    reactor = ThreadedMemoryReactor()
    plugs_out = threading.Event()
    plugged = threading.Semaphore(0)

    def work(n: int) -> int:
        if n < 2:  # each thread holds one of these while the queue fills
            plugged.release()
            plugs_out.wait(WAIT)
        return n

    pool, outcomes = pool_of(reactor, work, threads=2, max_batch=64)
    pool.submit(0, context=0)
    pool.submit(1, context=1)
    for _ in range(2):
        assert plugged.acquire(timeout=WAIT)
    for n in range(2, 42):
        pool.submit(n, context=n)
    sizes: list[int] = []
    report = pool._report

    def sized(batch: list[Any]) -> None:
        sizes.append(len(batch))
        report(batch)

    pool._report = sized  # type: ignore[method-assign]
    plugs_out.set()
    reactor.run_until(lambda: len(outcomes) == 42)
    pool.stop()
    assert max(sizes) == 20  # half of the 40 waiting, not all of them
    assert [context for context, _, _ in outcomes] == list(range(42))


def test_batches_handed_back_before_the_reactor_runs_wake_it_once() -> None:
    reactor = ThreadedMemoryReactor()
    pool, outcomes = pool_of(reactor, lambda n: n, threads=2, max_batch=1)
    for n in range(10):
        pool.submit(n, context=n)
    deadline = time.monotonic() + WAIT
    while len(pool._finished) < 10:  # every batch handed back, none reported yet
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert reactor.from_threads.qsize() == 1
    reactor.run_until(lambda: len(outcomes) == 10)
    pool.stop()
    assert [context for context, _, _ in outcomes] == list(range(10))
