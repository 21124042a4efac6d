"""Small pieces of Twisted glue shared by several modules."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet import defer
from twisted.internet.interfaces import (
    IConnector,
    IDelayedCall,
    IListeningPort,
    IReactorFromThreads,
    IReactorTime,
)
from twisted.internet.protocol import ClientFactory, ServerFactory
from twisted.python.failure import Failure

__all__ = [
    "Alarm",
    "Pump",
    "Reactor",
    "default_reactor",
    "install_signal_handlers",
    "when_done",
]


class Reactor(Protocol):
    """What twistmail asks of a reactor it is given: time, shutdown triggers and TCP.

    Every Twisted reactor (the global ``twisted.internet.reactor`` too) and
    ``twisted.internet.testing.MemoryReactorClock`` have these. A parameter that only needs a
    clock takes ``IReactorTime`` instead (so a ``task.Clock`` will do); work on threads adapts
    the reactor to ``IReactorFromThreads`` / ``IReactorThreads`` where it needs them.
    """

    def seconds(self) -> float: ...

    def callLater(
        self, delay: float, callable: Callable[..., Any], *args: Any, **kw: Any
    ) -> IDelayedCall: ...

    def addSystemEventTrigger(
        self, phase: str, eventType: str, callable: Callable[..., Any], /, *args: Any, **kw: Any
    ) -> Any: ...

    def removeSystemEventTrigger(self, triggerID: Any, /) -> None: ...

    def listenTCP(
        self, port: int, factory: ServerFactory, backlog: int = ..., interface: str = ...
    ) -> IListeningPort: ...

    def connectTCP(
        self,
        host: str,
        port: int,
        factory: ClientFactory,
        timeout: float = ...,
        bindAddress: tuple[str, int] | None = ...,
    ) -> IConnector: ...


def default_reactor() -> Reactor:
    """The global reactor (imported late, so importing twistmail installs none)."""
    from twisted.internet import reactor

    return reactor


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


class Pump:
    """Starts work from the callbacks that make room for it, until ``done`` fires.

    A subclass says how to start one piece of work (:meth:`_start_one`: False when nothing can
    start now) and what to do when nothing could (:meth:`_idle`: finish, or wake up later).
    :meth:`pump` may be called again from inside work it starts (an attempt that ends at once);
    the running loop then carries on. After ``BURST`` starts in a row the reactor gets a turn
    before more start, so work that ends at once (a dead server) cannot starve it.
    """

    BURST = 100

    def __init__(self, clock: IReactorTime, done: defer.Deferred[None]) -> None:
        self.done = done
        self.ended = False
        self._pumping = False
        self._again = False
        self._alarm = Alarm(clock, self.pump)

    def start(self) -> defer.Deferred[None]:
        """Start the work; ``done`` fires when it has all ended, or fails with the run."""
        self.pump()
        return self.done

    def pump(self) -> None:
        """Start what there is room for; else let :meth:`_idle` decide what comes next."""
        if self._pumping:
            self._again = True
            return
        self._pumping = True
        started = 0
        try:
            while not self.ended:
                self._again = False
                while started < self.BURST and not self.ended and self._start_one():
                    started += 1
                if not self._again:
                    break
        except BaseException:
            self._fail(Failure())
            return
        finally:
            self._pumping = False
        if started >= self.BURST:
            self._alarm.within(0.0)
        elif not self.ended:
            self._idle()

    def _start_one(self) -> bool:
        raise NotImplementedError

    def _idle(self) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        self._end()
        self.done.callback(None)

    def _end(self) -> None:
        self.ended = True
        self._alarm.cancel()

    def _fail(self, failure: Failure) -> None:
        if self.ended:
            return
        self._end()
        self._abandon()
        self.done.errback(failure)

    def _abandon(self) -> None:
        """The run failed: let go of what is still in flight (nothing to do by default)."""


def when_done(observed: defer.Deferred[Any]) -> defer.Deferred[None]:
    """A new Deferred that fires (with None) when ``observed`` fires, leaving its result alone."""
    done: defer.Deferred[None] = defer.Deferred()

    def fire(result: object) -> object:
        done.callback(None)
        return result

    observed.addBoth(fire)
    return done


def install_signal_handlers(reactor: Reactor, interrupt: Callable[[], None]) -> Callable[[], None]:
    """Route SIGINT and SIGTERM to ``interrupt`` on the reactor thread; returns the undo."""
    previous: dict[int, Any] = {}
    call_from_thread = IReactorFromThreads(reactor).callFromThread

    def handler(signum: int, frame: Any) -> None:
        call_from_thread(interrupt)

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError):  # not the main thread
            previous[sig] = signal.signal(sig, handler)

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore
