"""The SQLite store thread shared by the journal and the queue: reactor shutdown closes a store
left open, committing what was written, and without removing the trigger that is firing."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# Each script opens a store, writes without waiting and never closes it: the reactor's shutdown
# trigger must commit and close it. "-W always" shows every DeprecationWarning, among them
# Twisted's "Removing already-fired system event triggers" if a store removed its own trigger.
_FORGETFUL = {
    "journal": """
        from twistmail.merge.journal import Journal

        async def main(reactor):
            store = await Journal.open(
                sys.argv[1], csv_fingerprint="c", template_fingerprint="t", reactor=reactor
            )
            for row in range(1, 51):
                store.record(row, email=f"r{row}@x.org", state="sent")
        """,
    "queue": r"""
        from twistmail.message import envelope_from_bytes
        from twistmail.queue import SqliteQueue

        async def main(reactor):
            store = await SqliteQueue.open(sys.argv[1], reactor=reactor)
            message = envelope_from_bytes("a@x.org", ["b@x.org"], b"Subject: x\r\n\r\nx\r\n")
            for n in range(50):
                store.enqueue([message])
        """,
}

_COUNT = {
    "journal": "SELECT count(*) FROM rows WHERE state = 'sent'",
    "queue": "SELECT count(*) FROM messages WHERE state = 'queued'",
}


@pytest.mark.parametrize("store", sorted(_FORGETFUL))
def test_reactor_shutdown_closes_a_forgotten_store_without_a_warning(
    store: str, tmp_path: Path
) -> None:
    path = tmp_path / "store.db"
    script = "import sys\nfrom twisted.internet import defer, task\n" + textwrap.dedent(
        _FORGETFUL[store]
    )
    script += "\ntask.react(lambda reactor: defer.ensureDeferred(main(reactor)))\n"
    done = subprocess.run(
        [sys.executable, "-W", "always", "-c", script, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "already-fired" not in done.stderr
    assert "Traceback" not in done.stderr
    assert not Path(f"{path}-wal").exists(), "closed cleanly: SQLite removed the WAL"
    conn = sqlite3.connect(path)
    try:
        assert conn.execute(_COUNT[store]).fetchone() == (50,)
    finally:
        conn.close()
