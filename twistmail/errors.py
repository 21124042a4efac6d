"""The one error taxonomy of twistmail.

Every delivery problem is either a :class:`TransientError` (worth retrying later: 4xx replies,
dropped connections, timeouts) or a :class:`PermanentError` (5xx replies, refused credentials,
failed certificate checks, a message the server cannot take). Both carry the SMTP reply code,
the enhanced status code, the server's text, the recipient concerned and the server host, and
never any credential or protocol transcript.

Beside them under :class:`TwistmailError`: a message that cannot be sent
(:class:`MessageError`), a journal or queue file that cannot be used (:class:`JournalError`,
:class:`QueueError`) and a backend name that cannot be loaded (:class:`UnknownBackendError`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .results import SendResult

__all__ = [
    "AddressError",
    "AuthenticationError",
    "CampaignChangedError",
    "ConnectError",
    "ConnectionLostError",
    "CsvError",
    "DeliveryError",
    "ExtensionRequiredError",
    "HeaderInjectionError",
    "JournalError",
    "MessageError",
    "PermanentError",
    "QueueError",
    "RowError",
    "SMTPTimeoutError",
    "TLSError",
    "TemplateError",
    "TransientError",
    "TwistmailError",
    "UnknownBackendError",
    "for_reply",
]


class TwistmailError(Exception):
    """Base class of every error twistmail raises on purpose."""


class MessageError(TwistmailError, ValueError):
    """A message or envelope that cannot be sent as given (caught before any connection)."""


class AddressError(MessageError):
    """An address that is malformed, empty, or cannot be used for SMTP."""

    def __init__(self, message: str, *, address: str | None = None, field: str | None = None):
        super().__init__(message)
        self.address = address
        self.field = field


class HeaderInjectionError(MessageError):
    """A header value carrying CR or LF, which would let data forge extra headers."""

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.field = field


class CsvError(TwistmailError, ValueError):
    """A recipients CSV that cannot be read: bad encoding, bad header, or broken quoting."""


class TemplateError(TwistmailError, ValueError):
    """A message template that cannot be used: bad syntax, bad headers, or missing columns."""


class RowError(TwistmailError, ValueError):
    """A CSV row the template cannot turn into a message.

    :ivar field: the header concerned (``"To"``, ``"Attachment"`` ...), or None for the body.
    :ivar reason: what is wrong, for the report.
    """

    def __init__(self, field: str | None, reason: str) -> None:
        super().__init__(f"{field}: {reason}" if field else reason)
        self.field = field
        self.reason = reason


class JournalError(TwistmailError):
    """A journal file that cannot be used: missing, not a journal, or of another campaign."""


class CampaignChangedError(JournalError):
    """The journal belongs to a campaign whose template has since changed (a changed CSV
    resumes: rows are kept by recipient).

    :ivar changed: what changed: ``("template",)``.
    """

    def __init__(self, path: str, changed: tuple[str, ...]) -> None:
        what = " and ".join(changed)
        super().__init__(
            f"{path}: the {what} changed since this journal was started, so new messages would "
            f"differ from those already sent. Restore the original {what}, or pass "
            "--new-campaign to start over "
            "(discards this journal's progress and sends every row again)."
        )
        self.changed = changed


class QueueError(TwistmailError):
    """A queue that cannot be used: a missing file, not a queue, another version, or closed."""


class UnknownBackendError(TwistmailError, ImportError):
    """A backend name that is neither an alias nor an importable ``package.module.Class``."""


class DeliveryError(TwistmailError):
    """A failure reported by, or while talking to, an SMTP server.

    :ivar code: the SMTP reply code, or ``None`` when no reply was involved (a drop, a timeout).
    :ivar enhanced: the RFC 3463 enhanced status code such as ``"5.1.1"``, when the server sent one.
    :ivar response: the server's reply text (credentials never appear here).
    :ivar recipient: the recipient this error concerns, when it concerns one.
    :ivar host: the server, as ``host:port``.
    :ivar attempted: whether the server may have seen this message. False when the failure
        happened before any command of the transaction was written (a connection that could
        not be made or was refused, a circuit breaker open, a transaction queued behind others
        on a connection that died): such a failure must not count as a delivery attempt.
    :ivar session_setup: True when the failure happened while setting up a session (connect,
        TLS, greeting, EHLO, AUTH): it is about the server or our configuration, not about
        the message.
    :ivar result: the :class:`~twistmail.results.SendResult` of the message this error ended,
        when :meth:`twistmail.Mailer.send` fails with it (no recipient was accepted).
    """

    transient = False
    result: SendResult | None = None

    def __init__(
        self,
        message: str,
        *,
        code: int | None = None,
        enhanced: str | None = None,
        response: str = "",
        recipient: str | None = None,
        host: str | None = None,
        attempted: bool = True,
        session_setup: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.enhanced = enhanced
        self.response = response
        self.recipient = recipient
        self.host = host
        self.attempted = attempted
        self.session_setup = session_setup
        self.refused: dict[str, tuple[int, str]] = {}
        """For a refused transaction: every refused recipient and its ``(code, text)``."""

    def __str__(self) -> str:
        parts = [self.message]
        if self.code is not None:
            reply = f"{self.code} {self.enhanced + ' ' if self.enhanced else ''}{self.response}"
            parts.append(f"(server replied {reply.strip()})")
        if self.recipient:
            parts.append(f"[recipient {self.recipient}]")
        if self.host:
            parts.append(f"[host {self.host}]")
        return " ".join(parts)


class TransientError(DeliveryError):
    """A failure that may succeed later: 4xx replies, drops, timeouts."""

    transient = True


class PermanentError(DeliveryError):
    """A failure that will not succeed by retrying: 5xx replies and configuration problems."""


class ConnectError(TransientError, ConnectionError):
    """The TCP (or TLS) connection to the server could not be made."""


class ConnectionLostError(TransientError, ConnectionError):
    """The server closed the connection, or it broke, before the work was finished."""


class SMTPTimeoutError(TransientError, TimeoutError):
    """The server did not answer in time (connect, a reply, or the whole DATA phase)."""


class TLSError(PermanentError):
    """TLS could not be set up: no STARTTLS offered when required, or a failed certificate check."""


class AuthenticationError(PermanentError):
    """The server refused the credentials, or offers no mechanism we can use."""


class ExtensionRequiredError(PermanentError):
    """The message needs an SMTP extension (SMTPUTF8, 8BITMIME, SIZE) the server does not offer."""


def for_reply(code: int | None) -> type[DeliveryError]:
    """The error class for a refusal with reply ``code``: 4xx is transient, the rest permanent."""
    return TransientError if code is not None and 400 <= code < 500 else PermanentError
