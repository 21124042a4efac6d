"""The campaign journal (real SQLite files) and the CSV report written from it."""

from __future__ import annotations

import csv
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer

from twistmail.errors import TwistmailError
from twistmail.merge.journal import (
    CampaignChangedError,
    Journal,
    JournalError,
    read_status,
)
from twistmail.merge.report import write_report

TEMPLATE_FP = "t" * 64

Gen = Generator[defer.Deferred[Any], Any, None]


def open_journal(path: Path, **kwargs: Any) -> defer.Deferred[Journal]:
    kwargs.setdefault("template_fingerprint", TEMPLATE_FP)
    return Journal.open(path, **kwargs)


def rows_in_file(path: Path) -> dict[int, tuple[Any, ...]]:
    """Read the journal's rows through a separate connection, as another process would."""
    conn = sqlite3.connect(path)
    try:
        return {
            row[0]: row
            for row in conn.execute(
                "SELECT row, email, state, code, response, attempts, message_id, "
                "next_attempt_at FROM rows"
            )
        }
    finally:
        conn.close()


def journal_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if "twistmail-journal" in t.name]


# Opening ----------------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_open_creates_a_wal_journal_and_close_stops_its_thread(tmp_path: Path) -> Gen:
    path = tmp_path / "campaign.journal"
    journal = yield open_journal(path)
    try:
        assert path.exists()
        assert len(journal.campaign_id) >= 16
        assert journal_threads(), "the writer thread runs while the journal is open"
        conn = sqlite3.connect(path)
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.close()
        # NORMAL (1): a commit survives a killed process; FULL would fsync every commit.
        assert (yield journal.settings()) == ("wal", 1)
        assert (yield journal.counts()) == dict.fromkeys(
            ["pending", "sent", "deferred", "failed", "invalid", "duplicate", "suppressed"], 0
        )
    finally:
        yield journal.close()
    assert not journal_threads()
    assert (yield journal.close()) is None  # idempotent


@pytest_twisted.inlineCallbacks
def test_reopen_keeps_campaign_id_and_message_ids(tmp_path: Path) -> Gen:
    path = tmp_path / "j.sqlite"
    first = yield open_journal(path)
    message_id = first.message_id(7, "example.com")
    yield first.record(7, row=7, email="a@example.com", state="sent", message_id=message_id)
    yield first.close()

    second = yield open_journal(path)
    try:
        assert second.campaign_id == first.campaign_id
        assert second.message_id(7, "example.com") == message_id
        # No address in the header: a token of the key, the same for every run of the campaign.
        assert re.fullmatch(rf"<{first.campaign_id}\.[0-9a-f]{{16}}@example\.com>", message_id)
        assert second.message_id(8, "example.com") != message_id
        assert (yield second.counts())["sent"] == 1
    finally:
        yield second.close()


@pytest_twisted.inlineCallbacks
def test_two_journals_get_different_campaign_ids(tmp_path: Path) -> Gen:
    a = yield open_journal(tmp_path / "a")
    b = yield open_journal(tmp_path / "b")
    try:
        assert a.campaign_id != b.campaign_id
        assert a.message_id(1, "x.org") != b.message_id(1, "x.org")
    finally:
        yield defer.gatherResults([a.close(), b.close()])


@pytest_twisted.inlineCallbacks
def test_a_changed_template_is_refused(tmp_path: Path) -> Gen:
    path = tmp_path / "j"
    journal = yield open_journal(path)
    yield journal.record(1, row=1, email="a@example.com", state="sent")
    yield journal.close()

    with pytest.raises(CampaignChangedError) as info:
        yield open_journal(path, template_fingerprint="u" * 64)
    message = str(info.value)
    assert isinstance(info.value, TwistmailError)
    assert "the template changed" in message
    assert "--new-campaign" in message
    assert not journal_threads(), "a refused open stops its thread"
    assert rows_in_file(path)[1][2] == "sent", "a refused open leaves the journal untouched"


@pytest_twisted.inlineCallbacks
def test_new_campaign_discards_rows_and_makes_a_new_id(tmp_path: Path) -> Gen:
    path = tmp_path / "j"
    old = yield open_journal(path)
    yield old.record(1, row=1, email="a@example.com", state="sent")
    yield old.close()

    new = yield open_journal(path, template_fingerprint="d" * 64, new_campaign=True)
    try:
        assert new.campaign_id != old.campaign_id
        assert (yield new.counts())["sent"] == 0
    finally:
        yield new.close()
    again = yield open_journal(path, template_fingerprint="d" * 64)  # the new one stuck
    yield again.close()
    assert again.campaign_id == new.campaign_id


@pytest_twisted.inlineCallbacks
def test_a_file_that_is_not_a_journal_is_refused(tmp_path: Path) -> Gen:
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    conn.execute("INSERT INTO meta VALUES ('something', 'else')")
    conn.commit()
    conn.close()
    with pytest.raises(JournalError, match="not a twistmail journal"):
        yield open_journal(path)
    assert not journal_threads()


@pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")
@pytest_twisted.inlineCallbacks
def test_one_journal_file_serves_one_run_at_a_time(tmp_path: Path) -> Gen:
    path = tmp_path / "j"
    first = yield open_journal(path)
    try:
        with pytest.raises(JournalError, match="in use"):
            yield open_journal(path, new_campaign=True)
        yield first.record(1, row=1, email="a@example.com", state="sent")
    finally:
        yield first.close()
    second = yield open_journal(path)  # the lock went with close()
    try:
        assert second.campaign_id == first.campaign_id, "the refused new_campaign did nothing"
        assert (yield second.counts())["sent"] == 1
    finally:
        yield second.close()


# Writing ----------------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_record_fires_only_once_visible_to_another_connection(tmp_path: Path) -> Gen:
    path = tmp_path / "j"
    journal = yield open_journal(path)
    seen: dict[int, tuple[Any, ...]] = {}

    def check(_: None, row: int) -> None:
        seen[row] = rows_in_file(path)[row]

    try:
        records = [
            journal.record(
                row,
                row=row,
                email=f"r{row}@example.com",
                state="failed",
                code=550,
                response="5.1.1 no such user",
                attempts=2,
                message_id=f"<m{row}>",
            ).addCallback(check, row)
            for row in range(1, 51)
        ]
        assert not any(d.called for d in records), "nothing is committed synchronously"
        yield defer.gatherResults(records)
    finally:
        yield journal.close()
    assert seen[50] == (
        50,
        "r50@example.com",
        "failed",
        550,
        "5.1.1 no such user",
        2,
        "<m50>",
        None,
    )
    assert len(seen) == 50


@pytest_twisted.inlineCallbacks
def test_group_commit_batches_records_queued_during_a_commit(tmp_path: Path) -> Gen:
    path = tmp_path / "j"
    journal = yield open_journal(path)
    try:
        records = [
            journal.record(row, row=row, email=f"r{row}@example.com", state="sent")
            for row in range(500)
        ]
        yield defer.gatherResults(records)
        # One commit for the first record, one for the 499 queued while it ran.
        assert journal.commits <= 3
        assert len(rows_in_file(path)) == 500
    finally:
        yield journal.close()


@pytest_twisted.inlineCallbacks
def test_records_made_by_callbacks_join_the_next_group(tmp_path: Path) -> Gen:
    """Callers that record their next outcome as soon as the previous one commits still share
    transactions: 20 chains of 25 sequential records take about 25 commits, not 500."""
    journal = yield open_journal(tmp_path / "j")

    @defer.inlineCallbacks
    def caller(first: int) -> Gen:
        for row in range(first, first + 25):
            yield journal.record(row, row=row, email="x@example.com", state="sent")

    try:
        yield defer.gatherResults([caller(start) for start in range(1, 501, 25)])
        assert journal.commits <= 30
        assert (yield journal.counts())["sent"] == 500
    finally:
        yield journal.close()


@pytest_twisted.inlineCallbacks
def test_later_record_of_a_row_replaces_the_earlier(tmp_path: Path) -> Gen:
    path = tmp_path / "j"
    journal = yield open_journal(path)
    try:
        yield journal.record(3, row=3, email="a@example.com", state="pending", attempts=1)
        yield journal.record(
            3, row=3, email="a@example.com", state="deferred", code=451, attempts=1
        )
        yield journal.record(3, row=3, email="a@example.com", state="sent", code=250, attempts=2)
    finally:
        yield journal.close()
    assert rows_in_file(path) == {3: (3, "a@example.com", "sent", 250, "", 2, None, None)}


@pytest_twisted.inlineCallbacks
def test_close_commits_what_is_still_queued(tmp_path: Path) -> Gen:
    path = tmp_path / "j"
    journal = yield open_journal(path)
    records = [
        journal.record(row, row=row, email="x@example.com", state="sent") for row in range(1, 101)
    ]
    yield journal.close()
    assert all(d.called for d in records)
    yield defer.gatherResults(records)
    assert len(rows_in_file(path)) == 100
    with pytest.raises(JournalError):
        journal.record(101, row=101, email="x@example.com", state="sent")
    with pytest.raises(JournalError):
        yield journal.counts()


@pytest_twisted.inlineCallbacks
def test_unknown_state_is_refused_without_harming_others(tmp_path: Path) -> Gen:
    path = tmp_path / "j"
    journal = yield open_journal(path)
    try:
        good = journal.record(1, row=1, email="a@example.com", state="sent")
        with pytest.raises(ValueError, match="bounced"):
            journal.record(2, row=2, email="b@example.com", state="bounced")  # type: ignore[arg-type]
        yield good
    finally:
        yield journal.close()
    assert list(rows_in_file(path)) == [1]


# Reading ----------------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_unsent_rows_and_read_status(tmp_path: Path) -> Gen:
    path = tmp_path / "j"
    journal = yield open_journal(path)
    try:
        for row in range(1, 31):
            state = "sent" if row % 3 else "failed"
            yield journal.record(
                row, row=row, email=f"r{row}@x.org", state=state, response=f"resp {row}"
            )
        unsent = yield journal.unsent_rows(limit=4)
        status = read_status(path, limit=5)  # while the journal is open: WAL readers are fine
    finally:
        yield journal.close()
    assert [(r.row, r.email, r.state, r.response) for r in unsent] == [
        (3, "r3@x.org", "failed", "resp 3"),
        (6, "r6@x.org", "failed", "resp 6"),
        (9, "r9@x.org", "failed", "resp 9"),
        (12, "r12@x.org", "failed", "resp 12"),
    ]
    assert status.campaign_id == journal.campaign_id
    assert status.template_fingerprint == TEMPLATE_FP
    assert status.counts["sent"] == 20
    assert status.counts["failed"] == 10
    assert status.total == 30
    assert [r.row for r in status.unsent] == [3, 6, 9, 12, 15]
    assert status.created_at > 0


def test_read_status_of_a_missing_file_does_not_create_it(tmp_path: Path) -> None:
    path = tmp_path / "nope"
    with pytest.raises(JournalError, match="no such journal"):
        read_status(path)
    assert not path.exists()


# Report -----------------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_write_report_columns_order_and_quoting(tmp_path: Path) -> Gen:
    path = tmp_path / "j"
    report = tmp_path / "report.csv"
    journal = yield open_journal(path)
    nasty = 'line one, with "quotes"\r\nline two'
    try:
        yield defer.gatherResults(
            [
                journal.record(
                    10,
                    row=10,
                    email="b@x.org",
                    state="failed",
                    code=550,
                    response=nasty,
                    attempts=3,
                ),
                journal.record(
                    2, row=2, email="a@x.org", state="sent", code=250, message_id="<id.2@x.org>"
                ),
                journal.record(5, row=5, email="c@x.org", state="invalid", response="bad address"),
            ]
        )
    finally:
        yield journal.close()
    assert write_report(path, report) == 3
    with report.open(newline="", encoding="utf-8") as stream:
        lines = list(csv.reader(stream))
    assert lines == [
        ["row", "email", "status", "code", "response", "attempts", "message_id", "changed"],
        ["2", "a@x.org", "sent", "250", "", "0", "<id.2@x.org>", ""],
        ["5", "c@x.org", "invalid", "", "bad address", "0", "", ""],
        ["10", "b@x.org", "failed", "550", nasty, "3", "", ""],
    ]
    assert report.read_bytes().startswith(
        b"row,email,status,code,response,attempts,message_id,changed\r\n"
    )
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_write_report_of_a_missing_journal_fails_without_a_report(tmp_path: Path) -> None:
    with pytest.raises(JournalError):
        write_report(tmp_path / "nope", tmp_path / "report.csv")
    assert list(tmp_path.iterdir()) == []


# Durability -------------------------------------------------------------------------------

_KILLED_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    from twisted.internet import defer, task
    from twistmail.merge.journal import Journal

    async def main(reactor):
        journal = await Journal.open(
            sys.argv[1], template_fingerprint=sys.argv[3],
            reactor=reactor,
        )
        await defer.gatherResults([
            journal.record(row, row=row, email=f"r{row}@x.org", state="sent", code=250)
            for row in range(1, 201)
        ])
        print(journal.campaign_id, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # no close(), no checkpoint, no atexit

    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
    """
)


@pytest_twisted.inlineCallbacks
def test_committed_records_survive_sigkill(tmp_path: Path) -> Gen:
    path = tmp_path / "j"
    project = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-c", _KILLED_WRITER, str(path), "unused", TEMPLATE_FP],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=project,
        check=False,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    campaign_id = done.stdout.strip()
    wal = Path(f"{path}-wal")
    assert wal.exists(), "the commits live in the WAL: nothing checkpointed or closed them"
    assert wal.stat().st_size > 0

    journal = yield open_journal(path)
    try:
        assert journal.campaign_id == campaign_id
        assert (yield journal.counts())["sent"] == 200
        assert len(rows_in_file(path)) == 200
    finally:
        yield journal.close()


_JOURNAL_V1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE rows (
    row INTEGER PRIMARY KEY,
    email TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'sent', 'deferred', 'failed', 'invalid')),
    code INTEGER,
    response TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    message_id TEXT,
    next_attempt_at REAL,
    updated_at REAL NOT NULL
);
"""


@pytest_twisted.inlineCallbacks
def test_a_version_1_journal_is_migrated_and_keeps_its_rows(tmp_path: Path) -> Gen:
    path = tmp_path / "old.journal.db"
    conn = sqlite3.connect(path)
    conn.executescript(_JOURNAL_V1)
    conn.executemany(
        "INSERT INTO meta VALUES (?, ?)",
        [
            ("schema_version", "1"),
            ("campaign_id", "abc"),
            ("csv_sha256", "c"),
            ("template_sha256", "t"),
            ("created_at", "0"),
        ],
    )
    conn.execute("INSERT INTO rows VALUES (1, 'a@x.org', 'sent', 250, 'ok', 1, '<m>', NULL, 0)")
    conn.commit()
    conn.close()
    journal = yield Journal.open(path, template_fingerprint="t")
    try:
        assert journal.campaign_id == "abc"
        yield journal.record(2, row=2, email="a@x.org", state="duplicate", response="dup")
        counts = yield journal.counts()
        assert (counts["sent"], counts["duplicate"]) == (1, 1)
    finally:
        yield journal.close()
    assert read_status(path).counts["duplicate"] == 1
