"""A thread pool of exactly one thread, for work that must all run on the same thread in order.

:class:`OneThread` is a :class:`~twisted.python.threadpool.ThreadPool` (so
``threads.deferToThreadPool`` and the stores' types take it) whose one thread takes its jobs
from a :class:`queue.SimpleQueue`. Twisted's pool hands each job through its ``Team`` of
workers and a coordinator, and runs it inside a copy of the caller's legacy log context: about
11 µs of CPU per job more, in both threads, for a pool that never has a second thread to
choose. A SQLite store runs a job or two per message on its thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from queue import SimpleQueue
from typing import Any

from twisted.python import log
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

__all__ = ["OneThread"]

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
