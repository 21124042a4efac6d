"""A thread pool of exactly one thread, for work that must all run on the same thread in order.

:class:`OneThread` is a :class:`~twisted.python.threadpool.ThreadPool` (so
``threads.deferToThreadPool`` and the stores' types take it) whose one thread takes its jobs
from a :class:`queue.SimpleQueue`. Twisted's pool hands each job through its ``Team`` of
workers and a coordinator, and runs it inside a copy of the caller's legacy log context: about
11 µs of CPU per job more, in both threads, for a pool that never has a second thread to
choose. A SQLite store runs a job or two per message on its thread.

In the commands' processes, which own their reactor, the threads are marked as background
work for Linux's scheduler (:func:`run_in_background`, ``SCHED_BATCH``): handing a store thread
a job then no longer preempts the reactor thread on its core, which held the interpreter lock
while it waited to run again. A 20,000-message drain took 0.93-0.96 of the time (medians of 10
alternating pairs, two sittings; its store thread switched 3,400-9,700 times instead of
~18,000). A library user's threads, and the relay's, keep the default policy.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from queue import SimpleQueue
from typing import Any

from twisted.python import log
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

__all__ = ["OneThread", "run_in_background"]

_background = False


def run_in_background(on: bool = True) -> None:
    """Start each :class:`OneThread` from now on as background work for the scheduler
    (``SCHED_BATCH``: no preempting a running thread when it is woken), where the OS has it."""
    global _background
    _background = on


def _as_background() -> None:
    """Make the calling thread ``SCHED_BATCH``; nothing where that is not possible."""
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or not allowed (seccomp)
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))


_Job = tuple[
    Callable[[bool, Any], object] | None, Callable[..., Any], tuple[Any, ...], dict[str, Any]
]


class OneThread(ThreadPool):
    """One thread named ``name`` running jobs in submission order (see the module's docstring).

    Jobs queued before :meth:`start` wait for it; :meth:`stop` runs what is queued, then joins
    the thread; jobs given after :meth:`stop` are dropped, as Twisted's pool drops them.
    """

    def __init__(self, name: str) -> None:
        super().__init__(minthreads=1, maxthreads=1, name=name)
        self._jobs: SimpleQueue[_Job | None] = SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.joined = False
        self.started = True
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name=f"PoolThread-{self.name}-1")
            self._thread.start()

    def stop(self) -> None:
        self.joined = True
        self.started = False
        thread, self._thread = self._thread, None
        if thread is not None:
            self._jobs.put(None)
            thread.join()

    def callInThreadWithCallback(
        self,
        onResult: Callable[[bool, Any], object] | None,
        func: Callable[..., Any],
        *args: Any,
        **kw: Any,
    ) -> None:
        if self.joined:
            return
        self._jobs.put((onResult, func, args, kw))

    def _work(self) -> None:
        if _background:
            _as_background()
        get = self._jobs.get
        while (job := get()) is not None:
            on_result, func, args, kw = job
            del job
            try:
                result = func(*args, **kw)
                ok = True
            except BaseException:
                result = Failure()
                ok = False
            del func, args, kw
            if on_result is None:
                if not ok:
                    log.err(result)
            else:
                try:
                    on_result(ok, result)
                except BaseException:
                    log.err()
            del on_result, result
