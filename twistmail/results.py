"""What a send produced: per-recipient outcomes, per-message results, run-wide reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .errors import DeliveryError

__all__ = ["RecipientOutcome", "RecipientStatus", "SendReport", "SendResult"]

RecipientStatus = Literal["sent", "failed", "deferred", "suppressed"]


@dataclass(slots=True)
class RecipientOutcome:
    """One recipient's fate.

    ``status`` is ``"sent"`` (the server accepted it), ``"failed"`` (a permanent refusal, or
    temporary refusals until the attempts ran out), ``"deferred"`` (only while a message is
    still being retried) or ``"suppressed"`` (on the Mailer's suppression list: not sent to).
    ``code``/``enhanced``/``response`` are the server's last word on it; ``code`` is ``None``
    when the failure was a drop or a timeout rather than a reply. ``shared``: that word was
    not about this recipient alone (a refused MAIL FROM, the one reply to the data of a
    message with several recipients, a failed session), so it says nothing about its address.
    """

    recipient: str
    status: RecipientStatus
    code: int | None = None
    enhanced: str | None = None
    response: str = ""
    attempts: int = 0
    shared: bool = False

    @property
    def accepted(self) -> bool:
        """The server accepted the message for this recipient."""
        return self.status == "sent"


@dataclass(slots=True)
class SendResult:
    """The result of delivering one message, after all its attempts."""

    sender: str
    recipients: list[RecipientOutcome]
    code: int | None
    response: str
    attempts: int
    message_id: str | None = None
    error: DeliveryError | None = None

    @property
    def accepted(self) -> list[RecipientOutcome]:
        """Recipients the server accepted."""
        return [r for r in self.recipients if r.status == "sent"]

    @property
    def rejected(self) -> list[RecipientOutcome]:
        """Recipients that were not delivered (suppressed ones aside)."""
        return [r for r in self.recipients if r.status not in ("sent", "suppressed")]

    @property
    def ok(self) -> bool:
        """Every recipient was accepted (a suppressed one, left out on purpose, aside)."""
        return all(r.status in ("sent", "suppressed") for r in self.recipients) and any(
            r.status == "sent" for r in self.recipients
        )

    @property
    def suppressed(self) -> list[RecipientOutcome]:
        """Recipients left out because they are on the suppression list."""
        return [r for r in self.recipients if r.status == "suppressed"]


@dataclass
class SendReport:
    """Counters for a ``send_many`` run; holds no per-message data beyond ``errors``.

    ``sent``: every recipient accepted; ``partial``: some; ``failed``: none; ``invalid``: the
    item could not be turned into a message (bad address, CR/LF in a header ...);
    ``suppressed``: not sent at all, every recipient being on the suppression list
    (``recipients_suppressed`` counts every recipient left out for it).
    ``errors`` keeps the first :attr:`max_errors` ``(index, reason)`` pairs.
    """

    messages: int = 0
    sent: int = 0
    partial: int = 0
    failed: int = 0
    invalid: int = 0
    suppressed: int = 0
    recipients_accepted: int = 0
    recipients_failed: int = 0
    recipients_suppressed: int = 0
    attempts: int = 0
    elapsed: float = 0.0
    errors: list[tuple[int, str]] = field(default_factory=list)
    max_errors: int = 100

    def note_error(self, index: int, reason: str) -> None:
        """Keep ``reason`` for item ``index`` while fewer than ``max_errors`` are kept."""
        if len(self.errors) < self.max_errors:
            self.errors.append((index, reason))

    def count_sent(self, recipients: int, attempts: int) -> None:
        """Count one message delivered to all of its ``recipients``."""
        self.messages += 1
        self.attempts += attempts
        self.recipients_accepted += recipients
        self.sent += 1

    def add(self, result: SendResult) -> None:
        """Count one finished message."""
        self.messages += 1
        self.attempts += result.attempts
        accepted = sum(1 for r in result.recipients if r.status == "sent")
        self.recipients_accepted += accepted
        self.recipients_failed += len(result.recipients) - accepted
        if accepted == len(result.recipients):
            self.sent += 1
        elif accepted:
            self.partial += 1
        else:
            self.failed += 1

    @property
    def rate(self) -> float:
        """Messages finished per second of wall time."""
        return self.messages / self.elapsed if self.elapsed > 0 else 0.0
