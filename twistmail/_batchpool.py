"""Work done on a few threads of its own and handed back to the reactor a batch at a time."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from twisted.internet.interfaces import IReactorCore, IReactorFromThreads
from twisted.logger import Logger

from ._cpu import on_every_cpu

__all__ = ["BatchPool", "Job"]

log = Logger()

T = TypeVar("T")
R = TypeVar("R")

Done = Callable[[Any, Any, "BaseException | None"], None]


class Job(Generic[T]):
    """One item handed to a :class:`BatchPool`; :meth:`cancel` drops its outcome."""

    __slots__ = ("cancelled", "context", "error", "item", "result", "seq")

    def __init__(self, item: T, context: Any, seq: int) -> None:
        self.item = item
        self.context = context
        self.seq = seq
        self.cancelled = False
        self.result: Any = None
        self.error: BaseException | None = None

    def cancel(self) -> None:
        """Do not report this job's outcome (nor work on it, if no thread has yet)."""
        self.cancelled = True


class BatchPool(Generic[T, R]):
    """Runs ``work(item)`` on ``threads`` threads of its own and reports every outcome on the
    reactor thread as ``done(context, result, error)`` (``error``: what ``work`` raised, else
    None), in the order the items were submitted.

    A thread takes its share of the items waiting (at most ``max_batch``), works through
    them and hands them back with one ``callFromThread`` (none when the reactor thread has yet
    to take the batches handed back before): the reactor wakes once a batch at the most, not
    once an item. An item whose work raises fails alone. The threads start with the first
    item and stop with :meth:`stop` or the reactor's shutdown; the work must be safe to run on
    several threads at once.
    """

    def __init__(
        self,
        reactor: IReactorFromThreads,
        work: Callable[[T], R],
        done: Done,
        *,
        threads: int,
        max_batch: int = 16,
        name: str = "twistmail-batchpool",
    ) -> None:
        if threads < 1:
            raise ValueError("threads must be at least 1")
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.size = threads
        self.max_batch = max_batch
        self.name = name
        self._reactor = reactor
        self._work = work
        self._done = done
        self._queue: deque[Job[T]] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._idle = 0  # threads waiting for work
        self._threads: list[threading.Thread] = []
        self._started = False
        self._stopping = False
        self._submitted = 0  # the next job's sequence number
        self._next = 0  # the sequence number of the next job to report
        self._held: dict[int, list[Job[T]]] = {}  # batches done early, by their first job
        self._finished: list[list[Job[T]]] = []  # batches handed back, not yet reported
        self._shutdown_trigger: Any = None

    @property
    def threads(self) -> list[threading.Thread]:
        """The threads running (none before the first item and after :meth:`stop`)."""
        return [t for t in self._threads if t.is_alive()]

    @property
    def stopped(self) -> bool:
        """Whether :meth:`stop` was called (by the reactor's shutdown, perhaps): no more items."""
        return self._stopping

    def submit(self, item: T, context: Any = None) -> Job[T]:
        """Have ``item`` worked on; its outcome goes to ``done`` with ``context``."""
        if self._stopping:
            raise RuntimeError(f"{self.name} is stopped")
        if not self._started:
            self._start()
        job = Job(item, context, self._submitted)
        self._submitted += 1
        with self._lock:
            self._queue.append(job)
            if self._idle:
                self._wake.notify()
        return job

    def stop(self) -> None:
        """Let the threads finish what was submitted, then end them (and wait for them)."""
        if self._stopping:
            return
        with self._lock:
            self._stopping = True
            self._wake.notify_all()
        current = threading.current_thread()
        for thread in self._threads:
            if thread is not current:
                thread.join()
        self._threads.clear()
        trigger, self._shutdown_trigger = self._shutdown_trigger, None
        if trigger is not None:
            IReactorCore(self._reactor).removeSystemEventTrigger(trigger)

    # ------------------------------------------------------------------ internals

    def _start(self) -> None:
        self._started = True
        core = IReactorCore(self._reactor, None)
        if core is not None:
            self._shutdown_trigger = core.addSystemEventTrigger("during", "shutdown", self.stop)
        for n in range(self.size):
            thread = threading.Thread(target=self._run, name=f"{self.name}-{n}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _run(self) -> None:
        """A thread's loop: take a batch, work through it, hand it back."""
        on_every_cpu()  # signing runs without the GIL: these threads are there to use them all
        queue = self._queue
        work = self._work
        hand_back = self._reactor.callFromThread
        while True:
            with self._lock:
                while not queue:
                    if self._stopping:
                        return
                    self._idle += 1
                    self._wake.wait()
                    self._idle -= 1
                # This thread's share of what waits, so that every thread gets some.
                take = min(self.max_batch, -(-len(queue) // self.size))
                batch = [queue.popleft() for _ in range(take)]
            for job in batch:
                if not job.cancelled:
                    try:
                        job.result = work(job.item)
                    except BaseException as e:  # reported with its job, on the reactor thread
                        job.error = e
            with self._lock:
                finished = self._finished
                finished.append(batch)
                wake = len(finished) == 1  # else the reactor thread is already called for
            if wake:
                hand_back(self._report_finished)

    def _report_finished(self) -> None:
        """Report the batches handed back since the last call."""
        with self._lock:
            batches, self._finished = self._finished, []
        for batch in batches:
            self._report(batch)

    def _report(self, batch: list[Job[T]]) -> None:
        """Report ``batch``'s outcomes, and those of batches held for it, in submission order."""
        first = batch[0].seq
        if first != self._next:  # an earlier batch is still being worked on
            self._held[first] = batch
            return
        done = self._done
        next_batch: list[Job[T]] | None = batch
        while next_batch is not None:
            self._next = next_batch[-1].seq + 1
            for job in next_batch:
                if not job.cancelled:
                    try:
                        done(job.context, job.result, job.error)
                    except Exception:
                        log.failure("{pool}: reporting an outcome failed", pool=self.name)
            next_batch = self._held.pop(self._next, None)
