"""Rate limits on the reactor's clock: a global token bucket and per-domain concurrency caps."""

from __future__ import annotations

import contextlib
from collections import deque

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = ["DomainLimiter", "TokenBucket"]

# A token refilled to within float rounding of whole counts as whole: a timer set for the
# exact refill time must find it there, or it would re-arm itself for no time at all.
_WHOLE = 1 - 1e-9


class TokenBucket:
    """At most ``rate`` acquisitions per second on average, with bursts of up to ``burst``.

    With the default ``burst`` of 1, any window of ``w`` seconds holds at most
    ``ceil(rate * w) + 1`` acquisitions. :meth:`acquire` fires at once while tokens remain,
    otherwise when the bucket refills; waiters are served in order by a single timer (no
    polling, no sleeping).
    """

    def __init__(self, clock: IReactorTime, rate: float, burst: float | None = None) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self._clock = clock
        self.rate = float(rate)
        self.burst = float(burst) if burst is not None else 1.0
        if self.burst < 1:
            raise ValueError("burst must be at least 1")
        self._tokens = self.burst
        self._stamp = clock.seconds()
        self._waiters: deque[defer.Deferred[None]] = deque()
        self._timer: IDelayedCall | None = None

    def _refill(self) -> None:
        now = self._clock.seconds()
        elapsed = now - self._stamp
        if elapsed > 0:
            self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
        self._stamp = now

    def try_take(self) -> bool:
        """Take a token if one is free now and nobody is waiting for one."""
        if self._waiters:
            return False
        self._refill()
        if self._tokens >= _WHOLE:
            self._tokens -= 1
            return True
        return False

    def acquire(self) -> defer.Deferred[None]:
        """Fires when the caller may go ahead; cancelling gives the place up."""
        if not self._waiters:
            self._refill()
            if self._tokens >= _WHOLE:
                self._tokens -= 1
                return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred(self._cancel)
        self._waiters.append(waiter)
        self._schedule()
        return waiter

    def _cancel(self, waiter: defer.Deferred[None]) -> None:
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)
        if not self._waiters and self._timer is not None and self._timer.active():
            self._timer.cancel()
            self._timer = None

    def _schedule(self) -> None:
        if self._timer is not None and self._timer.active():
            return
        self._refill()
        wait = max(0.0, (1 - self._tokens) / self.rate)
        self._timer = self._clock.callLater(wait, self._wake)

    def _wake(self) -> None:
        self._timer = None
        self._refill()
        while self._waiters and self._tokens >= _WHOLE:
            self._tokens -= 1
            self._waiters.popleft().callback(None)
        if self._waiters:
            self._schedule()


class DomainLimiter:
    """At most ``cap`` concurrent deliveries per recipient domain."""

    def __init__(self, cap: int) -> None:
        if cap < 1:
            raise ValueError("per-domain cap must be at least 1")
        self.cap = cap
        self._sems: dict[str, defer.DeferredSemaphore] = {}

    def acquire(self, domain: str) -> defer.Deferred[None]:
        """Fires when a slot for ``domain`` is free; pair with :meth:`release`."""
        sem = self._sems.get(domain)
        if sem is None:
            sem = self._sems[domain] = defer.DeferredSemaphore(self.cap)
        d = sem.acquire()
        return d.addCallback(lambda _: None)

    def release(self, domain: str) -> None:
        """Free the slot taken for ``domain``."""
        sem = self._sems[domain]
        sem.release()
        if sem.tokens == sem.limit and not sem.waiting:
            del self._sems[domain]

    def active(self, domain: str) -> int:
        """Deliveries to ``domain`` holding a slot now."""
        sem = self._sems.get(domain)
        return 0 if sem is None else sem.limit - sem.tokens
