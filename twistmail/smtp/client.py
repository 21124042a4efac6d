"""Connecting to an SMTP server: URLs, TLS policy, endpoints, and the session handshake."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from twisted.internet import defer, ssl
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.error import ConnectError as TwistedConnectError
from twisted.internet.error import TimeoutError as TwistedTimeoutError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.mail.smtp import DNSNAME
from twisted.python.failure import Failure

from ..errors import ConnectError, SMTPTimeoutError
from ._protocol import MailerProtocol

__all__ = ["PASSWORD_ENV", "ServerConfig", "connect", "parse_url", "tls_options"]

log = Logger()

PASSWORD_ENV = "TWISTMAIL_SMTP_PASSWORD"  # noqa: S105 - a variable name, not a secret

Security = Literal["plain", "starttls", "tls"]

_SCHEMES: dict[str, tuple[Security, int]] = {
    "smtp": ("plain", 25),
    "smtp+tls": ("starttls", 587),
    "smtp+ssl": ("tls", 465),
    "smtps": ("tls", 465),
}


@dataclass(frozen=True)
class ServerConfig:
    """Where and how to reach one SMTP server. The password never appears in its repr."""

    host: str
    port: int
    security: Security
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        """``host:port``, for messages."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_url(
    url: str, *, password: str | None = None, environ: dict[str, str] | None = None
) -> ServerConfig:
    """Parse ``smtp://``, ``smtp+tls://`` (STARTTLS required) or ``smtp+ssl://`` (implicit TLS).

    The password is taken, in order, from ``password``, the URL, or the ``TWISTMAIL_SMTP_PASSWORD``
    environment variable (only when the URL names a user). Errors never echo the password.
    """
    env = os.environ if environ is None else environ
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise ValueError(
            f"unsupported SMTP URL scheme {parts.scheme!r}: use smtp://, smtp+tls:// or smtp+ssl://"
        )
    security, default_port = _SCHEMES[scheme]
    host = parts.hostname
    if not host:
        raise ValueError(f"SMTP URL has no host: {scheme}://...")
    try:
        port = parts.port or default_port
    except ValueError:
        raise ValueError(f"SMTP URL has an invalid port (host {host})") from None
    username = unquote(parts.username) if parts.username else None
    secret = password
    if secret is None and parts.password is not None:
        secret = unquote(parts.password)
    if secret is None and username is not None:
        secret = env.get(PASSWORD_ENV)
        if secret is None:
            raise ValueError(
                f"SMTP URL names user {username!r} but no password was given: "
                f"set {PASSWORD_ENV} or pass password="
            )
    return ServerConfig(host, port, security, username, secret)


def tls_options(
    hostname: str, *, ca_file: str | os.PathLike[str] | None = None, insecure: bool = False
) -> Any:
    """A client TLS connection creator: verified against the system store or ``ca_file``.

    ``insecure=True`` turns certificate and hostname checks off, and says so in the log.
    """
    if insecure:
        log.warn(
            "TLS certificate verification is disabled for {host} (insecure=True)", host=hostname
        )
        return ssl.CertificateOptions(verify=False)
    if ca_file is not None:
        with open(ca_file, "rb") as f:
            pem = f.read()
        certs = [
            ssl.Certificate.loadPEM(b"-----BEGIN CERTIFICATE-----" + chunk)
            for chunk in pem.split(b"-----BEGIN CERTIFICATE-----")[1:]
        ]
        if not certs:
            raise ValueError(f"no certificate found in CA file {os.fspath(ca_file)!r}")
        trust = ssl.trustRootFromCertificates(certs)
    else:
        trust = ssl.platformTrust()
    return ssl.optionsForClientTLS(hostname, trustRoot=trust)


def _endpoint(reactor: Any, host: str, port: int, timeout: float) -> IStreamClientEndpoint:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return HostnameEndpoint(reactor, host, port, timeout=timeout)
    if ip.version == 6:
        return TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)


class _Factory(Factory):
    def __init__(self, build: Any) -> None:
        self._build = build

    def buildProtocol(self, addr: Any) -> MailerProtocol:
        proto: MailerProtocol = self._build()
        proto.factory = self
        return proto


def connect(
    reactor: Any,
    config: ServerConfig,
    *,
    tls_creator: Any = None,
    connect_timeout: float = 30.0,
    reply_timeout: float = 60.0,
    data_timeout: float = 600.0,
    local_hostname: str | None = None,
    use_pipelining: bool = True,
) -> defer.Deferred[MailerProtocol]:
    """Open a connection and complete greeting, EHLO, STARTTLS and AUTH.

    Fires with a ready :class:`MailerProtocol`. Cancelling before the TCP connection is made
    stops the attempt; cancelling after it drops the connection.
    """
    identity = (local_hostname or DNSNAME.decode("ascii", "replace")).encode("idna")
    starttls = config.security == "starttls"
    if tls_creator is None and config.security != "plain":
        tls_creator = tls_options(config.host)

    def build() -> MailerProtocol:
        return MailerProtocol(
            host_label=config.label,
            clock=reactor,
            identity=identity,
            username=config.username,
            password=config.password,
            starttls_context=tls_creator if starttls else None,
            require_tls=starttls,
            reply_timeout=reply_timeout,
            data_timeout=data_timeout,
            use_pipelining=use_pipelining,
        )

    endpoint = _endpoint(reactor, config.host, config.port, connect_timeout)
    if config.security == "tls":
        endpoint = wrapClientTLS(tls_creator, endpoint)

    protocol: list[MailerProtocol] = []

    def cancel(d: defer.Deferred[MailerProtocol]) -> None:
        if protocol:
            protocol[0].abort()
        else:
            connecting.cancel()

    result: defer.Deferred[MailerProtocol] = defer.Deferred(cancel)

    def connected(proto: MailerProtocol) -> defer.Deferred[MailerProtocol]:
        protocol.append(proto)
        return proto.ready

    def failed(reason: Failure) -> Failure:
        if reason.check(defer.CancelledError):
            return reason
        if reason.check(TwistedTimeoutError):
            return Failure(
                SMTPTimeoutError(
                    f"could not connect within {connect_timeout:g}s",
                    host=config.label,
                    attempted=False,
                )
            )
        if reason.check(TwistedConnectError):
            return Failure(
                ConnectError(
                    f"could not connect: {reason.value}", host=config.label, attempted=False
                )
            )
        return reason

    connecting: defer.Deferred[Any] = endpoint.connect(_Factory(build))
    connecting.addCallback(connected)
    connecting.addErrback(failed)
    connecting.addCallbacks(result.callback, _errback_unless_called(result))
    return result


def _errback_unless_called(d: defer.Deferred[Any]) -> Any:
    def eb(reason: Failure) -> None:
        if not d.called:
            d.errback(reason)

    return eb
