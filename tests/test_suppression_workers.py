"""``twistmail drain`` (a SQLite spool) and ``twistmail worker`` (a PostgreSQL queue) as
subprocesses: each checks its queue's suppression list before every message and adds hard
bounces (aiosmtpd refusing with 550 5.1.1) to it."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import postgres_server
import psycopg
import pytest
import pytest_twisted
from psycopg import sql
from servers import CueServer
from twisted.internet import reactor, task

from twistmail.message import envelope_from_bytes
from twistmail.queue import SqliteQueue
from twistmail.queue.postgres import PostgresQueue
from twistmail.queue.postgres_suppression import PostgresSuppressionList
from twistmail.suppression import MANUAL, UNSUBSCRIBED, SqliteSuppressionList, Suppression

Cue = Callable[..., CueServer]
LIST_ID = "List-Id: News <news.example.org>\r\n"


def envelope(n: int, *to: str, headers: str = "") -> object:
    data = f"Message-ID: <m{n}@test>\r\n{headers}Subject: {n}\r\n\r\nbody {n}\r\n".encode()
    return envelope_from_bytes("shop@example.com", list(to), data)


def batch() -> list[object]:
    return [
        envelope(1, "ok@example.org"),
        envelope(2, "blocked@example.org"),
        envelope(3, "ok2@example.org", "blocked@example.org"),
        envelope(4, "reader@example.org", headers=LIST_ID),
        envelope(5, "reader@example.org"),
        envelope(6, "gone@example.org"),
    ]


ENTRIES = [
    Suppression("blocked@example.org", MANUAL),
    Suppression("reader@example.org", UNSUBSCRIBED, "news.example.org"),
]
DELIVERED = sorted([["ok@example.org"], ["ok2@example.org"], ["reader@example.org"]])


async def wait_for(condition: Callable[[], bool], what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await task.deferLater(reactor, 0.05, lambda: None)


def run(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "twistmail", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


async def output(proc: subprocess.Popen[str]) -> tuple[int, str]:
    await wait_for(lambda: proc.poll() is not None, "the process to exit")
    assert proc.stdout is not None
    text = proc.stdout.read()
    proc.stdout.close()
    return proc.returncode, text


@pytest_twisted.ensureDeferred
async def test_drain_checks_the_spools_list_and_adds_hard_bounces(
    cue_server: Cue, tmp_path: Path
) -> None:
    server = cue_server(rcpt_replies={"gone": "550 5.1.1 no such user"})
    path = tmp_path / "spool.db"
    queue = await SqliteQueue.open(path)
    ids = await queue.enqueue(batch())  # type: ignore[arg-type]
    await queue.close()
    store = await SqliteSuppressionList.open(path, create=False)
    await store.add(ENTRIES)
    await store.close()

    code, out = await output(
        run("drain", "--spool", str(path), "--smtp", f"smtp://127.0.0.1:{server.port}")
    )
    assert code == 1, out  # gone@ failed
    assert "3 recipients suppressed (2 messages not sent at all)" in out
    assert sorted(m.recipients for m in server.received) == DELIVERED
    with sqlite3.connect(path) as db:
        states = dict(db.execute("SELECT id, state FROM messages"))
        rcpts = db.execute(
            "SELECT message, address, state, code, response FROM recipients ORDER BY message, "
            "position"
        ).fetchall()
        added = db.execute("SELECT address, reason FROM suppressions ORDER BY address").fetchall()
    assert [states[i] for i in ids] == ["sent", "failed", "sent", "failed", "sent", "failed"]
    assert (ids[2], "blocked@example.org", "failed", None, "suppressed: manual") in rcpts
    assert (
        ids[3],
        "reader@example.org",
        "failed",
        None,
        "suppressed: unsubscribed from news.example.org",
    ) in rcpts
    assert ("gone@example.org", "hard-bounce") in added


@pytest.fixture
def schema() -> Iterator[str]:
    postgres_server.require()
    name = postgres_server.new_schema()
    yield name
    postgres_server.drop_schema(name)


def query(schema: str, text: str) -> list[tuple[object, ...]]:
    with psycopg.connect(postgres_server.URL, autocommit=True) as conn:
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        return conn.execute(text).fetchall()  # type: ignore[arg-type]


@pytest_twisted.ensureDeferred
async def test_a_worker_on_postgresql_checks_the_queues_list_and_adds_hard_bounces(
    cue_server: Cue, schema: str
) -> None:
    server = cue_server(rcpt_replies={"gone": "550 5.1.1 no such user"})
    url = f"{postgres_server.URL}?schema={schema}"
    store = await PostgresSuppressionList.open(postgres_server.URL, schema=schema)
    await store.add(ENTRIES)
    await store.close()
    worker = run("worker", "--queue", url, "--smtp", f"smtp://127.0.0.1:{server.port}")
    try:
        queue = await PostgresQueue.open(postgres_server.URL, schema=schema)
        try:
            await queue.enqueue(batch())  # type: ignore[arg-type]
        finally:
            await queue.close()
        await wait_for(
            lambda: (
                query(schema, "SELECT count(*) FROM messages WHERE state IN ('sent', 'failed')")
                == [(6,)]
            ),
            "every message settled",
        )
        await wait_for(
            lambda: (
                ("gone@example.org", "hard-bounce")
                in query(schema, "SELECT address, reason FROM suppressions")
            ),
            "the hard bounce added",
        )
        worker.send_signal(signal.SIGTERM)
        code, out = await output(worker)
        assert code == 0, out
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert sorted(m.recipients for m in server.received) == DELIVERED
    assert "3 recipients suppressed (2 messages not sent at all)" in out
    suppressed = query(
        schema,
        "SELECT address, response FROM recipients WHERE code IS NULL AND state = 'failed' "
        "ORDER BY message",
    )
    assert suppressed == [
        ("blocked@example.org", "suppressed: manual"),
        ("blocked@example.org", "suppressed: manual"),
        ("reader@example.org", "suppressed: unsubscribed from news.example.org"),
    ]
