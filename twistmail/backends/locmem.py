"""The ``locmem`` backend: an in-memory outbox for tests, like Django's ``mail.outbox``."""

from __future__ import annotations

from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from typing import cast

from twistmail.message import Envelope, unstuff

from .base import BaseBackend

__all__ = ["LocmemBackend", "OutboxMessage", "outbox"]


@dataclass(frozen=True)
class OutboxMessage:
    """One message "sent" through the ``locmem`` backend.

    ``outbox[0]["Subject"]`` reads a header (decoded; None when missing), :attr:`body` and
    :attr:`html` the text and HTML bodies, :attr:`recipients` the envelope recipients (Bcc
    included) and :attr:`data` the exact bytes that would have gone on the wire.
    """

    envelope: Envelope
    """The envelope as the ``smtp`` backend would have sent it."""
    message: EmailMessage
    """The message parsed back from :attr:`data` (``email.policy.default``, LF line ends)."""

    @classmethod
    def from_envelope(cls, envelope: Envelope) -> OutboxMessage:
        """Keep ``envelope`` with its message parsed back from the bytes."""
        data = unstuff(envelope.payload).replace(b"\r\n", b"\n")
        parsed = BytesParser(policy=policy.default).parsebytes(data)
        return cls(envelope, parsed)

    def __getitem__(self, name: str) -> str | None:
        value = self.message[name]
        return None if value is None else str(value)

    @property
    def sender(self) -> str:
        """The envelope sender (``MAIL FROM``); ``""`` for the null path."""
        return str(self.envelope.sender)

    @property
    def recipients(self) -> list[str]:
        """The envelope recipients (``RCPT TO``), Bcc included."""
        return [str(address) for address in self.envelope.recipients]

    @property
    def data(self) -> bytes:
        """The message as it would be sent: CRLF line ends, without SMTP dot-stuffing."""
        return unstuff(self.envelope.payload)

    @property
    def subject(self) -> str | None:
        """The decoded Subject header."""
        return self["Subject"]

    @property
    def body(self) -> str:
        """The text/plain body ("" when there is none)."""
        part = self.message.get_body(("plain",))
        return "" if part is None else cast(str, cast(EmailMessage, part).get_content())

    @property
    def html(self) -> str | None:
        """The text/html body, or None."""
        part = self.message.get_body(("html",))
        return None if part is None else cast(str, cast(EmailMessage, part).get_content())


outbox: list[OutboxMessage] = []
"""Every message sent through any :class:`LocmemBackend`, oldest first.

Also :data:`twistmail.testing.outbox`. Empty it in place (``outbox.clear()``); the pytest plugin
does so before each test.
"""


class LocmemBackend(BaseBackend):
    """Appends each message to :data:`outbox` as an :class:`OutboxMessage`."""

    def deliver(self, envelope: Envelope) -> None:
        """Keep ``envelope`` in the outbox."""
        outbox.append(OutboxMessage.from_envelope(envelope))
