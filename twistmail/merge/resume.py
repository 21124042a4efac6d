"""Which CSV rows a campaign run sends: each row sorted against the journal, ahead of rendering.

Every row is looked up in the journal by its key (:mod:`.identity`), on the journal's thread, a
chunk of rows at a time, while the reactor renders and sends the previous chunk:

- a recipient already ``sent`` (or ``failed``, unless failed rows are retried) is skipped; if
  the cells the template reads changed since, the row is reported as *changed* (and flagged in
  the journal), never sent again;
- a later row with the key of an earlier row of this CSV is recorded as ``duplicate`` (under
  ``#N``), unless duplicates are allowed: then the n-th row of a recipient is keyed ``key#n``;
- every other row is recorded ``pending`` (so status and the report name it) and handed to the
  renderer.

Rows still ``pending``, ``invalid`` or ``duplicate`` from an earlier run are forgotten when a
run starts: they are sorted afresh from the CSV as it is now (a fixed row is sent, a removed
one is no longer reported). The recipients seen so far are kept in a :class:`.KeySet` on the
journal's thread, so a million rows cost the reactor thread no memory.
"""

from __future__ import annotations

import itertools
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from twisted.internet import defer
from twisted.python.failure import Failure

from .. import _sqlite
from .csvsource import Row
from .identity import ROW_NUMBER_PREFIX, RowIdentity, row_id
from .journal import Journal
from .keyset import KeySet
from .prepare import guess_email

__all__ = ["DUPLICATE_RESPONSE", "RowFeed", "Sorted", "Sorter"]

DUPLICATE_RESPONSE = (
    "the same recipient as an earlier row: not sent again (--allow-duplicates sends it)"
)

ToSend = tuple[Row, int, int]
"""A row to render: the row, its id (:func:`.identity.row_id`) and its fingerprint."""

_FIRST_CHUNK = 64  # small, so the first messages go out at once
_CHUNK = 1024
_MAX_VARIABLES = 500  # per lookup query (SQLite allows 999 at least)
# Suppressed rows too: checked again on the next run (an entry removed since lets them go).
_FORGET = "DELETE FROM rows WHERE state IN ('pending', 'invalid', 'duplicate', 'suppressed')"
_INSERT_PENDING = (
    "INSERT INTO rows (id, row, email, state, updated_at, fingerprint) "
    "VALUES (?, ?, ?, 'pending', ?, ?)"
)
_INSERT_DUPLICATE = (
    "INSERT INTO rows (id, row, email, state, response, updated_at, fingerprint) "
    "VALUES (?, ?, ?, 'duplicate', ?, ?, ?) "
    "ON CONFLICT (id) DO UPDATE SET row = excluded.row, email = excluded.email, "
    "state = excluded.state, response = excluded.response, updated_at = excluded.updated_at"
)
_MOVE = "UPDATE rows SET row = ?, changed = ? WHERE id = ?"


@dataclass
class Sorted:
    """One chunk of rows, sorted."""

    send: list[ToSend] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Lines to print: duplicate and changed rows."""
    settled: int = 0
    duplicate: int = 0
    changed: int = 0
    finished: bool = False


class Sorter:
    """Sorts a CSV's rows against the journal; :meth:`chunk` runs on the journal's thread."""

    def __init__(
        self,
        rows: Iterator[Row],
        identity: RowIdentity,
        *,
        retry_failed: bool = False,
        allow_duplicates: bool = False,
    ) -> None:
        self._rows = rows
        self._identity = identity
        self._settled_states = ("sent",) if retry_failed else ("sent", "failed")
        self._allow_duplicates = allow_duplicates
        self._seen = KeySet()
        self._repeats: dict[str, int] = {}  # with duplicates allowed: rows per repeated key
        self._started = False

    def chunk(self, conn: sqlite3.Connection, size: int) -> Sorted:
        """Sort up to ``size`` more rows, recording what that decides in one transaction."""
        out = Sorted()
        batch = list(itertools.islice(self._rows, size))
        out.finished = len(batch) < size
        now = time.time()
        identify = self._identity.identify
        seen = self._seen
        keyed: list[tuple[Row, int, str, int]] = []
        duplicates: list[tuple[int, int, str, str, float, int]] = []
        for row in batch:
            key, email, fingerprint = identify(row)
            if key[0] != ROW_NUMBER_PREFIX and not seen.add(key):
                if not self._allow_duplicates:
                    number = row.number
                    out.notes.append(f"duplicate: row {number} {email}: an earlier row has it")
                    duplicates.append(
                        (row_id(f"#{number}"), number, email, DUPLICATE_RESPONSE, now, fingerprint)
                    )
                    continue
                nth = self._repeats[key] = self._repeats.get(key, 1) + 1
                key = f"{key}#{nth}"
            keyed.append((row, row_id(key), email or guess_email(row), fingerprint))
        out.duplicate = len(duplicates)
        with _sqlite.transaction(conn):
            if not self._started:
                self._started = True
                conn.execute(_FORGET)
            known = _lookup(conn, [ident for _, ident, _, _ in keyed])
            pending = []
            moves = []
            for row, ident, email, fingerprint in keyed:
                number = row.number
                found = known.get(ident) if known else None
                if found is None:
                    pending.append((ident, number, email, now, fingerprint))
                    out.send.append((row, ident, fingerprint))
                    continue
                at, state, was, flagged = found
                if state in self._settled_states:
                    out.settled += 1
                    changed = was is not None and was != fingerprint
                    if changed:
                        out.changed += 1
                        out.notes.append(
                            f"changed: row {number} {email}: {state} before, and its cells "
                            "changed since; not sent again"
                        )
                    if at != number or bool(flagged) != changed:
                        moves.append((number, int(changed), ident))
                    continue
                if at != number:
                    moves.append((number, 0, ident))
                out.send.append((row, ident, fingerprint))
            if pending:
                conn.executemany(_INSERT_PENDING, pending)
            if duplicates:
                conn.executemany(_INSERT_DUPLICATE, duplicates)
            if moves:
                conn.executemany(_MOVE, moves)
        return out


def _lookup(
    conn: sqlite3.Connection, ids: list[int]
) -> dict[int, tuple[int, str, int | None, int]]:
    """``id -> (row, state, fingerprint, changed)`` for the ids the journal holds."""
    found: dict[int, tuple[int, str, int | None, int]] = {}
    for start in range(0, len(ids), _MAX_VARIABLES):
        some = ids[start : start + _MAX_VARIABLES]
        cursor = conn.execute(
            "SELECT id, row, state, fingerprint, changed FROM rows "  # noqa: S608
            f"WHERE id IN ({', '.join('?' * len(some))})",
            some,
        )
        for ident, row, state, fingerprint, changed in cursor:
            found[ident] = (row, state, fingerprint, changed)
    return found


class RowFeed:
    """The rows a run renders, sorted on the journal's thread at most two chunks ahead.

    :meth:`take` gives the next chunk, or None while one is being sorted; ``ready`` is called
    when a chunk arrives after :meth:`take` came back empty-handed, and ``sorted`` with every
    chunk (to print its notes and count it). When sorting fails (the CSV cannot be read on),
    ``failed`` is called and the rows sorted before it are still given.
    """

    def __init__(
        self,
        journal: Journal,
        sorter: Sorter,
        *,
        ready: Callable[[], None],
        sorted: Callable[[Sorted], None],
        failed: Callable[[Failure], None],
    ) -> None:
        self._journal = journal
        self._sorter = sorter
        self._ready = ready
        self._sorted = sorted
        self._failed = failed
        self._chunks: deque[list[ToSend]] = deque()
        self._sorting: defer.Deferred[Sorted] | None = None
        self._size = _FIRST_CHUNK
        self._waited = False
        self.finished = False
        """Every row has been sorted."""

    def take(self) -> list[ToSend] | None:
        """The next chunk of rows to render; None when none is ready (or none is left)."""
        chunk = self._chunks.popleft() if self._chunks else None
        if self._sorting is None and not self.finished and len(self._chunks) < 2:
            self._sort()
        if chunk is None:
            self._waited = True
        return chunk

    @property
    def waiting(self) -> bool:
        """Whether rows are still to come."""
        return bool(self._chunks) or not self.finished

    def rest(self) -> defer.Deferred[None]:
        """Sort every row left, without rendering them (they stay pending): fires when done."""
        self._chunks.clear()

        async def run() -> None:
            while self._sorting is not None:
                await self._sorting
            while not self.finished and not self._journal.closing:
                self._got(await self._journal.run(self._sorter.chunk, _CHUNK), rest=True)
            self._chunks.clear()

        return defer.ensureDeferred(run())

    def _sort(self) -> None:
        size, self._size = self._size, _CHUNK
        sorting = self._sorting = self._journal.run(self._sorter.chunk, size)
        sorting.addCallbacks(self._got, self._failed_sort)

    def _got(self, result: Sorted, rest: bool = False) -> None:
        self._sorting = None
        self.finished = result.finished
        self._sorted(result)
        if rest:
            return
        if result.send:
            self._chunks.append(result.send)
        if not self.finished and len(self._chunks) < 2:
            self._sort()
        if self._waited and (self._chunks or self.finished):
            self._waited = False
            self._ready()

    def _failed_sort(self, failure: Failure) -> None:
        # The rows sorted before stay to be sent; none after them is read.
        self._sorting = None
        self.finished = True
        self._failed(failure)
        if self._waited:
            self._waited = False
            self._ready()
