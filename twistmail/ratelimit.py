"""Rate limits on the reactor's clock: a token bucket, a rate shared by many processes through
a schedule of slots, per-domain concurrency caps, and the check of the rate's promise."""

from __future__ import annotations

import contextlib
import math
from collections import deque
from collections.abc import Callable, Iterable

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["DomainLimiter", "SharedDomainLimiter", "SharedRate", "TokenBucket", "window_violation"]

log = Logger()

# A slot's time reached by a timer set for it, give or take float rounding.
_EPSILON = 1e-9

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


class SharedRate:
    """At most ``rate`` MAIL commands a second over every process sharing one schedule.

    The schedule is a sequence of slots :attr:`interval` apart kept elsewhere (a table in the
    queue's database): ``reserve(count)`` fires with ``(first, now)``, ``count`` consecutive
    slots from ``first`` on the schedule's clock, whose time was ``now`` when they were taken.
    Each process reserves a few slots at a time (as many as its connections wait for, up to
    ``batch``) and lets a connection write its MAIL at a slot's time, on its own clock (the
    offset between the two clocks measured at each reservation, erring late). A slot not used
    within :attr:`slack` (a quarter of a slot) of its time is dropped, never used late: the
    slots used in a window ``[a, a + w]`` lie in ``[a - slack, a + w]``, so there are at most
    ``ceil(rate * w) + 1`` of them, all processes together.

    What the server sees also carries the network's and the processes' jitter, so the slots
    are ``1 / (rate * (1 - headroom))`` apart: with the default 5 %, the bound holds at the
    server for jitter up to about 80 ms at 25 messages a second (50 ms at 500), at 95 % of the
    rate.

    Provides the :class:`~twistmail.smtp._protocol.Throttle` interface, as :class:`TokenBucket`.
    A reservation that fails (the database is away) is tried again after ``retry`` seconds;
    the waiting connections wait.
    """

    def __init__(
        self,
        clock: IReactorTime,
        rate: float,
        reserve: Callable[[int], defer.Deferred[tuple[float, float]]],
        *,
        batch: int | None = None,
        retry: float = 1.0,
        headroom: float = 0.05,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        if not 0 <= headroom < 1:
            raise ValueError("headroom must be at least 0 and below 1")
        self._clock = clock
        self.rate = float(rate)
        self.interval = 1.0 / (self.rate * (1 - headroom))
        """Seconds between two slots of the schedule (what ``reserve`` must be told)."""
        self.slack = self.interval / 4
        self.batch = batch if batch is not None else max(1, min(50, math.ceil(rate / 4)))
        self._reserve = reserve
        self._retry = retry
        self._slots: deque[float] = deque()  # local times, ascending
        self._waiters: deque[defer.Deferred[None]] = deque()
        self._reserving = False
        self._timer: IDelayedCall | None = None
        self.dropped = 0
        """Slots dropped unused (their time passed by more than the slack)."""
        self.reservations = 0
        """Reservations answered so far."""

    def _drop_late(self, now: float) -> None:
        slots = self._slots
        while slots and now - slots[0] > self.slack:
            slots.popleft()
            self.dropped += 1

    def try_take(self) -> bool:
        """Take a slot whose time has come, if nobody is waiting for one."""
        if self._waiters:
            return False
        now = self._clock.seconds()
        self._drop_late(now)
        if self._slots and self._slots[0] <= now + _EPSILON:
            self._slots.popleft()
            return True
        return False

    def acquire(self) -> defer.Deferred[None]:
        """Fires at the caller's slot; cancelling gives the place up."""
        if self.try_take():
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred(self._cancel)
        self._waiters.append(waiter)
        self._serve()
        return waiter

    def _cancel(self, waiter: defer.Deferred[None]) -> None:
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)
        if not self._waiters:
            self._cancel_timer()

    def _serve(self) -> None:
        """Hand the slots whose time has come to the waiters, in order; reserve more when
        the waiters outnumber the slots; wake at the next slot."""
        self._cancel_timer()
        now = self._clock.seconds()
        self._drop_late(now)
        slots, waiters = self._slots, self._waiters
        while waiters and slots and slots[0] <= now + _EPSILON:
            slots.popleft()
            waiters.popleft().callback(None)
        if not waiters:
            return
        if len(waiters) > len(slots) and not self._reserving:
            self._take_more(len(waiters) - len(slots))
            if not self._reserving:
                return  # answered at once: served by then
        if slots and self._timer is None:
            self._timer = self._clock.callLater(max(0.0, slots[0] - now), self._due)

    def _due(self) -> None:
        self._timer = None
        self._serve()

    def _take_more(self, wanted: int) -> None:
        count = min(wanted, self.batch)
        self._reserving = True

        def reserved(answer: tuple[float, float]) -> None:
            self._reserving = False
            self.reservations += 1
            first, shared_now = answer
            offset = self._clock.seconds() - shared_now  # late by the answer's trip: safe
            new = (offset + first + i * self.interval for i in range(count))
            self._slots = deque(sorted([*self._slots, *new]))
            self._serve()

        def failed(failure: Failure) -> None:
            self._reserving = False
            log.failure(
                "reserving sending slots failed; again in {delay} s", failure, delay=self._retry
            )
            if self._waiters and self._timer is None:
                self._timer = self._clock.callLater(self._retry, self._due)

        self._reserve(count).addCallbacks(reserved, failed)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


def window_violation(times: Iterable[float], rate: float) -> tuple[float, float, int, int] | None:
    """A window breaking "at most ``ceil(rate * w) + 1`` events in any window of ``w >= 1``
    seconds" among event ``times``, as ``(start, end, events, allowed)``; None if none does.

    The windows checked are those from one event to another (closed): any window holding more
    than allowed holds such a one, no wider, holding as many. Linear after sorting, so it
    checks a run of a million events: a window of ``t_j - t_i < 1`` s breaks the bound when it
    holds more than ``ceil(rate) + 1`` events (two pointers); a wider one when
    ``j - i > ceil(rate * (t_j - t_i))``, that is ``f(j) - f(i) >= 1`` for
    ``f(k) = k - rate * t_k`` (a running minimum of ``f`` over the events at least 1 s back).
    """
    ordered = sorted(times)
    narrow = math.ceil(rate - 1e-9) + 1
    start = 0
    for end, at in enumerate(ordered):
        while at - ordered[start] >= 1.0:
            start += 1
        if end - start + 1 > narrow:
            return ordered[start], at, end - start + 1, narrow
    lowest: int | None = None  # the i, among those at least 1 s back, with the lowest f(i)
    back = 0
    for j, at in enumerate(ordered):
        while back < j and at - ordered[back] >= 1.0:
            if lowest is None or back - rate * ordered[back] < lowest - rate * ordered[lowest]:
                lowest = back
            back += 1
        if lowest is not None:
            width = at - ordered[lowest]
            allowed = math.ceil(rate * width - 1e-9) + 1
            if j - lowest + 1 > allowed:
                return ordered[lowest], at, j - lowest + 1, allowed
    return None


class SharedDomainLimiter:
    """At most ``cap`` deliveries in flight per recipient domain over every process sharing a
    table of domain slots (the queue's database), with :class:`DomainLimiter`'s interface.

    ``take(domain, count)`` fires with how many of ``count`` slots the table gave this process
    (it never holds more than ``cap`` for a domain, all processes together); ``give(domain,
    count)`` hands slots back. A process keeps a slot while deliveries of its own wait for
    that domain (handed from one to the next, no round trip) and gives it back when none does.
    When the table has none free, it asks again every ``poll`` seconds, doubling up to
    ``max_poll``. Slots of a process that died come free when their lease (kept by the
    store, renewed by the caller) runs out.
    """

    def __init__(
        self,
        clock: IReactorTime,
        cap: int,
        take: Callable[[str, int], defer.Deferred[int]],
        give: Callable[[str, int], defer.Deferred[object]],
        *,
        poll: float = 0.05,
        max_poll: float = 1.0,
    ) -> None:
        if cap < 1:
            raise ValueError("per-domain cap must be at least 1")
        self.cap = cap
        self._clock = clock
        self._take = take
        self._give = give
        self._poll = poll
        self._max_poll = max_poll
        self._held: dict[str, int] = {}  # slots this process holds, by domain
        self._busy: dict[str, int] = {}  # of which in use
        self._waiters: dict[str, deque[defer.Deferred[None]]] = {}
        self._asking: set[str] = set()
        self._timers: dict[str, IDelayedCall] = {}

    def acquire(self, domain: str) -> defer.Deferred[None]:
        """Fires when a slot for ``domain`` is this delivery's; pair with :meth:`release`."""
        if self._held.get(domain, 0) > self._busy.get(domain, 0):
            self._busy[domain] = self._busy.get(domain, 0) + 1
            return defer.succeed(None)

        def cancel(d: defer.Deferred[None]) -> None:
            with contextlib.suppress(ValueError):
                self._waiters.get(domain, deque()).remove(d)
            self._none_waiting(domain)

        waiter: defer.Deferred[None] = defer.Deferred(cancel)
        self._waiters.setdefault(domain, deque()).append(waiter)
        self._ask(domain, self._poll)
        return waiter

    def release(self, domain: str) -> None:
        """Free the slot taken for ``domain``: the next delivery waiting here gets it, or it
        goes back to the table."""
        self._busy[domain] -= 1
        waiting = self._waiters.get(domain)
        if waiting:
            self._busy[domain] += 1
            waiting.popleft().callback(None)
            self._none_waiting(domain)
            return
        self._held[domain] -= 1
        if not self._held[domain]:
            del self._held[domain], self._busy[domain]
        self._give(domain, 1).addErrback(
            lambda f: log.failure("giving back a slot of {domain} failed", f, domain=domain)
        )

    def active(self, domain: str) -> int:
        """Deliveries of this process to ``domain`` holding a slot now."""
        return self._busy.get(domain, 0)

    def _none_waiting(self, domain: str) -> None:
        """Once nothing waits for ``domain``, stop asking the table for it."""
        if self._waiters.get(domain):
            return
        self._waiters.pop(domain, None)
        timer = self._timers.pop(domain, None)
        if timer is not None and timer.active():
            timer.cancel()

    def _ask(self, domain: str, delay: float) -> None:
        if domain in self._asking or domain in self._timers:
            return
        waiting = self._waiters.get(domain)
        if not waiting:
            return
        self._asking.add(domain)
        count = min(len(waiting), self.cap)

        def taken(got: int) -> None:
            self._asking.discard(domain)
            if got:
                self._held[domain] = self._held.get(domain, 0) + got
                self._busy.setdefault(domain, 0)
                queue = self._waiters.get(domain, deque())
                for _ in range(got):
                    if queue:
                        self._busy[domain] += 1
                        queue.popleft().callback(None)
                    else:  # a waiter gave up meanwhile: the slot goes back
                        self._held[domain] -= 1
                        self._give(domain, 1).addErrback(
                            lambda f: log.failure("giving back a slot failed", f)
                        )
                if not self._held[domain]:
                    del self._held[domain], self._busy[domain]
            self._retry(domain, self._poll if got else min(self._max_poll, delay * 2))

        def failed(failure: Failure) -> None:
            self._asking.discard(domain)
            log.failure("taking slots of {domain} failed", failure, domain=domain)
            self._retry(domain, min(self._max_poll, delay * 2))

        self._take(domain, count).addCallbacks(taken, failed)

    def _retry(self, domain: str, delay: float) -> None:
        if not self._waiters.get(domain):
            self._waiters.pop(domain, None)
            return

        def again() -> None:
            del self._timers[domain]
            self._ask(domain, delay)

        self._timers[domain] = self._clock.callLater(delay, again)
