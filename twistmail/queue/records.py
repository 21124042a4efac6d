"""What the spool stores and hands out: states, claimed messages, outcomes, summaries."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Literal

from ..errors import TwistmailError
from ..message import Envelope

__all__ = [
    "MESSAGE_STATES",
    "ClaimedMessage",
    "MessageState",
    "Outcome",
    "RecipientState",
    "SpoolError",
    "SpoolRow",
    "SpoolSummary",
]

MessageState = Literal["queued", "sending", "deferred", "sent", "failed"]
RecipientState = Literal["pending", "sent", "failed"]
MESSAGE_STATES: Final[tuple[str, ...]] = ("queued", "sending", "deferred", "sent", "failed")


class SpoolError(TwistmailError):
    """A spool file that cannot be used: missing, not a spool, or of another version."""


@dataclass(frozen=True, slots=True)
class ClaimedMessage:
    """A message a drain holds under lease: its envelope restricted to pending recipients."""

    id: int
    envelope: Envelope
    positions: tuple[int, ...]
    """The recipient position (in the original message) of each ``envelope.recipients``."""
    attempts: int
    """Attempts made before this claim."""
    refused_before: tuple[str, int | None, str] | None
    """``(recipient, code, response)`` of the first recipient refused by an earlier attempt."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one attempt at a claimed message settled, as written by :meth:`SqliteSpool.record`.

    ``recipients`` holds ``(position, state, code, response)`` for the recipients tried;
    ``state`` is the message's new state and ``due`` its next attempt time (wall clock).
    """

    id: int
    state: Literal["sent", "deferred", "failed"]
    attempts: int
    due: float
    code: int | None
    response: str
    recipients: tuple[tuple[int, RecipientState, int | None, str], ...]


@dataclass(frozen=True, slots=True)
class SpoolRow:
    """One message as ``--status`` lists it."""

    id: int
    message_id: str | None
    state: str
    attempts: int
    due: float
    code: int | None
    response: str
    recipients: str


@dataclass(frozen=True, slots=True)
class SpoolSummary:
    """Counts by state at one moment, and (from :func:`read_spool_status`) unsent messages.

    ``due`` counts queued and deferred messages due by then; ``held`` counts ``sending``
    messages under a lease that has not expired; ``expired`` those whose lease has.
    """

    counts: dict[str, int]
    due: int
    held: int
    expired: int
    unsent: list[SpoolRow] = field(default_factory=list)

    @property
    def waiting(self) -> int:
        """Messages not yet settled and not held by a live drain."""
        return self.counts["queued"] + self.counts["deferred"] + self.expired
