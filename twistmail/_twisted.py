"""Small pieces of Twisted glue shared by several modules."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable
from typing import Any

from twisted.internet import defer

__all__ = ["install_signal_handlers", "when_done"]


def when_done(observed: defer.Deferred[Any]) -> defer.Deferred[None]:
    """A new Deferred that fires (with None) when ``observed`` fires, leaving its result alone."""
    done: defer.Deferred[None] = defer.Deferred()

    def fire(result: object) -> object:
        done.callback(None)
        return result

    observed.addBoth(fire)
    return done


def install_signal_handlers(reactor: Any, interrupt: Callable[[], None]) -> Callable[[], None]:
    """Route SIGINT and SIGTERM to ``interrupt`` on the reactor thread; returns the undo."""
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: Any) -> None:
        reactor.callFromThread(interrupt)

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError):  # not the main thread
            previous[sig] = signal.signal(sig, handler)

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore
