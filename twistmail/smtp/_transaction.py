"""One mail transaction on a connection: its progress, and the server's replies to it."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer

from ..address import Address
from ..errors import DeliveryError
from ..message import Envelope
from .esmtp import split_enhanced

__all__ = ["Notify", "RecipientReply", "TransactionResult"]


@dataclass(slots=True)
class RecipientReply:
    """The server's final word on one recipient in one transaction.

    ``shared``: the reply answered the whole transaction, not this recipient alone: a refused
    MAIL FROM (about the sender), or the reply to the data of a message more than one
    recipient of which was accepted (SMTP gives one reply for all of them). A shared refusal
    says nothing about this recipient's address.
    """

    recipient: Address
    code: int
    enhanced: str | None
    text: str
    shared: bool = False

    @property
    def accepted(self) -> bool:
        """The server took responsibility for delivering to this recipient."""
        return 200 <= self.code < 300


class TransactionResult:
    """Outcome of one MAIL/RCPT/DATA transaction on one connection."""

    __slots__ = ("_advertised", "_enhanced", "_raw", "_recipients", "_text", "accepted_all", "code")

    def __init__(
        self,
        recipients: list[RecipientReply],
        code: int,
        enhanced: str | None,
        text: str,
        accepted_all: bool = False,
    ) -> None:
        self._recipients: list[RecipientReply] | tuple[Address, ...] = recipients
        self.code = code
        self._enhanced = enhanced
        self._text = text
        self._raw: bytes | None = None
        self._advertised = False
        self.accepted_all = accepted_all
        """Every recipient was accepted and the message was taken (a 2xx after the data)."""

    @classmethod
    def _taken(
        cls, recipients: tuple[Address, ...], code: int, raw: bytes, advertised: bool
    ) -> TransactionResult:
        """Every recipient accepted, then the message (``code`` 2xx, reply text ``raw``;
        ``advertised``: the server offered ENHANCEDSTATUSCODES).

        The reply text is decoded and the per-recipient replies are made only if asked for:
        a bulk send that only counts them never pays for either.
        """
        result = cls.__new__(cls)
        result._recipients = recipients
        result.code = code
        result._raw = raw
        result._advertised = advertised
        result.accepted_all = True
        return result

    def _parse(self) -> None:
        raw = self._raw
        if raw is not None:
            self._enhanced, self._text = split_enhanced(_text(raw), self.code, self._advertised)
            self._raw = None

    @property
    def enhanced(self) -> str | None:
        """The enhanced status code of the final reply, if the server gave one."""
        self._parse()
        return self._enhanced

    @property
    def text(self) -> str:
        """The text of the final reply, without its enhanced status code."""
        self._parse()
        return self._text

    @property
    def recipients(self) -> list[RecipientReply]:
        """Each recipient's final reply, in the envelope's order."""
        recipients = self._recipients
        if type(recipients) is tuple:
            self._parse()
            code, enhanced, text = self.code, self._enhanced, self._text
            shared = len(recipients) > 1
            recipients = self._recipients = [
                RecipientReply(rcpt, code, enhanced, text, shared) for rcpt in recipients
            ]
        return recipients  # type: ignore[return-value]

    def __repr__(self) -> str:
        return (
            f"TransactionResult(recipients={self.recipients!r}, code={self.code!r}, "
            f"enhanced={self.enhanced!r}, text={self.text!r}, accepted_all={self.accepted_all!r})"
        )


# What `MailerProtocol.submit` calls when a transaction ends: (context, result, None) or
# (context, None, error).
Notify = Callable[[Any, "TransactionResult | None", "DeliveryError | None"], None]


class _Txn:
    """One message being sent on this connection.

    Its end is reported either through ``deferred`` (:meth:`MailerProtocol.send`) or by calling
    ``notify(context, ...)`` (:meth:`MailerProtocol.submit`, the bulk path: no Deferred).
    """

    __slots__ = (
        "accepted",
        "canceller",
        "context",
        "data_failed",
        "deferred",
        "envelope",
        "mail_failed",
        "notify",
        "pending",
        "rcpt_replies",
        "ready",
        "settled",
        "started",
    )

    def __init__(
        self,
        envelope: Envelope,
        notify: Notify | None = None,
        context: Any = None,
        ready: Callable[[Any], None] | None = None,
    ) -> None:
        self.envelope = envelope
        self.notify = notify
        self.context = context
        # Called with `context` when the server asks for the data; the body then waits for
        # MailerProtocol.release_body (see MailerProtocol.submit).
        self.ready = ready
        self.deferred: defer.Deferred[TransactionResult] | None = None
        if notify is None:
            self.deferred = defer.Deferred(self._cancelled)
        self.settled = False
        self.canceller: Callable[[_Txn], None] | None = None
        # RCPT replies other than 2xx (accepted ones only count towards `accepted`).
        self.rcpt_replies: list[tuple[int, bytes] | None] = [None] * len(envelope.recipients)
        self.accepted = 0
        self.mail_failed: tuple[int, str] | None = None
        self.data_failed: tuple[int, str] | None = None
        # Commands not yet written, without PIPELINING (a pipelined envelope is written at once).
        self.pending: deque[tuple[int, int, bytes]] | None = None
        self.started = False

    def _cancelled(self, _: defer.Deferred[TransactionResult]) -> None:
        if self.canceller is not None:
            self.canceller(self)

    def succeed(self, result: TransactionResult) -> None:
        self.settled = True
        if self.notify is not None:
            self.notify(self.context, result, None)
        elif self.deferred is not None and not self.deferred.called:  # not cancelled
            self.deferred.callback(result)

    def fail(self, error: DeliveryError) -> None:
        if self.settled:
            return
        self.settled = True
        if self.notify is not None:
            self.notify(self.context, None, error)
        elif self.deferred is not None and not self.deferred.called:  # not cancelled
            self.deferred.errback(error)


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def _reply(code: int, raw: bytes) -> tuple[int, str]:
    return code, _text(raw)
