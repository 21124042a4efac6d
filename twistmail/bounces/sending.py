"""Sending with VERP return paths: the envelope sender of a queued message names it.

:class:`VerpSender` wraps the relay's (or a worker's) :class:`~twistmail.mailer.Mailer`: a
queued message with one recipient goes out with ``MAIL FROM:<bounces+TOKEN@domain>`` naming its
queue id and recipient (:meth:`~twistmail.bounces.verp.VerpSigner.for_queued`), so the bounce a
remote server sends later comes back to the relay's ``--bounce-domain`` intake already matched.

The envelope sender is per recipient, so VERP means one transaction per recipient: a message
with several recipients would need one copy each. Such a message (rare in bulk mail, which is
one message per recipient) keeps its own sender; so do messages from the null sender (our own
delivery notifications).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from ..address import parse_sender
from ..engine import Notify, Sender, SenderAttempt
from ..message import Envelope
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
        """As the wrapped sender's, with the recipient's return path as the sender."""
        if len(envelope.recipients) == 1 and not envelope.sender.is_null:
            path = self._path(envelope, context)
            if path is not None:
                envelope = dataclasses.replace(envelope, sender=parse_sender(path))
        return self.sender.attempt(envelope, notify, context, ready)

    def _path(self, envelope: Envelope, context: Any) -> str | None:
        (recipient,) = envelope.recipients
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
