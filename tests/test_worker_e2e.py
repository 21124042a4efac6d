"""``twistmail worker`` as subprocesses on one PostgreSQL queue, delivering into a loopback
CaptureServer run by the test's reactor."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import postgres_server
import psycopg
import pytest
import pytest_twisted
from psycopg import sql
from twisted.internet import reactor, task

from twistmail.message import envelope_from_bytes
from twistmail.queue.postgres import PostgresQueue
from twistmail.testing import CaptureServer


@pytest.fixture
def schema() -> Iterator[str]:
    """A PostgreSQL schema of this test's own, dropped after it."""
    postgres_server.require()
    name = postgres_server.new_schema()
    yield name
    postgres_server.drop_schema(name)


def queue_url(schema: str) -> str:
    return f"{postgres_server.URL}?schema={schema}"


def envelope(n: int) -> object:
    data = f"Message-ID: <m{n}@test>\r\nSubject: {n}\r\n\r\nbody {n}\r\n".encode()
    return envelope_from_bytes("shop@example.com", [f"user{n}@example.org"], data)


def start_worker(log: Path, *args: str) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "twistmail", "worker", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


async def wait_for(condition: object, what: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await task.deferLater(reactor, 0.05, lambda: None)


async def finish(proc: subprocess.Popen[bytes], seconds: float = 60) -> int:
    await wait_for(lambda: proc.poll() is not None, "a worker to exit", seconds)
    return proc.returncode


def query(schema: str, text: str) -> list[tuple[object, ...]]:
    with psycopg.connect(postgres_server.URL, autocommit=True) as conn:
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        return conn.execute(text).fetchall()  # type: ignore[arg-type]


@pytest_twisted.ensureDeferred
async def test_two_workers_one_killed_every_message_arrives(
    capture_server: object, schema: str, tmp_path: Path
) -> None:
    server: CaptureServer = capture_server()  # type: ignore[operator]
    n, concurrency = 1500, 4
    url = queue_url(schema)
    args = ("--queue", url, "--smtp", f"smtp://127.0.0.1:{server.port}")
    args += ("--concurrency", str(concurrency), "--lease", "2")
    logs = [tmp_path / "killed.log", tmp_path / "survivor.log"]
    killed, survivor = (start_worker(log, *args) for log in logs)
    try:
        # Both idle on an empty queue first: only NOTIFY (no poll) can wake them.
        await wait_for(
            lambda: all(b"delivering" in log.read_bytes() for log in logs), "the workers"
        )
        queue = await PostgresQueue.open(postgres_server.URL, schema=schema)
        try:
            for start in range(0, n, 250):
                await queue.enqueue([envelope(i) for i in range(start, start + 250)])
        finally:
            await queue.close()
        await wait_for(lambda: len(server.messages) >= n // 3, "a third delivered")
        assert killed.poll() is None, logs[0].read_text()
        killed.kill()  # SIGKILL: its claims stay "sending" until its lease runs out
        assert await finish(killed) == -signal.SIGKILL
        expected = {(f"user{i}@example.org".encode(),) for i in range(n)}
        await wait_for(
            lambda: {tuple(m.recipients) for m in server.messages} >= expected,
            "every message",
        )
        await wait_for(
            lambda: query(schema, "SELECT count(*) FROM messages WHERE state = 'sent'") == [(n,)],
            "every outcome recorded",
        )
        survivor.send_signal(signal.SIGTERM)
        assert await finish(survivor) == 0, logs[1].read_text()
    finally:
        for proc in (killed, survivor):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    both = [log.read_text() for log in logs]
    assert "sent" in both[1]
    delivered = collections.Counter(tuple(m.recipients) for m in server.messages)
    assert set(delivered) == expected  # none lost
    twice = {rcpts[0].decode() for rcpts, count in delivered.items() if count > 1}
    # Duplicates only among what the killed worker had delivered but not recorded: at most
    # its concurrency (the duplicate bound), each a message claimed again after its lease.
    assert len(twice) <= concurrency, twice
    reclaimed = {
        address
        for (address,) in query(
            schema,
            "SELECT r.address FROM messages m JOIN recipients r ON r.message = m.id "
            "WHERE m.fence > 1",
        )
    }
    assert twice <= reclaimed
    assert query(schema, "SELECT state, count(*) FROM messages GROUP BY state") == [("sent", n)]


@pytest_twisted.ensureDeferred
async def test_drain_delivers_from_a_postgresql_queue_by_url(
    capture_server: object, schema: str, tmp_path: Path
) -> None:
    server: CaptureServer = capture_server()  # type: ignore[operator]
    queue = await PostgresQueue.open(postgres_server.URL, schema=schema)
    try:
        await queue.enqueue([envelope(i) for i in range(20)])
    finally:
        await queue.close()
    log = tmp_path / "drain.log"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "twistmail",
            "drain",
            "--queue",
            queue_url(schema),
            "--smtp",
            f"smtp://127.0.0.1:{server.port}",
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    assert await finish(proc) == 0, log.read_text()
    assert "drain: 20 sent" in log.read_text()
    assert len(server.messages) == 20
    assert query(schema, "SELECT state, count(*) FROM messages GROUP BY state") == [("sent", 20)]


def test_a_queue_url_that_is_not_one_is_a_usage_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "twistmail",
            "worker",
            "--queue",
            "mysql://u:pw@db/x",
            "--smtp",
            "smtp://127.0.0.1:1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "expected sqlite:PATH or postgresql://" in result.stdout + result.stderr
    assert "pw" not in result.stdout + result.stderr
