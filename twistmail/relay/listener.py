"""The relay's submission listener: the sessions' shared limits, AUTH and shutdown.

:class:`SubmissionFactory` makes one :class:`~twistmail.relay.submission.Submission` per
connection and keeps what they share: the connection counts (in all and per client address),
the AUTH portal and failure limiter, the TLS context, and the relay's way of queueing a message.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.protocol import ServerFactory

from ..message import Envelope
from .auth import FailureLimiter
from .config import RelayConfig
from .submission import Submission

if TYPE_CHECKING:
    from ..bounces.smtp import BounceGate

__all__ = ["SubmissionFactory"]


class SubmissionFactory(ServerFactory):
    """Submission sessions sharing the relay's limits; ``accept`` queues one message.

    ``accept(envelope, client)`` fires with the queue id once the message is committed.
    ``portal`` (with ``mechanisms``) enables AUTH, offered only after STARTTLS or on a
    loopback listener; a failed login is answered 535 after ``auth_failure_delay`` seconds,
    and ``limiter`` turns an address away with 421 after too many. ``tls`` (a server TLS
    context) enables STARTTLS. ``on_session(+1 or -1)`` hears of each session opened or closed.
    ``bounces`` (``--bounce-domain``) takes mail from anyone to signed return paths and
    consumes it (:mod:`twistmail.bounces.smtp`).
    """

    protocol = Submission  # type: ignore[assignment]  # made by buildProtocol
    noisy = False

    def __init__(
        self,
        config: RelayConfig,
        accept: Callable[[Envelope, str], defer.Deferred[int]],
        *,
        clock: Any,
        portal: Any = None,
        mechanisms: dict[bytes, Any] | None = None,
        tls: Any = None,
        limiter: FailureLimiter | None = None,
        on_session: Callable[[int], None] | None = None,
        auth_failure_delay: float = 1.0,
        bounces: BounceGate | None = None,
    ) -> None:
        self.config = config
        self.host = config.hostname.encode("idna")
        # EHLO's extension lines by (STARTTLS offered, AUTH offered), made as first needed.
        self.ehlo_extensions: dict[tuple[bool, bool], bytes] = {}
        self.accept = accept
        self.clock = clock
        self.portal = portal
        self._mechanisms = mechanisms or {}
        self.tls = tls
        self.sessions: set[Submission] = set()
        self._per_client: Counter[str] = Counter()
        self._on_session = on_session
        self.limiter = limiter
        self.auth_failure_delay = auth_failure_delay
        self._gone: defer.Deferred[None] | None = None
        self.accepting = True
        self.bounces = bounces
        self._allowed: dict[str, bool] = {}  # client address -> in --allow-from
        # Sessions with an idle or DATA deadline, checked every _sweep_interval seconds: a
        # timeout fires at most that late (a quarter of the shorter timeout, 10 ms to 1 s).
        self._timed: set[Submission] = set()
        self._sweep_call: Any = None
        self._sweep_interval = max(min(config.idle_timeout, config.data_timeout, 4.0) / 4, 0.01)

    def buildProtocol(self, addr: Any) -> Submission:  # type: ignore[override]
        protocol = Submission(self)
        protocol.portal = self.portal
        return protocol

    def challengers(self) -> dict[bytes, Any]:
        """The AUTH mechanisms a session may offer (none without a users file)."""
        return dict(self._mechanisms) if self.portal is not None else {}

    def allowed(self, client_ip: str) -> bool:
        """Whether ``client_ip`` may submit without AUTH (``--allow-from``)."""
        known = self._allowed.get(client_ip)
        if known is None:
            if len(self._allowed) >= 4096:  # many clients: start again rather than grow
                self._allowed.clear()
            known = self._allowed[client_ip] = self._in_allow_from(client_ip)
        return known

    def _in_allow_from(self, client_ip: str) -> bool:
        try:
            address = ipaddress.ip_address(client_ip)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.config.allow_from)

    def login_failed(self, client_ip: str) -> None:
        """``client_ip`` gave wrong credentials."""
        if self.limiter is not None:
            self.limiter.failed(client_ip)

    def login_blocked(self, client_ip: str) -> bool:
        """Whether ``client_ip`` failed to log in too often lately (421 for a while)."""
        return self.limiter is not None and self.limiter.blocked(client_ip)

    def watch(self, session: Submission) -> None:
        """Check ``session``'s deadlines (``check_deadlines``) until :meth:`unwatch`."""
        self._timed.add(session)
        if self._sweep_call is None:
            self._sweep_call = self.clock.callLater(self._sweep_interval, self._sweep)

    def unwatch(self, session: Submission) -> None:
        """Stop checking ``session``'s deadlines (it is gone)."""
        self._timed.discard(session)
        if not self._timed and self._sweep_call is not None:
            call, self._sweep_call = self._sweep_call, None
            call.cancel()

    def _sweep(self) -> None:
        self._sweep_call = None
        now = self.clock.seconds()
        for session in list(self._timed):
            session.check_deadlines(now)
        if self._timed and self._sweep_call is None:
            self._sweep_call = self.clock.callLater(self._sweep_interval, self._sweep)

    def opened(self, session: Submission) -> str | None:
        """Count a new session; the 421 text if a connection limit refuses it."""
        if not self.accepting:
            return "4.3.2 Service shutting down, try again later"
        if self.login_blocked(session.client_ip):
            return "4.7.0 Too many failed logins from your address, try again later"
        if len(self.sessions) >= self.config.max_connections:
            return "4.7.0 Too many connections, try again later"
        if self._per_client[session.client_ip] >= self.config.max_connections_per_client:
            return "4.7.0 Too many connections from your address, try again later"
        self.sessions.add(session)
        self._per_client[session.client_ip] += 1
        if self._on_session is not None:
            self._on_session(1)
        return None

    def closed(self, session: Submission) -> None:
        """A session ended."""
        if session not in self.sessions:
            return
        self.sessions.discard(session)
        self._per_client[session.client_ip] -= 1
        if not self._per_client[session.client_ip]:
            del self._per_client[session.client_ip]
        if self._on_session is not None:
            self._on_session(-1)
        if not self.sessions and self._gone is not None:
            gone, self._gone = self._gone, None
            gone.callback(None)

    def shut_down(self, grace: float) -> defer.Deferred[None]:
        """Refuse new sessions, end idle ones with 421, let messages in DATA finish; fires once
        every session is gone (those left after ``grace`` seconds are cut off)."""
        self.accepting = False
        for session in list(self.sessions):
            session.shut_down()
        if not self.sessions:
            return defer.succeed(None)
        gone: defer.Deferred[None] = defer.Deferred()
        self._gone = gone
        timer = self.clock.callLater(grace, self._cut_off)
        return gone.addBoth(lambda r: timer.cancel() if timer.active() else None)

    def _cut_off(self) -> None:
        for session in list(self.sessions):
            session.transport.abortConnection()
