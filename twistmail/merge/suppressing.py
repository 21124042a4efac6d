"""A campaign's rendered rows checked against the suppression list, and given their one-click
unsubscribe headers, a chunk at a time (one query per chunk and list).

A row whose own recipient (its ``email``), or every recipient, is suppressed is not sent: it
is journaled ``suppressed`` with the reason, and looked at again on the next run (an entry
removed since lets it go). A row with other recipients suppressed (a Cc, say) goes to the
rest only.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass

from twisted.internet import defer

from ..interfaces import ISuppressionList
from ..suppression.records import Suppression, SuppressionError, suppressed_reply, suppression_key
from ..suppression.screen import list_id_of
from ..unsubscribe.headers import Unsubscribe
from .prepare import Prepared, Problem

__all__ = ["RowScreen", "Suppressed"]


@dataclass(frozen=True, slots=True)
class Suppressed:
    """A row not sent: every recipient is on the suppression list (``reason`` says why)."""

    row: int
    email: str
    reason: str
    key: int = 0
    fingerprint: int | None = None


Item = Prepared | Problem | Suppressed


def _key(address: object) -> str:
    try:
        return suppression_key(str(address))
    except SuppressionError:
        return ""


class RowScreen:
    """Checks rendered rows against ``store`` (None: no list) and adds ``unsubscribe``'s
    headers (None: none) to those that go."""

    def __init__(self, store: ISuppressionList | None, unsubscribe: Unsubscribe | None) -> None:
        self.store = store
        self.unsubscribe = unsubscribe
        self.suppressed = 0
        """Recipients left out so far."""

    def screen(self, items: list[Prepared | Problem]) -> defer.Deferred[list[Item]]:
        """``items`` with suppressed rows (and recipients) left out, headers added."""
        lists = [list_id_of(i.envelope.payload) if isinstance(i, Prepared) else "" for i in items]
        if self.store is None:
            return defer.succeed(
                [self._headed(i, lst) for i, lst in zip(items, lists, strict=True)]
            )
        by_list: dict[str, list[str]] = defaultdict(list)
        for item, list_id in zip(items, lists, strict=True):
            if isinstance(item, Prepared):
                by_list[list_id].extend(str(r) for r in item.envelope.recipients)
        names = list(by_list)
        found = defer.gatherResults(
            [self.store.check(by_list[name], name) for name in names], consumeErrors=True
        )

        def split(results: list[dict[str, Suppression]]) -> list[Item]:
            hits = dict(zip(names, results, strict=True))
            return [
                self._one(item, hits.get(list_id, {}), list_id)
                for item, list_id in zip(items, lists, strict=True)
            ]

        return found.addCallback(split)

    def _one(self, item: Prepared | Problem, hits: dict[str, Suppression], list_id: str) -> Item:
        if not isinstance(item, Prepared) or not hits:
            return self._headed(item, list_id)
        envelope = item.envelope
        kept = [r for r in envelope.recipients if _key(r) not in hits]
        left_out = len(envelope.recipients) - len(kept)
        self.suppressed += left_out
        # The row's own recipient suppressed: its message goes to nobody (not to its Cc or Bcc
        # copies alone either).
        own = hits.get(_key(item.email))
        if own is not None or not kept:
            entry = own if own is not None else hits[_key(envelope.recipients[0])]
            reason = suppressed_reply(entry)
            return Suppressed(item.row, item.email, reason, item.key, item.fingerprint)
        if left_out:
            item = dataclasses.replace(
                item, envelope=dataclasses.replace(envelope, recipients=tuple(kept))
            )
        return self._headed(item, list_id)

    def _headed(self, item: Prepared | Problem, list_id: str) -> Item:
        if self.unsubscribe is None or not isinstance(item, Prepared):
            return item
        address = _key(item.email) or _key(item.envelope.recipients[0])
        envelope = self.unsubscribe.add_to(item.envelope, address, list_id)
        return dataclasses.replace(item, envelope=envelope)
