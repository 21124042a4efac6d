"""The queue in memory: the :class:`~twistmail.interfaces.IQueue` contract with no file.

For tests of code that enqueues or works a queue (re-exported as
:class:`twistmail.testing.MemoryQueue`). Every Deferred has fired by the time the method
returns; nothing survives the process.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from zope.interface import implementer

from ..interfaces import IQueue
from ..message import Envelope
from ..suppression.records import shown_state
from ._memory_campaigns import Campaigns
from .records import (
    MESSAGE_STATES,
    ClaimedMessage,
    Idempotent,
    MessageState,
    MessageStatus,
    Outcome,
    QueueError,
    QueueOverview,
    QueueRow,
    QueueSummary,
    RecipientState,
    RecipientStatus,
)

__all__ = ["MemoryQueue"]


@dataclass
class _Recipient:
    address: str
    state: RecipientState = "pending"
    code: int | None = None
    response: str = ""
    enhanced: str | None = None


@dataclass
class _Message:
    envelope: Envelope
    recipients: list[_Recipient]
    due: float
    state: MessageState = "queued"
    attempts: int = 0
    owner: str | None = None
    lease_until: float | None = None
    fence: int = 0
    code: int | None = None
    response: str = ""
    created_at: float = 0.0
    updated_at: float = 0.0

    @property
    def waiting_until(self) -> float | None:
        """When it can be claimed: its due time, its lease's end, or None once settled."""
        if self.state in ("queued", "deferred"):
            return self.due
        if self.state == "sending":
            return self.lease_until
        return None


@implementer(IQueue)
class MemoryQueue(Campaigns):
    """A queue held in memory, with the same contract and clock injection as the SQLite one.

    ``clock()`` gives the store's now in seconds (pass ``task.Clock().seconds`` to drive
    leases and due times from a test).
    """

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._messages: dict[int, _Message] = {}
        self._next_id = 1
        self._closed = False
        # (scope, key) -> (fingerprint, message id, when stored)
        self._keys: dict[tuple[str, str], tuple[str, int, float]] = {}
        self._init_campaigns()

    def enqueue(self, envelopes: Sequence[Envelope]) -> defer.Deferred[list[int]]:
        """Store ``envelopes`` as ``queued``, due now; fires with their ids."""
        if self._closed:
            return self._closed_error()
        now = self._clock()
        ids = []
        for envelope in envelopes:
            recipients = [_Recipient(str(address)) for address in envelope.recipients]
            self._messages[self._next_id] = _Message(
                envelope, recipients, due=now, created_at=now, updated_at=now
            )
            ids.append(self._next_id)
            self._next_id += 1
        return defer.succeed(ids)

    def enqueue_once(
        self, scope: str, key: str, fingerprint: str, envelope: Envelope, *, keep: float = 86400.0
    ) -> defer.Deferred[Idempotent]:
        """Store ``envelope`` unless ``key`` was used in ``scope`` (see IQueue)."""
        if self._closed:
            return self._closed_error()
        now = self._clock()
        known = self._keys.get((scope, key))
        if known is not None and known[2] >= now - keep:
            stored, id_, _ = known
            message_id = self._messages[id_].envelope.message_id
            if stored == fingerprint:
                return defer.succeed(Idempotent(id_, message_id, "repeat"))
            return defer.succeed(Idempotent(id_, message_id, "conflict"))
        id_ = self._next_id
        self.enqueue([envelope])
        self._keys[(scope, key)] = (fingerprint, id_, now)
        return defer.succeed(Idempotent(id_, envelope.message_id, "queued"))

    def claim(
        self, owner: str, limit: int, *, lease: float
    ) -> defer.Deferred[list[ClaimedMessage]]:
        """Take up to ``limit`` due messages for ``owner`` for ``lease`` seconds (see IQueue)."""
        if self._closed:
            return self._closed_error()
        now = self._clock()
        ready = [
            (message.due, id_)
            for id_, message in self._messages.items()
            if (at := message.waiting_until) is not None and at <= now
        ]
        claimed = []
        for _, id_ in sorted(ready)[: max(0, limit)]:
            message = self._messages[id_]
            message.state = "sending"
            message.owner = owner
            message.lease_until = now + lease
            message.fence += 1
            message.updated_at = now
            claimed.append(self._claimed(id_, message))
        claimed.sort(key=lambda c: c.id)
        return defer.succeed(self._render_claimed(claimed))

    def record(self, owner: str, outcome: Outcome) -> defer.Deferred[bool]:
        """Write an attempt's outcome unless ``owner`` lost the claim; False if it did."""
        if self._closed:
            return self._closed_error()
        message = self._held(owner, outcome.id, outcome.fence)
        if message is None:
            return defer.succeed(False)
        now = self._clock()
        message.state = outcome.state
        message.attempts = outcome.attempts
        message.due = now + outcome.retry_in if outcome.state == "deferred" else now
        message.code = outcome.code
        message.response = outcome.response
        message.owner = message.lease_until = None
        message.updated_at = now
        for i, (position, state, code, response) in enumerate(outcome.recipients):
            recipient = message.recipients[position]
            recipient.state, recipient.code, recipient.response = state, code, response
            recipient.enhanced = outcome.enhanced_at(i)
        return defer.succeed(True)

    def release(self, owner: str, claimed: Sequence[ClaimedMessage]) -> defer.Deferred[int]:
        """Give back claims not attempted (no attempt counted); fires with how many."""
        if self._closed:
            return self._closed_error()
        released = 0
        for claim in claimed:
            message = self._held(owner, claim.id, claim.fence)
            if message is not None:
                message.state = "queued" if message.attempts == 0 else "deferred"
                message.owner = message.lease_until = None
                message.updated_at = self._clock()
                released += 1
        return defer.succeed(released)

    def renew(self, owner: str, lease: float) -> defer.Deferred[int]:
        """Extend every lease ``owner`` holds to ``lease`` seconds from now; fires with how many."""
        if self._closed:
            return self._closed_error()
        now = self._clock()
        renewed = 0
        for message in self._messages.values():
            if message.state == "sending" and message.owner == owner:
                message.lease_until = now + lease
                renewed += 1
        return defer.succeed(renewed)

    def next_due(self) -> defer.Deferred[float | None]:
        """Seconds until the earliest waiting message is due: 0.0 if now, None if none waits."""
        if self._closed:
            return self._closed_error()
        times = [at for m in self._messages.values() if (at := m.waiting_until) is not None]
        if not times:
            return defer.succeed(None)
        return defer.succeed(max(0.0, min(times) - self._clock()))

    def message(self, id: int) -> defer.Deferred[MessageStatus | None]:
        """Message ``id`` with its recipients' states; None if there is none."""
        if self._closed:
            return self._closed_error()
        message = self._messages.get(id)
        return defer.succeed(None if message is None else self._status(id, message))

    def messages(
        self, state: str | None = None, *, after: int = 0, limit: int = 100
    ) -> defer.Deferred[list[MessageStatus]]:
        """Up to ``limit`` messages with an id above ``after`` (in ``state``), by id."""
        if self._closed:
            return self._closed_error()
        found = [
            self._status(id_, m)
            for id_, m in sorted(self._messages.items())
            if id_ > after and (state is None or m.state == state)
        ]
        return defer.succeed(found[: max(0, limit)])

    def retry(self, id: int) -> defer.Deferred[str]:
        """Put failed message ``id`` back in the queue (see IQueue)."""
        if self._closed:
            return self._closed_error()
        message = self._messages.get(id)
        if message is None or message.state != "failed":
            return defer.succeed("missing" if message is None else message.state)
        now = self._clock()
        message.state, message.attempts, message.due = "queued", 0, now
        message.code, message.response, message.updated_at = None, "", now
        for recipient in message.recipients:
            if recipient.state == "failed":
                recipient.state, recipient.code, recipient.response = "pending", None, ""
                recipient.enhanced = None
        return defer.succeed("retried")

    def cancel(self, id: int, reason: str) -> defer.Deferred[str]:
        """Fail message ``id`` if it is queued or deferred (see IQueue)."""
        if self._closed:
            return self._closed_error()
        message = self._messages.get(id)
        if message is None or message.state not in ("queued", "deferred"):
            return defer.succeed("missing" if message is None else message.state)
        message.state, message.code, message.response = "failed", None, reason
        message.updated_at = self._clock()
        for recipient in message.recipients:
            if recipient.state == "pending":
                recipient.state, recipient.code, recipient.response = "failed", None, reason
                recipient.enhanced = None
        return defer.succeed("cancelled")

    def bounce(
        self,
        id: int,
        position: int,
        *,
        failed: bool,
        code: int | None,
        response: str,
        enhanced: str | None = None,
    ) -> defer.Deferred[str | None]:
        """A bounce for a delivered recipient (see IQueue)."""
        if self._closed:
            return self._closed_error()
        message = self._messages.get(id)
        if message is None or not 0 <= position < len(message.recipients):
            return defer.succeed(None)
        recipient = message.recipients[position]
        if recipient.state == "sent":
            if failed:
                recipient.state, recipient.code = "failed", code
                recipient.enhanced = enhanced
            recipient.response = response
            message.updated_at = self._clock()
        return defer.succeed(recipient.address)

    def overview(self, failures: int = 10) -> defer.Deferred[QueueOverview]:
        """Counts, the oldest message not settled and the last ``failures`` failed ones."""
        if self._closed:
            return self._closed_error()
        counts = dict.fromkeys(MESSAGE_STATES, 0)
        for m in self._messages.values():
            counts[m.state] += 1
        waiting = [
            (m.created_at, id_, m)
            for id_, m in self._messages.items()
            if m.state in ("queued", "deferred", "sending")
        ]
        oldest = min(waiting, key=lambda w: (w[0], w[1]), default=None)
        failed = sorted(
            ((m.updated_at, id_, m) for id_, m in self._messages.items() if m.state == "failed"),
            key=lambda f: (f[0], f[1]),
            reverse=True,
        )[: max(0, failures)]
        return defer.succeed(
            QueueOverview(
                counts,
                None if oldest is None else self._status(oldest[1], oldest[2]),
                [self._status(id_, m) for _, id_, m in failed],
            )
        )

    @staticmethod
    def _status(id_: int, m: _Message) -> MessageStatus:
        return MessageStatus(
            id_,
            m.envelope.message_id,
            str(m.envelope.sender),
            m.state,
            m.attempts,
            m.created_at,
            m.updated_at,
            m.due,
            m.code,
            m.response,
            tuple(
                RecipientStatus(r.address, r.state, r.code, r.response, r.enhanced)
                for r in m.recipients
            ),
        )

    def summary(self) -> defer.Deferred[QueueSummary]:
        """Counts by state, and how many messages are due, held or with an expired lease."""
        if self._closed:
            return self._closed_error()
        now = self._clock()
        counts = dict.fromkeys(MESSAGE_STATES, 0)
        due = expired = 0
        for message in self._messages.values():
            counts[message.state] += 1
            at = message.waiting_until
            if at is not None and at <= now:
                if message.state == "sending":
                    expired += 1
                else:
                    due += 1
        return defer.succeed(QueueSummary(counts, due, counts["sending"] - expired, expired))

    def queued_at(self, id: int) -> defer.Deferred[float | None]:
        """When message ``id`` was enqueued; None if there is none."""
        if self._closed:
            return self._closed_error()
        message = self._messages.get(id)
        return defer.succeed(None if message is None else message.created_at)

    def oldest_waiting(self) -> defer.Deferred[float | None]:
        """When the oldest message not yet sent or failed was enqueued; None if none waits."""
        if self._closed:
            return self._closed_error()
        waiting = [
            m.created_at
            for m in self._messages.values()
            if m.state in ("queued", "deferred", "sending")
        ]
        return defer.succeed(min(waiting, default=None))

    def unsent(self, limit: int = 20) -> defer.Deferred[list[QueueRow]]:
        """The first ``limit`` messages not sent, with their recipients' states."""
        if self._closed:
            return self._closed_error()
        rows = [
            QueueRow(
                id_,
                m.envelope.message_id,
                m.state,
                m.attempts,
                m.due,
                m.code,
                m.response,
                ", ".join(
                    f"{r.address} {shown_state(r.state, r.code, r.response)}" for r in m.recipients
                ),
            )
            for id_, m in sorted(self._messages.items())
            if m.state != "sent"
        ]
        return defer.succeed(rows[: max(0, limit)])

    def close(self) -> defer.Deferred[None]:
        """Refuse every later call; idempotent."""
        self._closed = True
        return defer.succeed(None)

    def _held(self, owner: str, id_: int, fence: int) -> _Message | None:
        message = self._messages.get(id_)
        if message is None or message.state != "sending":
            return None
        if message.owner != owner or message.fence != fence:
            return None
        return message

    def _claimed(self, id_: int, message: _Message) -> ClaimedMessage:
        env = message.envelope
        pending = [
            (position, address)
            for position, (address, recipient) in enumerate(
                zip(env.recipients, message.recipients, strict=True)
            )
            if recipient.state == "pending"
        ]
        refused = next(
            ((r.address, r.code, r.response) for r in message.recipients if r.state == "failed"),
            None,
        )
        return ClaimedMessage(
            id=id_,
            fence=message.fence,
            envelope=Envelope(
                sender=env.sender,
                recipients=tuple(address for _, address in pending),
                payload=env.payload,
                size=env.size,
                eight_bit=env.eight_bit,
                smtputf8=env.smtputf8,
                message_id=env.message_id,
            ),
            positions=tuple(position for position, _ in pending),
            attempts=message.attempts,
            refused_before=refused,
        )

    def _closed_error(self) -> defer.Deferred[Any]:
        return defer.fail(QueueError("the memory queue is closed"))
