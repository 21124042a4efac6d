"""The suppression list in memory: the :class:`~twistmail.interfaces.ISuppressionList`
contract with no file, for tests (re-exported as :class:`twistmail.testing.MemorySuppressionList`).

Every Deferred has fired by the time the method returns; nothing survives the process.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace

from twisted.internet import defer
from zope.interface import implementer

from ..interfaces import ISuppressionList
from .records import Suppression, SuppressionError, checked, list_key, suppression_key

__all__ = ["MemorySuppressionList"]


@implementer(ISuppressionList)
class MemorySuppressionList:
    """Entries held in a dict; ``clock()`` gives the store's now (e.g. ``task.Clock().seconds``)."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._entries: dict[tuple[str, str], Suppression] = {}
        self._closed = False

    def add(self, entries: Sequence[Suppression]) -> defer.Deferred[int]:
        """Store the entries not there yet; fires with how many were new (see the interface)."""
        return self._do(lambda: self._add(entries))

    def _add(self, entries: Sequence[Suppression]) -> int:
        now = self._clock()
        ready = [checked(entry) for entry in entries]  # all or none
        new = 0
        for entry in ready:
            key = (entry.address, entry.list_id)
            if key not in self._entries:
                at = now if entry.created_at is None else entry.created_at
                self._entries[key] = replace(entry, created_at=at)
                new += 1
        return new

    def remove(self, address: str, list_id: str | None = None) -> defer.Deferred[int]:
        """Remove ``address``'s entry for ``list_id`` (every entry when None); how many."""
        return self._do(lambda: self._remove(address, list_id))

    def _remove(self, address: str, list_id: str | None) -> int:
        key = suppression_key(address)
        lists = {list_key(list_id)} if list_id is not None else None
        gone = [k for k in self._entries if k[0] == key and (lists is None or k[1] in lists)]
        for k in gone:
            del self._entries[k]
        return len(gone)

    def check(
        self, addresses: Iterable[str], list_id: str = ""
    ) -> defer.Deferred[dict[str, Suppression]]:
        """The entries stopping mail on ``list_id`` to any of ``addresses``, by address."""
        return self._do(lambda: self._check(addresses, list_id))

    def _check(self, addresses: Iterable[str], list_id: str) -> dict[str, Suppression]:
        found: dict[str, Suppression] = {}
        lists = ("", list_key(list_id))
        for address in addresses:
            try:
                key = suppression_key(address)
            except SuppressionError:
                continue
            for one in lists:
                entry = self._entries.get((key, one))
                if entry is not None:
                    found[key] = entry
                    break
        return found

    def entries(
        self, *, after: tuple[str, str] | None = None, limit: int = 1000
    ) -> defer.Deferred[list[Suppression]]:
        """Up to ``limit`` entries after ``after``, by (address, list id)."""
        return self._do(
            lambda: [
                self._entries[k]
                for k in sorted(k for k in self._entries if after is None or k > after)[
                    : max(0, limit)
                ]
            ]
        )

    def close(self) -> defer.Deferred[None]:
        """Forget nothing, refuse further work; idempotent."""
        self._closed = True
        return defer.succeed(None)

    def _do(self, work: Callable[[], object]) -> defer.Deferred:  # type: ignore[type-arg]
        if self._closed:
            return defer.fail(SuppressionError("the suppression list is closed"))
        try:
            return defer.succeed(work())
        except SuppressionError:
            return defer.fail()
