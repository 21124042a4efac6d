"""A bounded pool of ready SMTP connections to one server, that adapts to how the server behaves."""

from __future__ import annotations

import contextlib
import copy
import random as _random
from collections import deque
from collections.abc import Callable

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from ..errors import ConnectionLostError, DeliveryError
from ._protocol import MailerProtocol, Throttle

__all__ = ["ConnectionPool"]

# Clean connection ends at the learned message cap before one connection tries one more.
_GROW_CAP_AFTER = 8
_GROW_CAP_AFTER_MAX = 1024


class ConnectionPool:
    """Up to ``size`` connections, reused from one message to the next.

    A connection carries one transaction at a time, or up to ``depth`` queued transactions when
    the server offers PIPELINING (the next message's commands then go out in the same write as
    the previous message's body). New connections are opened, up to ``size``, before a busy
    one takes a second transaction. A connection that stays idle for ``idle_timeout`` seconds
    is closed with QUIT; one the server closes (421, a drop) is forgotten and replaced on the
    next demand.

    The pool adapts to the server:

    - **Circuit breaker.** A connection attempt that fails (no TCP connection, a TLS or login
      refusal, a session refused at the greeting) while no other connection is open or being
      opened makes the pool open no new connection for a backoff (``backoff`` seconds,
      doubling up to ``max_backoff``, with jitter): what was waiting fails at once with that
      error, and so does :meth:`acquire` until :attr:`retry_at`. Then one probe connection is
      tried; its success closes the breaker. Until a connection has succeeded since the last
      refusal (and at the start), only one connection attempt is made at a time.
    - **Connection limit.** An attempt refused while other connections are alive lowers the
      effective size (:attr:`limit`) to what is alive (at least 1); waiters stay queued for the
      live connections. One connection beyond the limit is tried again after a backoff that
      grows with each refusal.
    - **Message cap.** A connection the server ends early (a drop or a 421 with transactions
      unfinished) after N completed transactions teaches the pool a cap of N transactions per
      connection (:attr:`message_cap`): connections then QUIT on their own after N. After a
      run of connections that ended cleanly at the cap, one connection tries one more.

    Failures caused by the breaker, or by a connection that could not be made, carry
    ``attempted=False``: the server never saw the message.

    ``throttle`` (e.g. a :class:`~twistmail.ratelimit.TokenBucket`) paces MAIL commands over
    every connection: a token is taken right before each MAIL is written.
    """

    def __init__(
        self,
        connect: Callable[[], defer.Deferred[MailerProtocol]],
        *,
        size: int,
        clock: IReactorTime,
        idle_timeout: float = 30.0,
        depth: int = 1,
        throttle: Throttle | None = None,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        random: Callable[[], float] = _random.random,
    ) -> None:
        if size < 1:
            raise ValueError("pool size must be at least 1")
        if depth < 1:
            raise ValueError("pipeline depth must be at least 1")
        if backoff <= 0 or max_backoff < backoff:
            raise ValueError("backoff must be positive and at most max_backoff")
        self.depth = depth
        self._load: dict[MailerProtocol, int] = {}
        # Connections in use that can take another transaction (a dict as an ordered set).
        self._partial: dict[MailerProtocol, None] = {}
        self._capacities: dict[MailerProtocol, int] = {}
        self._connect = connect
        self.size = size
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._idle: deque[MailerProtocol] = deque()
        self._idle_timers: dict[MailerProtocol, IDelayedCall] = {}
        self._all: set[MailerProtocol] = set()
        self._connecting: set[defer.Deferred[MailerProtocol]] = set()
        self._waiters: deque[defer.Deferred[MailerProtocol]] = deque()
        self._closed = False
        self.connections_opened = 0
        """Connection attempts made so far."""
        self.connections_refused = 0
        """Connection attempts that failed (not counting ones the pool cancelled)."""
        self.throttle = throttle
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._random = random

        # Circuit breaker.
        self.breaker_error: DeliveryError | None = None
        """The last connection refusal not followed by a successful connection, else None."""
        self._retry_at: float | None = None
        self._failures = 0  # refusals in a row with nothing else alive
        self._proven = False  # a connection succeeded since the last refusal

        # Adaptive connection limit.
        self.limit = size
        """How many connections the pool opens at most now (``size`` until the server refuses)."""
        self._grow_failures = 0
        self._grow_at = 0.0
        self._growing: defer.Deferred[MailerProtocol] | None = None

        # Learned message cap.
        self.message_cap: int | None = None
        """At most this many transactions per connection (learned), or None."""
        self._clean_at_cap = 0
        self._grow_cap_after = _GROW_CAP_AFTER
        self._cap_probe: MailerProtocol | None = None
        self._probe_cap_next = False

    # ------------------------------------------------------------------ state

    @property
    def open_connections(self) -> int:
        """Connections currently open (idle or in use)."""
        return len(self._all)

    @property
    def retry_at(self) -> float | None:
        """Clock time from which a new connection may be tried after a refusal; None when
        no refusal has happened since the last successful connection."""
        return self._retry_at

    @property
    def breaker_open(self) -> bool:
        """:meth:`acquire` fails at once now: the server refused, no connection is alive or
        being made, and :attr:`retry_at` has not come yet."""
        return (
            self.breaker_error is not None
            and not self._all
            and not self._connecting
            and self._retry_at is not None
            and self._clock.seconds() < self._retry_at
        )

    @property
    def has_room(self) -> bool:
        """:meth:`acquire` would not merely wait for a busy connection: it would open one now
        (or fail at once, the breaker being open)."""
        if self._closed:
            return False
        alive = len(self._all) + len(self._connecting)
        if alive == 0:
            return True
        limit = self.limit
        if alive >= limit and (limit >= self.size or not self._may_grow()):
            return False  # the common busy case, decided without a clock reading
        return self._may_open()

    def _may_open(self) -> bool:
        if self._retry_at is not None and self._clock.seconds() < self._retry_at:
            return False
        # Until a connection succeeds after a refusal (or at the start): one attempt at a time.
        return self._proven or not self._connecting

    def _may_grow(self) -> bool:
        return (
            self.limit < self.size
            and self._growing is None
            and not self._connecting
            and self._clock.seconds() >= self._grow_at
        )

    # ------------------------------------------------------------------ acquire / release

    def acquire(self) -> defer.Deferred[MailerProtocol]:
        """A ready connection for one transaction, until :meth:`release`.

        Fails at once with the refusal (``attempted=False``) while the breaker is open.
        """
        if self._closed:
            return defer.fail(ConnectionLostError("the connection pool is closed", attempted=False))
        proto = self.acquire_now()
        if proto is not None:
            return defer.succeed(proto)
        if self.breaker_open:
            return defer.fail(self._refusal())
        waiter: defer.Deferred[MailerProtocol] = defer.Deferred(self._cancel_waiter)
        self._waiters.append(waiter)
        self._open_for_waiters()
        return waiter

    def acquire_now(self) -> MailerProtocol | None:
        """A connection that can take a transaction right now, else None (see :meth:`acquire`).

        None also when a new connection should be opened instead of sharing a busy one.
        """
        if self._closed:
            return None
        while self._idle:
            proto = self._idle.pop()  # the most recently used: warm, least likely to time out
            self._stop_idle_timer(proto)
            if proto.usable:
                return self._take(proto)
        if self.has_room:
            return None
        partial = self._partial
        while partial:
            proto = next(iter(partial))
            if proto.usable and self._load.get(proto, 0) < self._capacity(proto):
                return self._take(proto)
            del partial[proto]
        return None

    def release(self, proto: MailerProtocol) -> None:
        """Give a connection back after its transaction."""
        load = self._load.get(proto, 1) - 1
        if load > 0:
            self._load[proto] = load
        else:
            self._load.pop(proto, None)
        if not proto.usable:
            return  # its `lost` callback tidies up and replaces it if needed
        if self._closed:
            if load <= 0:
                proto.quit()
            return
        if load > 0 and not self._waiters:
            # The common case of a pipelining connection still busy: it has room again.
            if load < (self._capacities.get(proto) or self._capacity(proto)):
                self._partial[proto] = None
            return
        self._serve(proto)

    def _serve(self, proto: MailerProtocol) -> None:
        """Hand a usable connection to waiters while it has room; else keep it for later."""
        waiters = self._waiters
        if waiters:
            served = False
            while waiters and proto.usable and self._load.get(proto, 0) < self._capacity(proto):
                if served and self.has_room:
                    break  # new connections first, before one takes a second transaction
                served = True
                waiters.popleft().callback(self._take(proto))
            if not proto.usable:
                self._partial.pop(proto, None)
                return
        load = self._load.get(proto, 0)
        if load > 0:
            if load < self._capacity(proto):
                self._partial[proto] = None
            return
        self._partial.pop(proto, None)
        if proto in self._idle_timers:
            return
        self._idle.append(proto)
        self._idle_timers[proto] = self._clock.callLater(
            self._idle_timeout, self._idle_expired, proto
        )

    def _take(self, proto: MailerProtocol) -> MailerProtocol:
        load = self._load.get(proto, 0) + 1
        self._load[proto] = load
        if load < self._capacity(proto):
            self._partial[proto] = None
        else:
            self._partial.pop(proto, None)
        return proto

    def _capacity(self, proto: MailerProtocol) -> int:
        capacity = self._capacities.get(proto)
        if capacity is None:
            caps = getattr(proto, "capabilities", None)
            capacity = self.depth if caps is not None and caps.pipelining else 1
            if getattr(proto, "is_ready", False):  # capabilities are final once set up
                self._capacities[proto] = capacity
        return capacity

    def close(self) -> defer.Deferred[None]:
        """QUIT every connection; waiters fail. Fires once every connection has closed."""
        self._closed = True
        waiters, self._waiters = self._waiters, deque()
        for waiter in waiters:
            waiter.errback(ConnectionLostError("the connection pool was closed", attempted=False))
        for attempt in list(self._connecting):
            attempt.cancel()
        for proto in list(self._idle_timers):
            self._stop_idle_timer(proto)
        self._idle.clear()
        quits = [proto.quit() for proto in list(self._all)]
        d = defer.gatherResults(quits, consumeErrors=True)
        return d.addCallback(lambda _: None)

    def abort(self) -> None:
        """Drop every open connection now; their transactions fail as connection losses."""
        for proto in list(self._all):
            proto.abort()

    # ------------------------------------------------------------------ opening connections

    def _open_for_waiters(self) -> None:
        """Open connections for waiters, within the limit, the backoff and the probe rule."""
        while not self._closed and len(self._connecting) < len(self._waiters):
            alive = len(self._all) + len(self._connecting)
            if alive and not self._may_open():
                return
            if alive < self.limit:
                self._open()
            elif self._may_grow() and not self._partial:
                self._growing = self._open()
            else:
                return

    def _open(self) -> defer.Deferred[MailerProtocol]:
        self.connections_opened += 1
        attempt = self._connect()
        self._connecting.add(attempt)

        def opened(proto: MailerProtocol) -> None:
            self._connecting.discard(attempt)
            growing = self._growing is attempt
            if growing:
                self._growing = None
            self._all.add(proto)
            proto.lost.addCallback(lambda _: self._lost(proto))
            if self._closed:
                proto.quit()
                return
            self._connected(growing)
            if self.throttle is not None:
                proto.throttle = self.throttle
            self._apply_cap(proto)
            self._serve(proto)
            self._open_for_waiters()

        def failed(reason: Failure) -> None:
            self._connecting.discard(attempt)
            if self._growing is attempt:
                self._growing = None
            if self._closed:
                return
            if reason.check(defer.CancelledError):
                self._open_for_waiters()
                return
            self._refused(reason)

        attempt.addCallbacks(opened, failed)
        return attempt

    def _connected(self, growing: bool) -> None:
        """A connection attempt succeeded: the breaker closes; a probe beyond the limit grows it."""
        self._failures = 0
        self._retry_at = None
        self.breaker_error = None
        self._proven = True
        if growing or len(self._all) > self.limit:
            self.limit = min(self.size, max(self.limit, len(self._all)))
            self._grow_failures = 0
            self._grow_at = self._clock.seconds()

    def _refused(self, reason: Failure) -> None:
        self.connections_refused += 1
        error = reason.value
        if isinstance(error, DeliveryError):
            error.attempted = False
        now = self._clock.seconds()
        alive = len(self._all) + len(self._connecting)
        if alive:
            # The server serves the others: it limits how many connections we may have.
            self.limit = max(1, min(self.limit, alive))
            self._grow_failures += 1
            self._grow_at = now + self._delay(self._grow_failures)
            return
        self._failures += 1
        self._proven = False
        self._retry_at = now + self._delay(self._failures)
        waiters, self._waiters = self._waiters, deque()
        if isinstance(error, DeliveryError):
            self.breaker_error = error
            for waiter in waiters:
                waiter.errback(self._refusal())
        else:
            for waiter in waiters:
                waiter.errback(reason)

    def _delay(self, failures: int) -> float:
        base: float = min(self._max_backoff, self._backoff * 2.0 ** min(failures - 1, 30))
        return base * (0.75 + 0.5 * self._random())

    def _refusal(self) -> DeliveryError:
        """A copy of the breaker's error for one caller (callers may annotate their error)."""
        error = self.breaker_error
        assert error is not None
        mine = copy.copy(error)
        mine.attempted = False
        return mine

    def _cancel_waiter(self, waiter: defer.Deferred[MailerProtocol]) -> None:
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)
        # A connection being opened only for callers who gave up is not wanted either.
        if len(self._connecting) > len(self._waiters):
            attempt = next(iter(self._connecting))
            attempt.cancel()

    # ------------------------------------------------------------------ connections ending

    def _lost(self, proto: MailerProtocol) -> None:
        self._all.discard(proto)
        self._load.pop(proto, None)
        self._partial.pop(proto, None)
        self._capacities.pop(proto, None)
        self._stop_idle_timer(proto)
        with contextlib.suppress(ValueError):
            self._idle.remove(proto)
        self._learn_cap(proto)
        if not self._closed and self._waiters:
            self._open_for_waiters()

    def _apply_cap(self, proto: MailerProtocol) -> None:
        cap = self.message_cap
        if cap is None:
            return
        if self._probe_cap_next and self._cap_probe is None:
            self._probe_cap_next = False
            self._cap_probe = proto
            cap += 1
        proto.set_message_cap(cap)

    def _learn_cap(self, proto: MailerProtocol) -> None:
        """Lower the message cap after an early end; raise it after clean ends at the cap."""
        probe = self._cap_probe is proto
        if probe:
            self._cap_probe = None
        done = proto.transactions_done
        if proto.closed_early and done >= 1:
            cap = done if self.message_cap is None else min(self.message_cap, done)
            if probe:
                self._grow_cap_after = min(_GROW_CAP_AFTER_MAX, self._grow_cap_after * 2)
            self._clean_at_cap = 0
            if cap != self.message_cap:
                self.message_cap = cap
                for other in self._all:
                    if other.message_cap is None or other.message_cap > cap:
                        other.set_message_cap(cap)
            return
        carried = proto.message_cap
        if self.message_cap is None or carried is None or done < carried or proto.closed_early:
            if probe:
                self._probe_cap_next = True  # inconclusive: try again
            return
        if probe:
            self.message_cap = max(self.message_cap, carried)
            return
        self._clean_at_cap += 1
        if self._clean_at_cap >= self._grow_cap_after:
            self._clean_at_cap = 0
            self._probe_cap_next = True

    def _idle_expired(self, proto: MailerProtocol) -> None:
        self._idle_timers.pop(proto, None)
        try:
            self._idle.remove(proto)
        except ValueError:
            return
        proto.quit()

    def _stop_idle_timer(self, proto: MailerProtocol) -> None:
        timer = self._idle_timers.pop(proto, None)
        if timer is not None and timer.active():
            timer.cancel()
