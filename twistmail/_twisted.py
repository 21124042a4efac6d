"""Small pieces of Twisted glue shared by several modules."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = ["Alarm", "install_signal_handlers", "when_done"]


class Alarm:
    """One pending call of ``wake``, brought forward as needed but never pushed back."""

    def __init__(self, clock: IReactorTime, wake: Callable[[], None]) -> None:
        self._clock = clock
        self._wake = wake
        self._call: IDelayedCall | None = None

    def within(self, delay: float) -> None:
        """Make sure ``wake`` runs within ``delay`` seconds."""
        call = self._call
        if call is None:
            self._call = self._clock.callLater(delay, self._ring)
        elif call.getTime() > self._clock.seconds() + delay:
            call.reset(delay)

    def cancel(self) -> None:
        """No call pending any more."""
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()

    def _ring(self) -> None:
        self._call = None
        self._wake()


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
