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
import pytest
import pytest_twisted
from servers import CueServer
from test_drain_e2e import drain_later
from test_worker_e2e import query
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
    # twistmail suppress --queue URL reads (and writes) the same list.
    code, exported = await output(run("suppress", "export", "--queue", url))
    assert code == 0, exported
    assert [line.split(",")[:3] for line in exported.splitlines()[1:]] == [
        ["blocked@example.org", "manual", ""],
        ["gone@example.org", "hard-bounce", ""],
        ["reader@example.org", "unsubscribed", "news.example.org"],
    ]
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


@pytest_twisted.ensureDeferred
async def test_a_suppressed_recipient_does_not_fail_a_message_retried_for_another(
    cue_server: Cue, tmp_path: Path
) -> None:
    server = cue_server(rcpt_replies_once={"busy": "451 4.2.1 try later"})
    path = tmp_path / "spool.db"
    queue = await SqliteQueue.open(path)
    (queued,) = await queue.enqueue([envelope(1, "busy@example.org", "blocked@example.org")])  # type: ignore[list-item]
    await queue.close()
    store = await SqliteSuppressionList.open(path, create=False)
    await store.add(ENTRIES)
    try:
        first = await drain_later(path, server.port, 0, suppression=store)
        assert (first.deferred, first.suppressed) == (1, 1)
        later = await drain_later(path, server.port, 3600, suppression=store)
        assert later.sent == 1
    finally:
        await store.close()
    with sqlite3.connect(path) as db:
        (state,) = db.execute("SELECT state FROM messages WHERE id = ?", (queued,)).fetchone()
    assert state == "sent"
    assert [m.recipients for m in server.received] == [["busy@example.org"]]


@pytest_twisted.ensureDeferred
async def test_drain_suppresses_for_a_reply_to_the_data_only_a_sole_recipient(
    cue_server: Cue, tmp_path: Path
) -> None:
    # The final reply to a message answers all of its recipients at once: 550 5.1.1 there
    # names an address only when the message had one.
    refused = {"ann": "550 5.1.1 no such user", "dan": "550 5.1.1 no such user"}
    server = cue_server(data_replies=refused)
    path = tmp_path / "spool.db"
    queue = await SqliteQueue.open(path)
    fine = [envelope(n, f"u{n}@example.org") for n in range(10, 16)]
    both = envelope(1, "ann@example.org", "bob@example.org")
    await queue.enqueue([*fine, both, envelope(2, "dan@example.org")])  # type: ignore[list-item]
    await queue.close()

    code, out = await output(
        run("drain", "--spool", str(path), "--smtp", f"smtp://127.0.0.1:{server.port}")
    )
    assert code == 1, out
    assert sorted(m.recipients for m in server.rejected) == [
        ["ann@example.org", "bob@example.org"],
        ["dan@example.org"],
    ]
    with sqlite3.connect(path) as db:
        added = db.execute("SELECT address, reason FROM suppressions").fetchall()
    assert added == [("dan@example.org", "hard-bounce")]
