"""What a failed session setup or a lost TLS connection is called, as a DeliveryError."""

from __future__ import annotations

from typing import Any

from twisted.mail import smtp as tsmtp
from twisted.python.failure import Failure

from ..errors import (
    AuthenticationError,
    DeliveryError,
    PermanentError,
    TLSError,
    TransientError,
)
from ._transaction import _text
from .esmtp import split_enhanced

__all__ = ["handshake_error", "ssl_reason"]


def handshake_error(exc: Exception, host: str, offered_auth: frozenset[str]) -> DeliveryError:
    """The DeliveryError for a failure of ESMTPClient's greeting, EHLO, STARTTLS or AUTH."""
    code = getattr(exc, "code", None)
    code = code if isinstance(code, int) and code > 0 else None
    raw = getattr(exc, "resp", b"")
    text = _text(raw) if isinstance(raw, bytes) else str(raw or "")
    # Set-up replies (a greeting or EHLO never carries one): taken when the class matches.
    enhanced, text = split_enhanced(text, code)
    kwargs: dict[str, Any] = {"code": code, "enhanced": enhanced, "response": text}
    if isinstance(exc, tsmtp.TLSRequiredError):
        return TLSError(
            "STARTTLS is required (smtp+tls://) but the server does not offer it",
            host=host,
        )
    if isinstance(exc, tsmtp.TLSError):
        return TLSError("the server refused STARTTLS", host=host, **kwargs)
    if isinstance(exc, tsmtp.AUTHRequiredError):
        offered = ", ".join(sorted(offered_auth)) or "none"
        return AuthenticationError(
            "credentials were given but the server offers no usable AUTH mechanism "
            f"(offered: {offered}; supported: CRAM-MD5, PLAIN, LOGIN)",
            host=host,
        )
    if isinstance(exc, tsmtp.EHLORequiredError):
        return AuthenticationError(
            "credentials were given but the server does not speak ESMTP", host=host
        )
    if isinstance(exc, tsmtp.AUTHDeclinedError | tsmtp.AuthenticationError):
        if code is not None and 400 <= code < 500:
            return TransientError("authentication failed temporarily", host=host, **kwargs)
        return AuthenticationError("authentication failed", host=host, **kwargs)
    if isinstance(exc, tsmtp.SMTPConnectError):
        if code is not None and 400 <= code < 500:
            return TransientError("the server refused the session", host=host, **kwargs)
        return PermanentError("the server refused the session", host=host, **kwargs)
    if isinstance(exc, tsmtp.SMTPProtocolError):
        return TransientError("the server sent a malformed reply", host=host)
    if code is not None and 400 <= code < 500:
        return TransientError("session setup failed", host=host, **kwargs)
    return PermanentError("session setup failed", host=host, **kwargs)


def ssl_reason(reason: Failure) -> str:
    """The OpenSSL reasons in a TLS failure, joined."""
    value: Any = reason.value
    try:
        errors = value.args[0]
        return "; ".join(str(e[2]) for e in errors if len(e) > 2) or str(value)
    except (IndexError, TypeError, AttributeError):
        return str(value)
