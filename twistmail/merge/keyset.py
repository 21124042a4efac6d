"""A compact set of recipient keys, for finding duplicate recipients in a large campaign.

A million addresses as a Python ``set`` of strings cost about 100 MB; this keeps a 64-bit hash
of each key in sorted arrays, about 8 MB for a million. The set lives in one process (it is
rebuilt from the journal at every run), so Python's own string hash serves. Two different keys
share a hash with a probability of about n² / 2⁶⁵ (3·10⁻⁸ for a million keys); a row that
met such a collision would be reported as a duplicate, never silently dropped.
"""

from __future__ import annotations

import bisect
import heapq
from array import array

__all__ = ["KeySet"]

# Keys added since the last merge are kept in a plain set up to this many.
_RECENT = 1 << 16


_MASK = (1 << 64) - 1


def _digest(key: str) -> int:
    return hash(key) & _MASK  # a non-negative 64-bit value, as array("Q") holds


class KeySet:
    """Strings added and asked about; the membership of a key is kept as its 8-byte digest."""

    def __init__(self) -> None:
        self._sorted = array("Q")
        self._recent: set[int] = set()

    def __len__(self) -> int:
        return len(self._sorted) + len(self._recent)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        digest = _digest(key)
        if digest in self._recent:
            return True
        found = self._sorted
        index = bisect.bisect_left(found, digest)
        return index < len(found) and found[index] == digest

    def add(self, key: str) -> bool:
        """Add ``key``; whether it was new."""
        digest = _digest(key)
        if digest in self._recent:
            return False
        found = self._sorted
        index = bisect.bisect_left(found, digest)
        if index < len(found) and found[index] == digest:
            return False
        self._recent.add(digest)
        if len(self._recent) >= _RECENT:
            self._merge()
        return True

    def _merge(self) -> None:
        self._sorted = array("Q", heapq.merge(self._sorted, sorted(self._recent)))
        self._recent = set()
