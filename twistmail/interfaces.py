"""Every zope.interface of twistmail, in one place."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from zope.interface import Attribute, Interface

if TYPE_CHECKING:  # annotations only: the queue records import the message model
    from twisted.internet.defer import Deferred

    from .message import Envelope, MessageLike
    from .queue.records import (
        ClaimedMessage,
        Idempotent,
        MessageStatus,
        Outcome,
        QueueRow,
        QueueSummary,
    )

__all__ = ["IBackend", "IQueue"]


class IBackend(Interface):
    """A delivery backend: Django's mail backend contract, returning Deferreds.

    ``messages`` passed to :meth:`send_messages` are anything :class:`twistmail.Mailer`
    accepts: ``email.message.EmailMessage`` objects, :class:`twistmail.Envelope` objects or
    ``(sender, recipients, data_bytes)`` triples. A message with no recipients is skipped and not
    counted, as in Django.

    Implementations: :mod:`twistmail.backends` (``get_backend(...)`` makes one by name). It is
    also the static type to annotate a backend with (``get_backend`` returns it).
    """

    fail_silently = Attribute(
        "When true, delivery errors are swallowed and only the count reflects them."
    )

    def open() -> Deferred[None]:
        """Prepare for sending (connect, create a directory...); idempotent.

        Fires with None once ready.
        """

    def close() -> Deferred[None]:
        """Release what :meth:`open` or sending acquired; idempotent, safe without open().

        Fires with None once released.
        """

    def send_messages(messages: Iterable[MessageLike]) -> Deferred[int]:
        """Deliver ``messages`` (an iterable); a Deferred firing with the number delivered.

        With ``fail_silently`` false, the Deferred fails with the first delivery error, after
        every message has been tried.
        """


class IQueue(Interface):
    """A durable queue of messages waiting for delivery, shared by any number of workers.

    Every method returns a Deferred. Time belongs to the store: due times and leases are set
    and compared on the store's own clock (an injected one for the SQLite and memory stores,
    the database server's for a server), never on a worker's; "now" below is the store's.

    A message is ``queued`` (never tried), ``sending`` (claimed under a lease), ``deferred``
    (to be tried again from its due time), ``sent`` (every recipient accepted; kept as a
    record) or ``failed`` (kept with its reason). Each recipient is ``pending``, ``sent`` or
    ``failed``, so a message some of whose recipients were accepted is retried for the others
    only. Each claim of a message gets a larger fencing number; an outcome is recorded only
    with the owner and fencing number of the message's current claim.

    Implementations: :class:`twistmail.queue.SqliteQueue` (a SQLite file),
    :class:`twistmail.queue.postgres.PostgresQueue` (PostgreSQL, shared by many machines) and
    :class:`twistmail.testing.MemoryQueue` (in memory, for tests).
    """

    def enqueue(envelopes: Sequence[Envelope]) -> Deferred[list[int]]:
        """Store ``envelopes`` as ``queued``, due now; fires with their ids, in order.

        Fires only once they are committed (for a file, fsync'd): they survive a crash.
        """

    def enqueue_once(
        scope: str, key: str, fingerprint: str, envelope: Envelope, *, keep: float = 86400.0
    ) -> Deferred[Idempotent]:
        """Store ``envelope`` as :meth:`enqueue` does unless ``key`` was used in ``scope`` in
        the last ``keep`` seconds; fires with what was done (see :class:`Idempotent`).

        The key is committed in the same transaction as the message it queued, so a crash
        keeps both or neither; a repeat (same ``fingerprint``) or conflict (another one)
        stores nothing. Keys are per ``scope`` (e.g. an API token's name): the same key in two
        scopes is two keys. Keys older than ``keep`` seconds may be forgotten.
        """

    def claim(owner: str, limit: int, *, lease: float) -> Deferred[list[ClaimedMessage]]:
        """Take up to ``limit`` messages for ``owner`` under a lease of ``lease`` seconds.

        Claims queued and deferred messages that are due, oldest due first, and ``sending``
        messages whose lease has expired. Each comes back with its pending recipients only and
        a fencing number larger than any earlier claim of it had.
        """

    def record(owner: str, outcome: Outcome) -> Deferred[bool]:
        """Write one attempt's ``outcome`` and end the claim.

        Fires with False, writing nothing, unless the message is still held by ``owner`` under
        the fencing number ``outcome.fence`` (a worker whose lease expired and was taken over
        can never overwrite the outcome of the worker that took over; one whose lease expired
        but which nobody took over still records). A ``deferred`` outcome is due
        ``outcome.retry_in`` seconds from now.
        """

    def release(owner: str, claimed: Sequence[ClaimedMessage]) -> Deferred[int]:
        """Give back claims not attempted, counting no attempt; fires with how many were."""

    def renew(owner: str, lease: float) -> Deferred[int]:
        """Extend every lease ``owner`` holds to ``lease`` seconds from now; fires with how many."""

    def next_due() -> Deferred[float | None]:
        """Seconds until the earliest waiting message can be claimed.

        A waiting message is a queued or deferred one (its due time) or a ``sending`` one (its
        lease's end). 0.0 when one can be claimed now; None when none waits.
        """

    def message(id: int) -> Deferred[MessageStatus | None]:
        """Message ``id`` with its recipients' states; None if there is none."""

    def messages(
        state: str | None = None, *, after: int = 0, limit: int = 100
    ) -> Deferred[list[MessageStatus]]:
        """Up to ``limit`` messages with an id above ``after`` (in ``state`` if given), by id.

        Ids only grow, so paging with ``after`` = the last id seen is stable: a message added
        meanwhile comes on a later page, none is skipped or shown twice.
        """

    def retry(id: int) -> Deferred[str]:
        """Put failed message ``id`` back: ``queued``, due now, no attempts counted, its failed
        recipients pending again. Fires with ``"retried"``, ``"missing"`` or its state when
        it is not ``failed`` (nothing changed)."""

    def cancel(id: int, reason: str) -> Deferred[str]:
        """Fail message ``id`` with ``reason`` if it is queued or deferred (its pending
        recipients too). Fires with ``"cancelled"``, ``"missing"`` or its state otherwise
        (nothing changed: a ``sending`` message is in a worker's hands)."""

    def summary() -> Deferred[QueueSummary]:
        """Counts by state, and how many are due, held under a live lease, or expired."""

    def queued_at(id: int) -> Deferred[float | None]:
        """When message ``id`` was enqueued (seconds since the epoch, the store's clock);
        None if there is no such message."""

    def oldest_waiting() -> Deferred[float | None]:
        """When the oldest message not yet sent or failed (queued, deferred or sending) was
        enqueued; None if none waits."""

    def unsent(limit: int = 20) -> Deferred[list[QueueRow]]:
        """The first ``limit`` messages not sent (by id), with their recipients' states."""

    def close() -> Deferred[None]:
        """Commit what is pending and release the store; idempotent.

        Afterwards every other method fails with :class:`twistmail.queue.QueueError`.
        """
