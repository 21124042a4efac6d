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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Final, TypeVar

from twisted.internet import defer

from ..address import Address
from ..interfaces import ISuppressionList
from ..suppression.records import Suppression, key_or_none, suppressed_reply
from ..suppression.screen import list_id_of
from ..unsubscribe.headers import Unsubscribe, prepend_headers
from .prepare import Prepared, Problem

__all__ = [
    "SCREEN_BYTES",
    "SCREEN_ROWS",
    "RowScreen",
    "Suppressed",
    "batches",
    "message_size",
    "with_unsubscribe",
]

SCREEN_ROWS: Final = 256
"""Rows checked against the list in one query, at most."""
SCREEN_BYTES: Final = 8 * 1024 * 1024
"""Rendered message bytes held for one check, about: a campaign with a large attachment
holds a few rows at a time, not a whole chunk of the CSV."""

_T = TypeVar("_T")


def batches(
    items: Iterable[_T],
    size: Callable[[_T], int],
    rows: int = SCREEN_ROWS,
    limit: int = SCREEN_BYTES,
) -> Iterator[list[_T]]:
    """``items`` in lists of at most ``rows`` items, each list ending once its ``size``s
    reach ``limit``; lazily, so a list is taken from ``items`` only when it is asked for."""
    batch: list[_T] = []
    held = 0
    for item in items:
        batch.append(item)
        held += size(item)
        if len(batch) >= rows or held >= limit:
            yield batch
            batch, held = [], 0
    if batch:
        yield batch


def message_size(item: Prepared | Problem) -> int:
    """The bytes of a rendered row's message (0 for a row that could not be rendered)."""
    return len(item.envelope.payload) if isinstance(item, Prepared) else 0


@dataclass(frozen=True, slots=True)
class Suppressed:
    """A row not sent: every recipient is on the suppression list (``reason`` says why)."""

    row: int
    email: str
    reason: str
    key: int = 0
    fingerprint: int | None = None


Item = Prepared | Problem | Suppressed


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
        by_list: dict[str, list[Address]] = defaultdict(list)
        for item, list_id in zip(items, lists, strict=True):
            if isinstance(item, Prepared):
                by_list[list_id].extend(item.envelope.recipients)
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
        kept = [r for r in envelope.recipients if key_or_none(r) not in hits]
        left_out = len(envelope.recipients) - len(kept)
        self.suppressed += left_out
        # The row's own recipient suppressed: its message goes to nobody (not to its Cc or Bcc
        # copies alone either).
        own = hits.get(key_or_none(item.email))
        if own is not None or not kept:
            entry = own if own is not None else hits[key_or_none(envelope.recipients[0])]
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
        return with_unsubscribe(item, self.unsubscribe, list_id)


def with_unsubscribe(
    item: Prepared, unsubscribe: Unsubscribe, list_id: str | None = None
) -> Prepared:
    """``item`` with the ``List-Unsubscribe`` headers of its row's recipient, for the list of
    its ``List-Id`` (``list_id``, when already read): what a campaign's message goes out with,
    and what ``preview`` and ``send --dry-run`` show."""
    lines = unsubscribe_lines(item, unsubscribe, list_id)
    return dataclasses.replace(item, envelope=prepend_headers(item.envelope, lines))


def unsubscribe_lines(
    item: Prepared, unsubscribe: Unsubscribe, list_id: str | None = None
) -> bytes:
    """The ``List-Unsubscribe`` header lines of ``item``'s row (see :func:`with_unsubscribe`)."""
    if list_id is None:
        list_id = list_id_of(item.envelope.payload)
    address = key_or_none(item.email) or key_or_none(item.envelope.recipients[0])
    return unsubscribe.headers(address, list_id)
