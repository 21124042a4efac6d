"""Helpers for testing code that sends mail: a real SMTP server that captures what it receives.

:class:`CaptureServer` is Twisted's own ESMTP server (:class:`twisted.mail.smtp.ESMTP`) wired to
an in-memory outbox. Point a client at ``127.0.0.1`` and the port from :meth:`CaptureServer.listen`
and every accepted message lands in :attr:`CaptureServer.messages` as a :class:`CapturedMessage`
holding the envelope and the exact bytes that arrived (dot-unstuffed, CRLF line ends)::

    server = CaptureServer()
    port = server.listen().getHost().port
    ...  # send mail to 127.0.0.1:port
    assert server.messages[0].recipients == [b"alice@example.com"]
    yield server.stop()

It can also require AUTH (PLAIN, LOGIN, CRAM-MD5), offer STARTTLS, refuse chosen recipients and
keep a copy of every message in a Maildir.

:data:`outbox` is where the ``locmem`` backend puts what it "sends" (a list of
:class:`OutboxMessage`, like Django's ``mail.outbox``); the pytest plugin installed with twistmail
empties it before each test and offers it as the ``mail_outbox`` fixture.

:class:`MemoryQueue` is an in-memory :class:`~twistmail.interfaces.IQueue` (the contract the
SQLite queue keeps) for code that enqueues or works a queue, driven by an injected clock::

    clock = task.Clock()
    queue = MemoryQueue(clock=clock.seconds)

:class:`MemorySuppressionList` is an in-memory
:class:`~twistmail.interfaces.ISuppressionList`, for code that checks or adds suppressions.
"""

from __future__ import annotations

import functools
import mailbox
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import (
    CramMD5Credentials,
    IUsernameHashedPassword,
    IUsernamePassword,
)
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer, threads
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IOpenSSLServerConnectionCreator,
    IReactorThreads,
    ITCPTransport,
)
from twisted.internet.protocol import ServerFactory, connectionDone
from twisted.mail import smtp
from twisted.mail.imap4 import PLAINCredentials
from twisted.mail.interfaces import IMessageDelivery, IMessageDeliveryFactory, IMessageSMTP
from twisted.python.failure import Failure
from zope.interface import implementer

from twistmail._twisted import Reactor, default_reactor, when_done
from twistmail.backends.locmem import OutboxMessage, outbox
from twistmail.queue.memory import MemoryQueue
from twistmail.suppression.memory import MemorySuppressionList

__all__ = [
    "CaptureServer",
    "CapturedMessage",
    "MemoryQueue",
    "MemorySuppressionList",
    "OutboxMessage",
    "outbox",
]

_HOSTNAME = b"localhost"


@dataclass
class CapturedMessage:
    """One message accepted by a :class:`CaptureServer`, as it arrived on the wire."""

    sender: bytes
    """The ``MAIL FROM`` path without its angle brackets; ``b""`` for the null sender ``<>``."""
    recipients: list[bytes]
    """The accepted ``RCPT TO`` paths without angle brackets, in the order they were given."""
    data: bytes
    """The message content: CRLF line ends, dot-unstuffed, without the final ``.\\r\\n``."""
    mail_options: list[bytes] = field(default_factory=list)
    """ESMTP parameters given on ``MAIL FROM``, e.g. ``[b"BODY=8BITMIME"]``."""
    mail_at: float = field(default=0.0, compare=False)
    """When ``MAIL FROM`` was received, by the server's reactor's clock (for rate checks);
    not compared, so a test can compare captures with the messages it expects."""


class CaptureServer:
    """A real ESMTP server (Twisted's) that records every message it accepts.

    :param reactor: the reactor to listen on (ideally providing ``IReactorThreads`` too, for
        Maildir writes); the global reactor when omitted.
    :param maildir: also store each message in this Maildir (created if missing), with
        ``X-Twistmail-Envelope-From`` / ``X-Twistmail-Envelope-To`` headers prepended and
        LF line ends, as Maildir readers expect. Disk writes run in a thread, and the ``250``
        reply to the final dot waits for them.
    :param credentials: username -> password. When given, AUTH PLAIN, LOGIN and CRAM-MD5 are
        advertised and ``MAIL`` is refused with ``530`` until the client authenticates.
    :param auth_mechanisms: advertise only these of ``PLAIN``, ``LOGIN``, ``CRAM-MD5``.
    :param tls: a server TLS context factory (e.g. ``PrivateCertificate.options()``); when
        given, STARTTLS is advertised.
    :param rcpt_replies: local part -> ``(code, text)``: refuse ``RCPT TO`` for that local
        part with this 4xx or 5xx reply (e.g. ``{"busy": (451, "4.2.1 try later")}``).
    :param on_message: called with each :class:`CapturedMessage` once it is accepted (and
        stored); if it raises, the client gets a ``550`` and the error is logged.
    """

    def __init__(
        self,
        reactor: Reactor | None = None,
        *,
        maildir: str | os.PathLike[str] | None = None,
        credentials: Mapping[str, str] | None = None,
        auth_mechanisms: Sequence[str] | None = None,
        tls: IOpenSSLServerConnectionCreator | None = None,
        rcpt_replies: Mapping[str, tuple[int, str]] | None = None,
        on_message: Callable[[CapturedMessage], None] | None = None,
    ) -> None:
        self._reactor = reactor if reactor is not None else default_reactor()
        self.messages: list[CapturedMessage] = []
        """Every accepted message, in the order the final dots were acknowledged."""
        self.connections = 0
        """How many SMTP connections have been accepted so far."""
        self._rcpt_replies = dict(rcpt_replies or {})
        for local_part, (code, text) in self._rcpt_replies.items():
            if not 400 <= code <= 599 or not text.isascii() or "\n" in text or "\r" in text:
                raise ValueError(f"rcpt_replies[{local_part!r}] must be a 4xx/5xx one-line reply")
        self._on_message = on_message
        self._tls = tls
        self._maildir = mailbox.Maildir(os.fspath(maildir), create=True) if maildir else None
        self._delivery_factory = _DeliveryFactory(self)
        self._portal: Portal | None = None
        self._challengers: dict[bytes, Callable[[], object]] = {}
        if credentials is not None:
            self._portal = Portal(_Realm(self._delivery_factory), [_PasswordChecker(credentials)])
            self._challengers = {
                b"PLAIN": PLAINCredentials,
                b"LOGIN": smtp.LOGINCredentials,
                b"CRAM-MD5": functools.partial(CramMD5Credentials, _HOSTNAME),
            }
            if auth_mechanisms is not None:
                wanted = {name.upper().encode("ascii") for name in auth_mechanisms}
                unknown = wanted - set(self._challengers)
                if unknown:
                    raise ValueError(f"unknown AUTH mechanisms: {sorted(unknown)}")
                self._challengers = {k: v for k, v in self._challengers.items() if k in wanted}
        self._port: IListeningPort | None = None
        self._protocols: dict[_CaptureESMTP, defer.Deferred[None]] = {}
        self._pending: set[defer.Deferred[None]] = set()

    def listen(self, port: int = 0, interface: str = "127.0.0.1") -> IListeningPort:
        """Start listening; ``listen().getHost().port`` is the port actually bound."""
        if self._port is not None:
            raise RuntimeError("CaptureServer is already listening")
        self._port = self._reactor.listenTCP(port, _CaptureFactory(self), interface=interface)
        return self._port

    @property
    def port(self) -> int:
        """The TCP port bound by :meth:`listen`."""
        if self._port is None:
            raise RuntimeError("CaptureServer is not listening")
        return cast(IPv4Address, self._port.getHost()).port

    def stop(self) -> defer.Deferred[None]:
        """Stop listening, close every open connection and wait for pending Maildir writes.

        Connections are aborted, not closed politely, so that a stalled or idle client cannot
        hold the server (and its idle-timeout timer) open.
        """
        waits = [when_done(d) for d in [*self._pending, *self._protocols.values()]]
        port, self._port = self._port, None
        if port is not None:
            waits.append(when_done(defer.maybeDeferred(port.stopListening)))
        for protocol in list(self._protocols):
            cast(ITCPTransport, protocol.transport).abortConnection()
        return defer.gatherResults(waits).addCallback(lambda _: None)

    # Called by the protocol and the transactions.

    def _connection_made(self, protocol: _CaptureESMTP) -> None:
        self.connections += 1
        self._protocols[protocol] = defer.Deferred()

    def _connection_lost(self, protocol: _CaptureESMTP) -> None:
        lost = self._protocols.pop(protocol, None)
        if lost is not None:
            lost.callback(None)

    def _call_later(self, delay: float, function: Callable[[], object]) -> IDelayedCall:
        return self._reactor.callLater(delay, function)

    def _accept(self, message: CapturedMessage) -> defer.Deferred[None]:
        if self._maildir is None:
            stored: defer.Deferred[None] = defer.succeed(None)
        else:
            stored = self._in_thread(self._store, self._maildir, message)
        self._pending.add(stored)

        def accepted(_: None) -> None:
            self._pending.discard(stored)
            self.messages.append(message)
            if self._on_message is not None:
                self._on_message(message)

        def failed(reason: Failure) -> Failure:
            self._pending.discard(stored)
            return reason

        return stored.addCallbacks(accepted, failed)

    def _in_thread(
        self, function: Callable[[mailbox.Maildir, CapturedMessage], None], *args: Any
    ) -> defer.Deferred[None]:
        if IReactorThreads.providedBy(self._reactor):
            reactor = IReactorThreads(self._reactor)
            return threads.deferToThreadPool(reactor, reactor.getThreadPool(), function, *args)
        return threads.deferToThread(function, *args)

    @staticmethod
    def _store(maildir: mailbox.Maildir, message: CapturedMessage) -> None:
        envelope = [b"X-Twistmail-Envelope-From: <" + message.sender + b">\n"]
        envelope += [b"X-Twistmail-Envelope-To: <" + to + b">\n" for to in message.recipients]
        maildir.add(b"".join(envelope) + message.data.replace(b"\r\n", b"\n"))


class _CaptureFactory(ServerFactory):
    noisy = False

    def __init__(self, server: CaptureServer) -> None:
        self._server = server

    def buildProtocol(self, addr: object) -> _CaptureESMTP:
        protocol = _CaptureESMTP(self._server)
        protocol.factory = self
        return protocol


class _CaptureESMTP(smtp.ESMTP):
    """Twisted's ESMTP server, adjusted to capture messages faithfully.

    What Twisted hands to ``IMessage.lineReceived``: one line at a time, split on CRLF with the
    CRLF removed and the leading transparency dot removed. It may also inject a ``Received:``
    header (suppressed: our ``receivedHeader`` returns None) and a blank line before a body that
    starts without a header (suppressed in :meth:`do_DATA`), so the original bytes are exactly
    the lines, each followed by CRLF.
    """

    noisy = False

    def __init__(self, server: CaptureServer) -> None:
        super().__init__(server._challengers, server._tls)  # type: ignore[no-untyped-call]
        self.host = _HOSTNAME
        self.portal = server._portal  # type: ignore[assignment]
        self.deliveryFactory = server._delivery_factory
        self._server = server
        self._mail_options: list[bytes] = []

    def callLater(self, period: float, func: Callable[[], object]) -> IDelayedCall:
        # TimeoutMixin uses the global reactor by default; use ours.
        return self._server._call_later(period, func)

    def connectionMade(self) -> None:
        self._server._connection_made(self)
        super().connectionMade()  # type: ignore[no-untyped-call]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)  # type: ignore[no-untyped-call]
        self._server._connection_lost(self)

    def extensions(self) -> dict[bytes, list[bytes] | None]:
        extensions = cast(dict[bytes, "list[bytes] | None"], super().extensions())  # type: ignore[no-untyped-call]
        # LineOnlyReceiver hands the bytes through untouched: the server is 8-bit clean.
        extensions[b"8BITMIME"] = None
        return extensions

    def do_MAIL(self, rest: bytes) -> None:
        # Twisted parses the ESMTP parameters but drops them; keep them for the capture.
        match = self.mail_re.match(rest)
        options = match.group("opts") if match else None
        self._mail_options = options.split() if options else []
        super().do_MAIL(rest)  # type: ignore[no-untyped-call]

    def validateFrom(self, helo: tuple[bytes, bytes], origin: smtp.Address) -> object:
        if self.portal is not None and not self.authenticated:
            raise smtp.SMTPServerError(530, "5.7.0 Authentication required")
        result = super().validateFrom(helo, origin)  # type: ignore[no-untyped-call]
        # With a delivery factory, Twisted has just made this transaction's delivery object.
        if isinstance(self.delivery, _Transaction):
            self.delivery.mail_options = self._mail_options
        return result

    def do_DATA(self, rest: bytes) -> None:
        super().do_DATA(rest)  # type: ignore[no-untyped-call]
        if self.mode == smtp.DATA:
            # Stop SMTP.dataLineReceived from inserting a blank line before a body that
            # does not start with a header: we want the bytes as sent.
            self._SMTP__inheader = 1


@implementer(IMessageDeliveryFactory)
class _DeliveryFactory:
    def __init__(self, server: CaptureServer) -> None:
        self._server = server

    def getMessageDelivery(self) -> _Transaction:
        return _Transaction(self._server)


@implementer(IMessageDelivery)
class _Transaction:
    """One mail transaction (MAIL, RCPT..., DATA): Twisted asks for a new one at each MAIL."""

    def __init__(self, server: CaptureServer) -> None:
        self._server = server
        self.sender = b""
        self.recipients: list[bytes] = []
        self.mail_options: list[bytes] = []
        self.mail_at = 0.0
        self.lines: list[bytes] = []

    def receivedHeader(
        self, helo: tuple[bytes, bytes], origin: smtp.Address, recipients: list[smtp.User]
    ) -> None:
        return None

    def validateFrom(self, helo: tuple[bytes, bytes], origin: smtp.Address) -> smtp.Address:
        self.sender = _strip_angles(origin.addrstr)
        self.mail_at = self._server._reactor.seconds()
        return origin

    def validateTo(self, user: smtp.User) -> Callable[[], IMessageSMTP]:
        local_part = user.dest.local.decode("utf-8", "surrogateescape")
        reply = self._server._rcpt_replies.get(local_part)
        if reply is not None:
            raise smtp.SMTPServerError(*reply)
        self.recipients.append(_strip_angles(user.dest.addrstr))
        # Twisted makes one IMessage per recipient and feeds each every line; only the
        # first records, and only the first one's end-of-message completes the capture.
        primary = len(self.recipients) == 1
        return lambda: _RecipientMessage(self, primary)

    def finish(self) -> defer.Deferred[None]:
        message = CapturedMessage(
            sender=self.sender,
            recipients=list(self.recipients),
            data=b"".join(line + b"\r\n" for line in self.lines),
            mail_options=list(self.mail_options),
            mail_at=self.mail_at,
        )
        return self._server._accept(message)


@implementer(IMessageSMTP)
class _RecipientMessage:
    def __init__(self, transaction: _Transaction, primary: bool) -> None:
        self._transaction = transaction
        self._primary = primary

    def lineReceived(self, line: bytes) -> None:
        if self._primary:
            self._transaction.lines.append(line)

    def eomReceived(self) -> defer.Deferred[None]:
        if self._primary:
            return self._transaction.finish()
        return defer.succeed(None)

    def connectionLost(self) -> None:
        """The message was cut short: nothing to keep."""


def _strip_angles(path: bytes) -> bytes:
    path = path.strip()
    if path.startswith(b"<") and path.endswith(b">"):
        return path[1:-1]
    return path


@implementer(ICredentialsChecker)
class _PasswordChecker:
    credentialInterfaces = (IUsernamePassword, IUsernameHashedPassword)

    def __init__(self, credentials: Mapping[str, str]) -> None:
        self._passwords = {
            user.encode("utf-8"): password.encode("utf-8") for user, password in credentials.items()
        }

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[bytes | tuple[()]]:
        username = credentials.username
        password = self._passwords.get(username) if isinstance(username, bytes) else None
        if password is None:
            return defer.fail(UnauthorizedLogin())

        def matched(ok: bool) -> bytes | tuple[()]:
            if not ok:
                raise UnauthorizedLogin()
            return cast(bytes, username)

        return defer.maybeDeferred(credentials.checkPassword, password).addCallback(matched)


@implementer(IRealm)
class _Realm:
    """Hands every authenticated client the server's delivery factory."""

    def __init__(self, delivery_factory: _DeliveryFactory) -> None:
        self._delivery_factory = delivery_factory

    def requestAvatar(
        self, avatarId: bytes | tuple[()], mind: object, *interfaces: Any
    ) -> tuple[Any, object, Callable[[], None]]:
        if IMessageDeliveryFactory in interfaces:
            return IMessageDeliveryFactory, self._delivery_factory, lambda: None
        raise NotImplementedError(interfaces)
