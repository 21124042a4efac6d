"""The campaign tables of a SQLite spool: added to any spool when it is opened, versioned under
their own ``meta`` key (``campaigns_version``) apart from the spool's schema version."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import pytest_twisted

from twistmail.queue import QueueError, SqliteQueue
from twistmail.queue.sqlite import SCHEMA_VERSION


def _tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        return {n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def _meta(path: Path) -> dict[str, str]:
    with sqlite3.connect(path) as conn:
        return dict(conn.execute("SELECT key, value FROM meta"))


@pytest_twisted.ensureDeferred
async def test_a_spool_without_campaign_tables_gets_them_and_keeps_its_schema_version(
    tmp_path: Path,
) -> None:
    path = tmp_path / "spool.db"
    queue = await SqliteQueue.open(path)
    await queue.close()
    with sqlite3.connect(path) as conn:  # as a spool made before campaigns were stored
        for table in ("campaigns", "campaign_files", "campaign_rows"):
            conn.execute(f"DROP TABLE {table}")
        conn.execute("DELETE FROM meta WHERE key = 'campaigns_version'")
    assert "campaign_rows" not in _tables(path)
    queue = await SqliteQueue.open(path)
    try:
        assert await queue.campaign_status() == []
    finally:
        await queue.close()
    assert {"campaigns", "campaign_files", "campaign_rows"} <= _tables(path)
    meta = _meta(path)
    assert (meta["schema_version"], meta["campaigns_version"]) == (SCHEMA_VERSION, "1")


@pytest_twisted.ensureDeferred
async def test_campaign_tables_of_a_newer_version_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    queue = await SqliteQueue.open(path)
    await queue.close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = '2' WHERE key = 'campaigns_version'")
    with pytest.raises(QueueError, match="campaign tables of version '2'"):
        await SqliteQueue.open(path)
