"""What a queue stores and hands out: states, claimed messages, outcomes, summaries."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from ..errors import QueueError
from ..message import Envelope

__all__ = [
    "MESSAGE_STATES",
    "ClaimedMessage",
    "Idempotent",
    "MessageState",
    "MessageStatus",
    "Outcome",
    "QueueError",
    "QueueOverview",
    "QueueRow",
    "QueueSummary",
    "RecipientState",
    "RecipientStatus",
    "message_status",
    "migrations_from",
]

MessageState = Literal["queued", "sending", "deferred", "sent", "failed"]
RecipientState = Literal["pending", "sent", "failed"]
MESSAGE_STATES: Final[tuple[str, ...]] = ("queued", "sending", "deferred", "sent", "failed")


@dataclass(frozen=True, slots=True, kw_only=True)
class ClaimedMessage:
    """A message a worker holds under lease: its envelope restricted to pending recipients."""

    id: int
    fence: int
    """The fencing number of this claim: each claim of a message gets a larger one, and only
    an :class:`Outcome` carrying the current one is recorded."""
    envelope: Envelope
    positions: tuple[int, ...]
    """The recipient position (in the original message) of each ``envelope.recipients``."""
    attempts: int
    """Attempts made before this claim."""
    refused_before: tuple[str, int | None, str] | None
    """``(recipient, code, response)`` of the first recipient refused by an earlier attempt."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """What one attempt at a claimed message settled, for :meth:`IQueue.record`.

    ``id`` and ``fence`` are the claim's. ``state`` is the message's new state; ``retry_in``
    the seconds from the store's now until its next attempt (for ``deferred``; 0 otherwise).
    ``recipients`` holds ``(position, state, code, response)`` for the recipients tried;
    ``enhanced`` the RFC 3463 enhanced status code of each of them, in the same order, where
    the server gave one (empty: none known).
    """

    id: int
    fence: int
    state: Literal["sent", "deferred", "failed"]
    attempts: int
    retry_in: float = 0.0
    code: int | None
    response: str
    recipients: tuple[tuple[int, RecipientState, int | None, str], ...]
    enhanced: tuple[str | None, ...] = ()

    def enhanced_at(self, index: int) -> str | None:
        """The enhanced status code of ``recipients[index]``, None if none is known."""
        enhanced = self.enhanced
        return enhanced[index] if index < len(enhanced) else None


@dataclass(frozen=True, slots=True)
class Idempotent:
    """What :meth:`IQueue.enqueue_once` did with a keyed request.

    ``outcome`` is ``"queued"`` (the envelope was stored now), ``"repeat"`` (the key was used
    before with the same fingerprint: nothing stored, ``id`` and ``message_id`` are the first
    request's) or ``"conflict"`` (the key was used before with another fingerprint: nothing
    stored, ``id`` is the first request's message).
    """

    id: int
    message_id: str | None
    outcome: Literal["queued", "repeat", "conflict"]


@dataclass(frozen=True, slots=True)
class RecipientStatus:
    """One recipient of a message and the last reply for it (None/"" before any):
    its code, text and RFC 3463 enhanced status code (e.g. ``"5.1.1"``, None when the server
    gave none)."""

    address: str
    state: RecipientState
    code: int | None
    response: str
    enhanced: str | None = None


@dataclass(frozen=True, slots=True)
class MessageStatus:
    """One message as :meth:`IQueue.message` tells it (times on the store's clock)."""

    id: int
    message_id: str | None
    sender: str
    state: MessageState
    attempts: int
    created_at: float
    updated_at: float
    due: float
    code: int | None
    response: str
    recipients: tuple[RecipientStatus, ...]


def message_status(row: Sequence[Any], recipients: Sequence[RecipientStatus]) -> MessageStatus:
    """A :class:`MessageStatus` from a row of its fields but ``recipients``, in order."""
    return MessageStatus(
        id=row[0],
        message_id=row[1],
        sender=row[2],
        state=row[3],
        attempts=row[4],
        created_at=row[5],
        updated_at=row[6],
        due=row[7],
        code=row[8],
        response=row[9],
        recipients=tuple(recipients),
    )


@dataclass(frozen=True, slots=True)
class QueueOverview:
    """What a status page shows of a queue, read at once (see :meth:`IQueue.overview`)."""

    counts: dict[str, int]
    """Messages by state (every state present, 0 when none)."""
    oldest: MessageStatus | None
    """The oldest message not yet sent or failed (queued, deferred or sending); None if none."""
    failures: list[MessageStatus]
    """The most recently failed messages, the latest first."""


@dataclass(frozen=True, slots=True)
class QueueRow:
    """One message as a status listing shows it (``due`` on the store's clock)."""

    id: int
    message_id: str | None
    state: str
    attempts: int
    due: float
    code: int | None
    response: str
    recipients: str
    """``"address state"`` of every recipient, comma-separated, in order."""


@dataclass(frozen=True, slots=True)
class QueueSummary:
    """Counts by state at one moment, and (from ``read_queue_status``) unsent messages.

    ``due`` counts queued and deferred messages due by then; ``held`` counts ``sending``
    messages under a lease that has not expired; ``expired`` those whose lease has.
    """

    counts: dict[str, int]
    due: int
    held: int
    expired: int
    unsent: list[QueueRow] = field(default_factory=list)

    @property
    def waiting(self) -> int:
        """Messages not yet settled and not held by a live worker."""
        return self.counts["queued"] + self.counts["deferred"] + self.expired


def migrations_from(
    version: str,
    current: str,
    migrations: dict[str, tuple[str, ...]],
    too_new: Callable[[str], QueueError],
) -> list[str]:
    """The statements taking a store's schema from ``version`` to ``current``, in order.

    ``migrations`` maps each older version to the statements making the next one; a version
    neither ``current`` nor in it (a newer store's) raises ``too_new(version)``.
    """
    if version not in migrations and version != current:
        raise too_new(version)
    statements: list[str] = []
    while version in migrations:
        statements.extend(migrations[version])
        version = str(int(version) + 1)
    return statements
