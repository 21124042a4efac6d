"""The measured window of a benchmark sender: wall and CPU time, optionally under cProfile.

Shared by ``senders.py`` and ``messagesenders.py``; only the standard library at module level.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Coroutine
from typing import Any

# Set by start_profiling (--profile-out): profiles exactly the measured window.
_profiler: Any = None


def react(main: Callable[[Any], Coroutine[Any, Any, None]]) -> None:
    """Run the coroutine function ``main(reactor)`` on Twisted's default reactor."""
    from twisted.internet import defer, task

    def run(reactor: object) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(main(reactor))

    try:
        task.react(run)
    except SystemExit as e:
        if e.code:
            raise


def cpu() -> float:
    """CPU seconds of this process so far (every thread, user and system)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def start_profiling() -> None:
    """Profile the measured windows from now on (not imports or start-up)."""
    global _profiler
    import cProfile

    _profiler = cProfile.Profile()


def dump_profile(path: str) -> None:
    """Write the profile of the measured windows to ``path``."""
    if _profiler is not None:
        _profiler.dump_stats(path)


def mark() -> tuple[float, float]:
    """Start the measured window."""
    if _profiler is not None:
        _profiler.enable()
    return time.perf_counter(), cpu()


def window(t0: float, c0: float) -> dict[str, object]:
    """End the measured window: wall time and CPU time since :func:`mark`."""
    elapsed, spent = time.perf_counter() - t0, cpu() - c0
    if _profiler is not None:
        _profiler.disable()
    return {"elapsed": elapsed, "cpu": spent}
