"""Sending with VERP return paths: the envelope sender of a queued message names it.

:class:`VerpSender` wraps the relay's (or a worker's) :class:`~twistmail.mailer.Mailer`: a
queued message with one recipient goes out with ``MAIL FROM:<bounces+TOKEN@domain>`` naming its
queue id and recipient (:meth:`~twistmail.bounces.verp.VerpSigner.for_queued`), so the bounce a
remote server sends later comes back to the relay's ``--bounce-domain`` intake already matched.

The envelope sender is per recipient, so VERP means one transaction per recipient: a queued
message with several recipients goes out as one copy per recipient, each from that recipient's
return path (as mailing-list managers send), and the attempt ends once every copy has; the
bounce of one copy then fails and suppresses that recipient only. A campaign row with several
recipients (a Cc or Bcc in the template) keeps its own sender: its return path would name the
row, whose bounce fails the row's own recipient. So do messages from the null sender (our own
delivery notifications).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from ..address import Address, parse_sender
from ..engine import Notify, Sender, SenderAttempt
from ..errors import DeliveryError
from ..message import Envelope
from ..smtp._transaction import RecipientReply, TransactionResult
from .verp import VerpSigner

__all__ = ["VerpSender"]


class VerpSender:
    """A :class:`~twistmail.engine.Sender` that gives each single-recipient queued message its
    signed return path (see the module's docstring)."""

    def __init__(self, sender: Sender, verp: VerpSigner, *, campaign: str | None = None) -> None:
        self.sender = sender
        self.verp = verp
        self.campaign = campaign
        """The campaign id, for a campaign's rows (jobs carrying ``prepared.key``)."""

    @property
    def capacity(self) -> int:
        return self.sender.capacity

    @property
    def concurrency(self) -> int:
        """The wrapped sender's connections (the drain's duplicate bound reads it)."""
        value = getattr(self.sender, "concurrency", None)
        return value if isinstance(value, int) else self.sender.capacity

    def abort(self) -> None:
        self.sender.abort()

    def attempt(
        self,
        envelope: Envelope,
        notify: Notify,
        context: Any,
        ready: Callable[[Any], None] | None = None,
    ) -> SenderAttempt:
        """As the wrapped sender's, with the recipient's return path as the sender (one copy
        per recipient for a queued message with several)."""
        if not envelope.sender.is_null:
            if len(envelope.recipients) == 1:
                path = self._path(envelope.recipients[0], context)
                if path is not None:
                    envelope = dataclasses.replace(envelope, sender=parse_sender(path))
            elif getattr(context, "claimed", None) is not None:
                paths = [self._path(r, context) for r in envelope.recipients]
                if all(paths):
                    copies = [
                        dataclasses.replace(envelope, sender=parse_sender(p), recipients=(r,))
                        for r, p in zip(envelope.recipients, paths, strict=True)
                        if p is not None
                    ]
                    return _Copies(notify, context, ready).start(self.sender, copies)
        return self.sender.attempt(envelope, notify, context, ready)

    def _path(self, recipient: Address, context: Any) -> str | None:
        claimed = getattr(context, "claimed", None)  # the queue claim of a drain's job
        if claimed is not None:
            try:
                position = claimed.positions[claimed.envelope.recipients.index(recipient)]
            except (ValueError, IndexError):
                return None
            return self.verp.for_queued(claimed.id, position, str(recipient))
        prepared = getattr(context, "prepared", None)  # a campaign row's job
        if prepared is not None and self.campaign is not None:
            return self.verp.for_campaign(self.campaign, prepared.key, str(recipient))
        return None


class _Copies:
    """One attempt made of one transaction per recipient (a :class:`SenderAttempt`): it ends
    when every copy has, with each recipient's reply from its own copy.

    With ``ready``, the copies' data is held: ``ready(context)`` is called when the first copy
    is asked for it, and :meth:`release_body` sends every copy's (those asked later go at once).
    """

    def __init__(self, notify: Notify, context: Any, ready: Callable[[Any], None] | None) -> None:
        self._notify = notify
        self._context = context
        self._ready = ready
        self._recipients: tuple[Address, ...] = ()
        self._ends: list[TransactionResult | DeliveryError | None] = []
        self._handles: list[SenderAttempt | None] = []
        self._left = 0
        self._held: list[int] = []
        self._released = False

    def start(self, sender: Sender, copies: list[Envelope]) -> _Copies:
        self._recipients = tuple(c.recipients[0] for c in copies)
        self._ends = [None] * len(copies)
        self._handles = [None] * len(copies)
        self._left = len(copies)
        ready = self._copy_ready if self._ready is not None else None
        for index, copy in enumerate(copies):
            handle = sender.attempt(copy, self._copy_ended, index, ready)
            if self._ends[index] is None:  # not ended already
                self._handles[index] = handle
        return self

    def _copy_ready(self, index: int) -> None:
        handle = self._handles[index]
        if self._released and handle is not None:
            handle.release_body()
            return
        self._held.append(index)
        if len(self._held) == 1 and not self._released:
            assert self._ready is not None
            self._ready(self._context)

    def release_body(self) -> None:
        self._released = True
        held, self._held = self._held, []
        for index in held:
            handle = self._handles[index]
            if handle is not None:
                handle.release_body()

    def cancel(self) -> None:
        for handle in list(self._handles):
            if handle is not None:
                handle.cancel()

    def _copy_ended(
        self, index: int, result: TransactionResult | None, error: DeliveryError | None
    ) -> None:
        if self._ends[index] is not None:
            return
        self._ends[index] = result if result is not None else error
        self._handles[index] = None
        self._left -= 1
        if not self._left:
            result, error = _joined(self._recipients, self._ends)
            self._notify(self._context, result, error)


def _joined(
    recipients: tuple[Address, ...], ends: list[TransactionResult | DeliveryError | None]
) -> tuple[TransactionResult | None, DeliveryError | None]:
    """The copies' ends (one per recipient, in order) as one attempt's: their replies, or the
    error every copy failed with (one the server may have seen, if any was)."""
    errors = [e for e in ends if isinstance(e, DeliveryError)]
    if len(errors) == len(ends):
        return None, next((e for e in errors if e.attempted), errors[0])
    replies: list[RecipientReply] = []
    final: TransactionResult | None = None
    for recipient, end in zip(recipients, ends, strict=True):
        if isinstance(end, TransactionResult):
            replies.extend(end.recipients)
            if final is None or (final.accepted_all and not end.accepted_all):
                final = end  # the first copy not taken names the trouble
        else:
            assert end is not None
            # A copy that failed as a whole (a drop, a timeout): its recipient's reply, which
            # says nothing about the address (shared).
            code = end.code or (451 if end.transient else 554)
            replies.append(RecipientReply(recipient, code, end.enhanced, str(end), True))
    assert final is not None
    accepted_all = not errors and all(
        isinstance(end, TransactionResult) and end.accepted_all for end in ends
    )
    return TransactionResult(replies, final.code, final.enhanced, final.text, accepted_all), None
