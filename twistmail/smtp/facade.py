"""An smtplib-shaped facade over one twistmail connection, for porting smtplib code to Twisted.

Each method returns a Deferred instead of blocking::

    smtp = SMTP(ca_file="ca.pem")
    await smtp.connect("mail.example.com", 587)
    await smtp.starttls()
    await smtp.login("alice", password)
    refused = await smtp.send_message(msg)
    await smtp.quit()

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

from .._twisted import Reactor, default_reactor
from ..errors import ConnectionLostError, for_reply
from ..message import envelope_from_bytes, envelope_from_message
from ._protocol import MailerProtocol
from .client import Security, ServerConfig, connect, tls_options
from .esmtp import Capabilities

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
        self._proto: MailerProtocol | None = None

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

    def connect(self, host: str = "localhost", port: int = 0) -> defer.Deferred[None]:
        """Open the session: greeting and EHLO (HELO for an old server)."""
        security: Security = "tls" if self._implicit_tls else "plain"
        self._config = ServerConfig(host, port or (465 if self._implicit_tls else 25), security)
        return self._open()

    def ehlo(self) -> defer.Deferred[Capabilities]:
        """The server's EHLO capabilities (EHLO was sent when the session opened)."""
        proto = self._require_open()
        return defer.succeed(proto.capabilities)

    def starttls(self) -> defer.Deferred[None]:
        """Require STARTTLS, with certificate and hostname checks unless ``insecure=True``."""
        config = self._require_config()
        if config.security != "plain":
            return defer.succeed(None)
        self._config = ServerConfig(
            config.host, config.port, "starttls", config.username, config.password
        )
        return self._reopen()

    def login(self, user: str, password: str) -> defer.Deferred[None]:
        """Authenticate (CRAM-MD5, PLAIN or LOGIN, whichever the server offers first)."""
        config = self._require_config()
        self._config = ServerConfig(config.host, config.port, config.security, user, password)
        return self._reopen()

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

    def _require_open(self) -> MailerProtocol:
        if self._proto is None or not self._proto.usable:
            raise ConnectionLostError(
                "not connected: call connect() first",
                host=self._config.label if self._config else None,
            )
        return self._proto

    def _open(self) -> defer.Deferred[None]:
        config = self._require_config()
        tls = None
        if config.security != "plain":
            tls = tls_options(config.host, ca_file=self._ca_file, insecure=self._insecure)
        d = connect(
            self._reactor,
            config,
            tls_creator=tls,
            connect_timeout=self._timeout,
            reply_timeout=self._timeout,
            local_hostname=self._local_hostname,
            use_pipelining=False,
        )

        def opened(proto: MailerProtocol) -> None:
            self._proto = proto

        return d.addCallback(opened)

    def _reopen(self) -> defer.Deferred[None]:
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
