"""A bounded pool of ready SMTP connections to one server."""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from ..errors import ConnectionLostError
from ._protocol import MailerProtocol

__all__ = ["ConnectionPool"]


class ConnectionPool:
    """Up to ``size`` connections, reused from one message to the next.

    A connection carries one transaction at a time, or up to ``depth`` queued transactions when
    the server offers PIPELINING (the next message's commands then go out in the same write as
    the previous message's body). New connections are opened, up to ``size``, before a busy
    one takes a second transaction. A connection that stays idle for ``idle_timeout`` seconds
    is closed with QUIT; one the server closes (421, a drop) is forgotten and replaced on the
    next demand.
    """

    def __init__(
        self,
        connect: Callable[[], defer.Deferred[MailerProtocol]],
        *,
        size: int,
        clock: IReactorTime,
        idle_timeout: float = 30.0,
        depth: int = 1,
    ) -> None:
        if size < 1:
            raise ValueError("pool size must be at least 1")
        if depth < 1:
            raise ValueError("pipeline depth must be at least 1")
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

    @property
    def open_connections(self) -> int:
        """Connections currently open (idle or in use)."""
        return len(self._all)

    @property
    def has_room(self) -> bool:
        """Another connection may be opened: :meth:`acquire` would open one rather than wait."""
        return not self._closed and len(self._all) + len(self._connecting) < self.size

    def acquire(self) -> defer.Deferred[MailerProtocol]:
        """A ready connection for one transaction, until :meth:`release`."""
        if self._closed:
            return defer.fail(ConnectionLostError("the connection pool is closed"))
        proto = self.acquire_now()
        if proto is not None:
            return defer.succeed(proto)
        waiter: defer.Deferred[MailerProtocol] = defer.Deferred(self._cancel_waiter)
        self._waiters.append(waiter)
        if self.has_room:
            self._open()
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
        if self._waiters:
            self._waiters.popleft().callback(self._take(proto))
            # With PIPELINING one connection takes several transactions: serve the waiters
            # that the connections still being opened will not.
            while (
                len(self._waiters) > len(self._connecting)
                and proto.usable
                and self._load.get(proto, 0) < self._capacity(proto)
            ):
                self._waiters.popleft().callback(self._take(proto))
            return
        if load > 0:
            self._partial[proto] = None
            return
        self._partial.pop(proto, None)
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
            waiter.errback(ConnectionLostError("the connection pool was closed"))
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

    # ------------------------------------------------------------------ internals

    def _open(self) -> None:
        self.connections_opened += 1
        attempt = self._connect()
        self._connecting.add(attempt)

        def opened(proto: MailerProtocol) -> None:
            self._connecting.discard(attempt)
            self._all.add(proto)
            proto.lost.addCallback(lambda _: self._lost(proto))
            if self._closed:
                proto.quit()
                return
            self._load[proto] = 1
            self.release(proto)  # to a waiter, or idle

        def failed(reason: Failure) -> None:
            self._connecting.discard(attempt)
            if self._closed:
                return
            # Waiters that no live or pending connection will serve get this error.
            serving = len(self._all) + len(self._connecting)
            while len(self._waiters) > serving:
                self._waiters.popleft().errback(reason)

        attempt.addCallbacks(opened, failed)

    def _cancel_waiter(self, waiter: defer.Deferred[MailerProtocol]) -> None:
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)
        # A connection being opened only for callers who gave up is not wanted either.
        if len(self._connecting) > len(self._waiters):
            attempt = next(iter(self._connecting))
            attempt.cancel()

    def _lost(self, proto: MailerProtocol) -> None:
        self._all.discard(proto)
        self._load.pop(proto, None)
        self._partial.pop(proto, None)
        self._capacities.pop(proto, None)
        self._stop_idle_timer(proto)
        with contextlib.suppress(ValueError):
            self._idle.remove(proto)
        if not self._closed and self._waiters:
            while len(self._all) + len(self._connecting) < min(self.size, len(self._waiters)):
                self._open()

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
