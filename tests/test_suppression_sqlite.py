"""The SQLite suppression list: its own file, a queue's file, and what it refuses."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import pytest_twisted

from twistmail.message import envelope_from_bytes
from twistmail.queue import SqliteQueue
from twistmail.suppression import (
    MANUAL,
    SqliteSuppressionList,
    Suppression,
    SuppressionError,
    default_suppression_path,
)


@pytest_twisted.ensureDeferred
async def test_entries_outlive_the_process_that_added_them(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = await SqliteSuppressionList.open(path)
    await store.add([Suppression("a@example.org", MANUAL)])
    await store.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT address FROM suppressions").fetchall() == [("a@example.org",)]
        assert dict(conn.execute("SELECT key, value FROM meta")) == {
            "kind": "twistmail-suppression",
            "suppression_schema": "1",
        }
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    again = await SqliteSuppressionList.open(path, create=False)
    assert list(await again.check(["a@example.org"])) == ["a@example.org"]
    await again.close()


@pytest_twisted.ensureDeferred
async def test_in_a_queue_file_the_queue_keeps_working_and_its_version(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    queue = await SqliteQueue.open(path)
    store = await SqliteSuppressionList.open(path)
    await store.add([Suppression("a@example.org", MANUAL)])
    env = envelope_from_bytes("s@example.com", ["b@example.org"], b"Subject: x\r\n\r\nx\r\n")
    assert len(await queue.enqueue([env])) == 1
    await store.close()
    await queue.close()
    with sqlite3.connect(path) as conn:
        meta = dict(conn.execute("SELECT key, value FROM meta"))
    assert meta["kind"] == "twistmail-spool"
    assert meta["schema_version"] == "4"
    assert meta["suppression_schema"] == "1"
    reopened = await SqliteQueue.open(path, create=False)
    assert (await reopened.summary()).counts["queued"] == 1
    await reopened.close()


@pytest_twisted.ensureDeferred
async def test_another_database_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE things (x)")
    with pytest.raises(SuppressionError, match="neither"):
        await SqliteSuppressionList.open(path)
    with sqlite3.connect(path) as conn:
        tables = {n for (n,) in conn.execute("SELECT name FROM sqlite_master")}
    assert tables == {"things"}


@pytest_twisted.ensureDeferred
async def test_a_newer_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    await (await SqliteSuppressionList.open(path)).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = '9' WHERE key = 'suppression_schema'")
    with pytest.raises(SuppressionError, match="version '9'"):
        await SqliteSuppressionList.open(path)


@pytest_twisted.ensureDeferred
async def test_a_missing_file_is_refused_without_create(tmp_path: Path) -> None:
    with pytest.raises(SuppressionError, match="no such"):
        await SqliteSuppressionList.open(tmp_path / "none.db", create=False)
    assert not (tmp_path / "none.db").exists()


def test_the_default_file_is_in_the_users_data_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert default_suppression_path() == str(tmp_path / "data" / "twistmail" / "suppression.db")
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_suppression_path() == str(tmp_path / ".local/share/twistmail/suppression.db")


@pytest_twisted.ensureDeferred
async def test_a_doors_queue_url_opens_the_list_in_the_queues_file(tmp_path: Path) -> None:
    from twistmail.suppression import open_suppression_for_queue

    path = tmp_path / "new-queue.db"
    store = await open_suppression_for_queue(f"sqlite:{path}")
    await store.add([Suppression("a@example.org", MANUAL)])
    await store.close()
    queue = await SqliteQueue.open(path, create=False)  # still (and now) a queue
    await queue.close()
    with pytest.raises(SuppressionError, match="no such spool"):
        await open_suppression_for_queue(f"sqlite:{tmp_path / 'none.db'}", create=False)
    with pytest.raises(SuppressionError, match="--queue"):
        await open_suppression_for_queue("mysql://x")
