"""The per-recipient CSV report of a ``twistmail send`` campaign, written from its journal."""

from __future__ import annotations

import csv
import os
import sqlite3
from collections.abc import Iterable, Sequence

from .journal import JournalError

__all__ = ["REPORT_HEADER", "ReportFile", "write_report"]

REPORT_HEADER = (
    "row",
    "email",
    "status",
    "code",
    "response",
    "attempts",
    "message_id",
    "changed",
)


def write_report(journal_path: str | os.PathLike[str], report_path: str | os.PathLike[str]) -> int:
    """Write one CSV line per journal row, ordered by row; return how many rows were written.

    Columns are :data:`REPORT_HEADER`; ``status`` is the journal state, ``changed`` is ``yes``
    for a row sent (or failed) whose cells changed since, and empty cells stand for no value.
    Fields are quoted by the csv module, so responses holding commas, quotes or line breaks
    stay in their cell. Rows stream from a cursor, so memory does not grow with the
    campaign. The report is written to a temporary file beside ``report_path`` and renamed over
    it, so a reader never sees half a report.

    Synchronous and blocking: from a reactor, run it with ``deferToThread``. Safe while the
    campaign is still writing (it reads one consistent snapshot of the journal).

    :raises JournalError: if ``journal_path`` does not exist or is not a journal.
    """
    journal_name = os.fspath(journal_path)
    if not os.path.isfile(journal_name):
        raise JournalError(f"{journal_name}: no such journal")
    conn = sqlite3.connect(journal_name, isolation_level=None)
    try:
        conn.execute("PRAGMA busy_timeout = 5000")
        try:
            cursor = conn.execute(
                "SELECT row, email, state, code, response, attempts, message_id, "
                "CASE WHEN changed THEN 'yes' ELSE '' END FROM rows ORDER BY row, id"
            )
        except sqlite3.DatabaseError as e:
            raise JournalError(f"{journal_name}: not a twistmail journal ({e})") from e
        report = ReportFile(report_path)
        try:
            report.write(cursor)
            return report.finish()
        except BaseException:
            report.discard()
            raise
    finally:
        conn.close()


class ReportFile:
    """A report being written: lines go to a temporary file beside ``path``, renamed over it
    by :meth:`finish` (a reader never sees half a report). Blocking: from a reactor, call it
    with ``deferToThread``."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._temporary = f"{self.path}.tmp-{os.getpid()}"
        self._stream = open(self._temporary, "w", newline="", encoding="utf-8")  # noqa: SIM115
        self._writer = csv.writer(self._stream, lineterminator="\r\n")
        self._writer.writerow(REPORT_HEADER)
        self.lines = 0

    def write(self, lines: Iterable[Sequence[object]]) -> None:
        """Add ``lines`` (the columns of :data:`REPORT_HEADER`)."""
        for values in lines:
            self._writer.writerow(values)
            self.lines += 1

    def finish(self) -> int:
        """Close the file and put it in place; how many lines it has."""
        self._stream.close()
        os.replace(self._temporary, self.path)
        return self.lines

    def discard(self) -> None:
        """Close and remove the unfinished file."""
        self._stream.close()
        if os.path.exists(self._temporary):
            os.unlink(self._temporary)
