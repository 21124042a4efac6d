"""Every zope.interface of twistmail, in one place."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from zope.interface import Attribute, Interface

if TYPE_CHECKING:  # annotations only: the queue records import the message model
    from twisted.internet.defer import Deferred

    from .address import Address
    from .message import Envelope, MessageLike
    from .queue.campaigns import (
        Campaign,
        CampaignRow,
        CampaignSpec,
        CampaignStatus,
        ReportRow,
    )
    from .queue.records import (
        ClaimedMessage,
        Idempotent,
        MessageStatus,
        Outcome,
        QueueOverview,
        QueueRow,
        QueueSummary,
    )
    from .suppression.records import Suppression

__all__ = ["IBackend", "IQueue", "ISuppressionList"]


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

    def bounce(
        id: int,
        position: int,
        *,
        failed: bool,
        code: int | None,
        response: str,
        enhanced: str | None = None,
    ) -> Deferred[str | None]:
        """A bounce arrived for recipient ``position`` of message ``id``: a delivered
        (``sent``) recipient becomes ``failed`` with ``code``, ``enhanced`` and ``response``
        when ``failed``, else keeps its state with ``response`` as the news (a delay); the
        message's ``updated_at`` moves. Fires with the recipient's address, None if there is
        no such recipient. A recipient not ``sent`` is left alone (the address still given)."""

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

    def overview(failures: int = 10) -> Deferred[QueueOverview]:
        """Counts by state, the oldest message not settled, and the last ``failures`` failed
        messages (most recently failed first), for a status page."""

    # CSV campaigns (see twistmail.queue.campaigns): a claimed campaign message comes back
    # rendered from its row, in the sandbox; one that cannot be rendered is failed instead.

    def campaign_open(name: str, spec: CampaignSpec) -> Deferred[Campaign]:
        """Campaign ``name``, made with ``spec`` (and a new random id) unless it exists.

        Fails with :class:`twistmail.queue.campaigns.CampaignChanged` when it exists with
        another template (``spec.fingerprint``).
        """

    def campaign(name: str) -> Deferred[Campaign | None]:
        """The campaign called ``name`` (or whose id it is), or None."""

    def campaign_lookup(campaign: str, ids: Sequence[int]) -> Deferred[dict[int, tuple]]:  # type: ignore[type-arg]
        """``id -> (row, state, fingerprint, changed)`` of the rows of campaign ``campaign``
        (its id) among ``ids``; a row with a message has the message's state."""

    def campaign_add(
        campaign: str, rows: Sequence[CampaignRow], files: Mapping[str, bytes]
    ) -> Deferred[int]:
        """Record ``rows`` of campaign ``campaign`` and the ``files`` its template reads, in
        one transaction: each row to send is queued with no payload (unless another run
        queued or sent it meanwhile), invalid and duplicate rows are kept with their reason,
        ``seen`` rows get their row number and changed flag. Fires with how many were
        queued."""

    def campaign_forget(campaign: str) -> Deferred[int]:
        """Forget the rows of campaign ``campaign`` that have no message (invalid and
        duplicate ones, sorted afresh by the next run); fires with how many."""

    def campaign_status(
        name: str | None = None, *, unsent: int = 20
    ) -> Deferred[list[CampaignStatus]]:
        """Every campaign's progress (or that of ``name`` alone: none if there is no such
        campaign), each with its first ``unsent`` rows not sent."""

    def campaign_report(
        campaign: str, after: tuple[int, int] = ..., limit: int = 1000
    ) -> Deferred[tuple[list[ReportRow], tuple[int, int]]]:
        """Up to ``limit`` report lines of campaign ``campaign`` after the cursor ``after``
        (default: the first), in row order, and the cursor following them."""

    def close() -> Deferred[None]:
        """Commit what is pending and release the store; idempotent.

        Afterwards every other method fails with :class:`twistmail.queue.QueueError`.
        """


class ISuppressionList(Interface):
    """Addresses not to send to: a store that outlives campaigns, checked before every send.

    Entries (:class:`twistmail.suppression.Suppression`) are keyed by normalized address
    (:func:`twistmail.suppression.suppression_key`) and list id: an ``unsubscribed`` entry
    with a list id applies to mail of that list only (the message's ``List-Id``); every other
    entry (list id ``""``: hard bounces, complaints, manual entries, an unsubscribe from all
    mail) applies to all mail. Every method returns a Deferred; a store's disk or network work
    never runs on the reactor thread. Times are the store's clock.

    Implementations: :class:`twistmail.suppression.SqliteSuppressionList` (a SQLite file: its
    own, or a queue's), :class:`twistmail.queue.postgres_suppression.PostgresSuppressionList`
    (a PostgreSQL queue's schema) and :class:`twistmail.testing.MemorySuppressionList`.
    """

    def add(entries: Sequence[Suppression]) -> Deferred[int]:
        """Store ``entries``; fires with how many were new, once committed (durably).

        An entry whose address and list id are already there is left as it was (the first
        reason and time are kept). Addresses and list ids are normalized; an entry that cannot
        be stored (not an address, unknown reason, a list id on a reason that applies to all
        mail) fails the whole call with :class:`~twistmail.suppression.SuppressionError`
        naming it, storing none.
        """

    def remove(address: str, list_id: str | None = None) -> Deferred[int]:
        """Remove ``address``'s entry for ``list_id`` ("" the all-mail one), or every entry
        of it when ``list_id`` is None; fires with how many were removed."""

    def check(
        addresses: Iterable[str | Address], list_id: str = ""
    ) -> Deferred[dict[str, Suppression]]:
        """Which of ``addresses`` (strings, or :class:`~twistmail.address.Address` objects
        parsed already) mail on list ``list_id`` ("" for mail of no list) must not go to:
        fires with their entries keyed by normalized address.

        All-mail entries match whatever the list; an unsubscribe from list L matches only
        ``list_id`` L. When both match, the all-mail entry is given. A value that is not an
        address matches nothing.
        """

    def entries(
        *, after: tuple[str, str] | None = None, limit: int = 1000
    ) -> Deferred[list[Suppression]]:
        """Up to ``limit`` entries ordered by (address, list id), those after ``after`` (the
        last one's ``(address, list_id)``) only: stable paging for listing and export."""

    def close() -> Deferred[None]:
        """Release the store; idempotent. Afterwards every other method fails with
        :class:`~twistmail.suppression.SuppressionError`."""
