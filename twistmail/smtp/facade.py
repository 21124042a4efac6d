"""An smtplib-shaped facade over one twistmail connection, for porting smtplib code to Twisted.

Each method returns a Deferred instead of blocking::

    smtp = SMTP(ca_file="ca.pem")
    code, greeting = await smtp.connect("mail.example.com", 587)
    await smtp.starttls()
    await smtp.login("alice", password)
    refused = await smtp.send_message(msg)
    await smtp.quit()

As with smtplib, :meth:`~SMTP.connect`, :meth:`~SMTP.ehlo`, :meth:`~SMTP.starttls` and
:meth:`~SMTP.login` fire with the server's ``(code, message)``, the message as bytes with the
lines of a multi-line reply joined by ``\n``.

The session handshake (greeting, EHLO, STARTTLS, AUTH) is Twisted's ``ESMTPClient``, which
negotiates TLS and authentication while the session is set up. So :meth:`starttls` and
:meth:`login` on a session that is already open re-open it with the new requirement (a QUIT,
then a fresh connection that must pass the TLS check or the login); a failure surfaces from
the call that asked for it, as with smtplib. Unlike :class:`~twistmail.Mailer`, nothing here
retries: the caller sees every error, as with smtplib.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from email.message import EmailMessage
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.error import ConnectError as TwistedConnectError
from twisted.internet.error import TimeoutError as TwistedTimeoutError
from twisted.mail.smtp import DNSNAME
from twisted.python.failure import Failure

from .._twisted import Reactor, default_reactor
from ..errors import ConnectError, ConnectionLostError, SMTPTimeoutError, TLSError, for_reply
from ..message import envelope_from_bytes, envelope_from_message
from ._protocol import MailerProtocol
from .client import Security, ServerConfig, _endpoint, _Factory, tls_options
from .esmtp import Capabilities

Reply = tuple[int, bytes]
"""A server reply as smtplib gives it: the code, and the text (lines joined by ``\n``)."""

__all__ = ["SMTP"]


class SMTP:
    """One SMTP session with smtplib's method names, each returning a Deferred."""

    def __init__(
        self,
        *,
        timeout: float = 60.0,
        ca_file: str | os.PathLike[str] | None = None,
        insecure: bool = False,
        local_hostname: str | None = None,
        implicit_tls: bool = False,
        reactor: Reactor | None = None,
    ) -> None:
        self._reactor = reactor if reactor is not None else default_reactor()
        self._timeout = timeout
        self._ca_file = ca_file
        self._insecure = insecure
        self._local_hostname = local_hostname
        self._implicit_tls = implicit_tls
        self._config: ServerConfig | None = None
        self._proto: _SessionProtocol | None = None

    @property
    def capabilities(self) -> Capabilities:
        """What the server offered in its EHLO reply (empty before :meth:`connect`)."""
        return self._proto.capabilities if self._proto is not None else Capabilities()

    def has_extn(self, name: str) -> bool:
        """Whether the server advertised the ESMTP extension ``name`` (smtplib's spelling)."""
        caps = self.capabilities
        key = name.upper()
        offered = {
            "PIPELINING": caps.pipelining,
            "8BITMIME": caps.eight_bit_mime,
            "SMTPUTF8": caps.smtputf8,
            "STARTTLS": caps.starttls,
            "ENHANCEDSTATUSCODES": caps.enhanced_status_codes,
            "SIZE": caps.size is not None,
            "AUTH": bool(caps.auth),
        }
        return offered.get(key, False)

    def connect(self, host: str = "localhost", port: int = 0) -> defer.Deferred[Reply]:
        """Open the session: greeting and EHLO (HELO for an old server).

        Fires with the greeting's ``(code, message)``, as smtplib's ``connect`` returns.
        """
        security: Security = "tls" if self._implicit_tls else "plain"
        self._config = ServerConfig(host, port or (465 if self._implicit_tls else 25), security)
        return self._open().addCallback(lambda proto: proto.replies["greeting"])

    def ehlo(self) -> defer.Deferred[Reply]:
        """The server's reply to EHLO, ``(250, b"host\nPIPELINING\n...")`` (EHLO was sent when
        the session opened; :attr:`capabilities` has the reply parsed)."""
        proto = self._require_open()
        return defer.succeed(proto.replies["ehlo"])

    def starttls(self) -> defer.Deferred[Reply]:
        """Require STARTTLS, with certificate and hostname checks unless ``insecure=True``.

        Fires with the server's reply to STARTTLS. Fails with :class:`~twistmail.TLSError` when
        the server does not offer STARTTLS (smtplib's ``SMTPNotSupportedError``).
        """
        config = self._require_config()
        proto = self._require_open()
        if config.security != "plain":
            return defer.succeed(proto.replies.get("starttls", proto.replies["greeting"]))
        if not proto.capabilities.starttls:
            return defer.fail(TLSError("the server does not offer STARTTLS", host=proto.host_label))
        self._config = ServerConfig(
            config.host, config.port, "starttls", config.username, config.password
        )
        return self._reopen().addCallback(lambda proto: proto.replies["starttls"])

    def login(self, user: str, password: str) -> defer.Deferred[Reply]:
        """Authenticate (CRAM-MD5, PLAIN or LOGIN, whichever the server offers first).

        Fires with the server's reply to the authentication, ``(235, b"...")``.
        """
        config = self._require_config()
        self._config = ServerConfig(config.host, config.port, config.security, user, password)
        return self._reopen().addCallback(lambda proto: proto.replies["auth"])

    def sendmail(
        self, from_addr: str, to_addrs: str | Iterable[str], msg: bytes | str
    ) -> defer.Deferred[dict[str, tuple[int, str]]]:
        """Send ``msg`` as it is; fires with the refused recipients ``{address: (code, text)}``.

        As with smtplib, the Deferred fails when no recipient was accepted or the message was
        refused after DATA.
        """
        proto = self._require_open()
        recipients = [to_addrs] if isinstance(to_addrs, str) else list(to_addrs)
        data = msg.encode("ascii") if isinstance(msg, str) else msg
        try:
            envelope = envelope_from_bytes(from_addr, recipients, data)
        except Exception as e:
            return defer.fail(e)
        return self._transact(proto, envelope)

    def send_message(
        self,
        msg: EmailMessage,
        from_addr: str | None = None,
        to_addrs: str | Iterable[str] | None = None,
    ) -> defer.Deferred[dict[str, tuple[int, str]]]:
        """Send an ``EmailMessage``; the envelope comes from its headers (Bcc is not sent)."""
        proto = self._require_open()
        recipients = [to_addrs] if isinstance(to_addrs, str) else to_addrs
        try:
            envelope = envelope_from_message(msg, sender=from_addr, recipients=recipients)
        except Exception as e:
            return defer.fail(e)
        return self._transact(proto, envelope)

    def quit(self) -> defer.Deferred[None]:
        """Say QUIT and wait for the connection to close."""
        proto, self._proto = self._proto, None
        if proto is None:
            return defer.succeed(None)
        return proto.quit()

    def close(self) -> None:
        """Drop the connection without QUIT."""
        proto, self._proto = self._proto, None
        if proto is not None:
            proto.abort()

    # ------------------------------------------------------------------ internals

    def _require_config(self) -> ServerConfig:
        if self._config is None:
            raise ConnectionLostError("not connected: call connect() first")
        return self._config

    def _require_open(self) -> _SessionProtocol:
        if self._proto is None or not self._proto.usable:
            raise ConnectionLostError(
                "not connected: call connect() first",
                host=self._config.label if self._config else None,
            )
        return self._proto

    def _open(self) -> defer.Deferred[_SessionProtocol]:
        config = self._require_config()
        tls = None
        if config.security != "plain":
            tls = tls_options(config.host, ca_file=self._ca_file, insecure=self._insecure)
        d = self._connect(config, tls)

        def opened(proto: _SessionProtocol) -> _SessionProtocol:
            self._proto = proto
            return proto

        return d.addCallback(opened)

    def _connect(self, config: ServerConfig, tls: Any) -> defer.Deferred[_SessionProtocol]:
        """:func:`~twistmail.smtp.client.connect`, with a protocol that keeps the handshake's
        replies (smtplib returns them; the Mailer has no use for them)."""
        identity = (self._local_hostname or DNSNAME.decode("ascii", "replace")).encode("idna")
        starttls = config.security == "starttls"

        def build() -> _SessionProtocol:
            return _SessionProtocol(
                host_label=config.label,
                clock=self._reactor,
                identity=identity,
                username=config.username,
                password=config.password,
                starttls_context=tls if starttls else None,
                require_tls=starttls,
                reply_timeout=self._timeout,
                use_pipelining=False,
            )

        endpoint = _endpoint(self._reactor, config.host, config.port, self._timeout)
        if config.security == "tls":
            endpoint = wrapClientTLS(tls, endpoint)

        def connected(proto: _SessionProtocol) -> defer.Deferred[_SessionProtocol]:
            return proto.ready.addCallback(lambda _: proto)

        def failed(reason: Failure) -> Failure:
            if reason.check(TwistedTimeoutError):
                message = f"could not connect within {self._timeout:g}s"
                return Failure(SMTPTimeoutError(message, host=config.label))
            if reason.check(TwistedConnectError):
                message = f"could not connect: {reason.value}"
                return Failure(ConnectError(message, host=config.label))
            return reason

        d: defer.Deferred[Any] = endpoint.connect(_Factory(build))
        return d.addCallback(connected).addErrback(failed)

    def _reopen(self) -> defer.Deferred[_SessionProtocol]:
        d = self.quit()
        return d.addCallback(lambda _: self._open())

    @staticmethod
    def _transact(
        proto: MailerProtocol, envelope: Any
    ) -> defer.Deferred[dict[str, tuple[int, str]]]:
        def done(result: Any) -> dict[str, tuple[int, str]]:
            # smtplib's shape: the whole reply text, enhanced status code included.
            refused = {
                str(r.recipient): (r.code, f"{r.enhanced} {r.text}" if r.enhanced else r.text)
                for r in result.recipients
                if not r.accepted
            }
            if len(refused) == len(result.recipients) or not 200 <= result.code < 300:
                error = for_reply(result.code)(
                    "the server did not accept the message",
                    code=result.code,
                    enhanced=result.enhanced,
                    response=result.text,
                    host=proto.host_label,
                )
                error.refused = refused
                raise error
            return refused

        return proto.send(envelope).addCallback(done)


class _SessionProtocol(MailerProtocol):
    """A MailerProtocol that keeps the replies of its session setup, by step."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.replies: dict[str, Reply] = {}

    def esmtpState_ehlo(self, code: int, resp: bytes) -> None:
        # Called with the greeting, and again with the STARTTLS reply to send EHLO anew.
        self.replies.setdefault("greeting", (code, resp))
        super().esmtpState_ehlo(code, resp)  # type: ignore[no-untyped-call]

    def esmtpState_serverConfig(self, code: int, resp: bytes) -> None:
        self.replies["ehlo"] = (code, resp)
        super().esmtpState_serverConfig(code, resp)

    def smtpState_helo(self, code: int, resp: bytes) -> None:
        # An old server refused EHLO (ESMTPClient says HELO next): smtplib's ehlo() returns
        # that refusal too.
        self.replies["ehlo"] = (code, resp)
        super().smtpState_helo(code, resp)  # type: ignore[no-untyped-call]

    def esmtpState_starttls(self, code: int, resp: bytes) -> None:
        self.replies["starttls"] = (code, resp)
        super().esmtpState_starttls(code, resp)  # type: ignore[no-untyped-call]

    def smtpState_from(self, code: int, resp: bytes) -> None:
        if code == 235:
            self.replies["auth"] = (code, resp)
        super().smtpState_from(code, resp)
