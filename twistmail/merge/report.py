"""The per-recipient CSV report of a ``twistmail send`` campaign, written from its journal."""

from __future__ import annotations

import csv
import os
import sqlite3

from .journal import JournalError

__all__ = ["REPORT_HEADER", "write_report"]

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
    report_name = os.fspath(report_path)
    if not os.path.isfile(journal_name):
        raise JournalError(f"{journal_name}: no such journal")
    temporary = f"{report_name}.tmp-{os.getpid()}"
    conn = sqlite3.connect(journal_name, isolation_level=None)
    written = 0
    try:
        conn.execute("PRAGMA busy_timeout = 5000")
        try:
            cursor = conn.execute(
                "SELECT row, email, state, code, response, attempts, message_id, "
                "CASE WHEN changed THEN 'yes' ELSE '' END FROM rows ORDER BY row, id"
            )
        except sqlite3.DatabaseError as e:
            raise JournalError(f"{journal_name}: not a twistmail journal ({e})") from e
        with open(temporary, "w", newline="", encoding="utf-8") as stream:
            writer = csv.writer(stream, lineterminator="\r\n")
            writer.writerow(REPORT_HEADER)
            for values in cursor:
                writer.writerow(values)
                written += 1
        os.replace(temporary, report_name)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    finally:
        conn.close()
    return written
