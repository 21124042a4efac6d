"""``--rate`` and ``--per-domain`` shared through the database: ``twistmail worker`` processes
on one PostgreSQL queue send at most ceil(R*w) + 1 MAIL commands in any window of w >= 1 s,
and have at most N messages in flight to one domain, all together (read at the sink)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import postgres_server
import psycopg
import pytest
from psycopg import sql
from servers import CueServer
from waiting import wait_until

from twistmail.ratelimit import window_violation


@pytest.fixture
def schema() -> Iterator[str]:
    """A PostgreSQL schema of this test's own, dropped after it."""
    postgres_server.require()
    name = postgres_server.new_schema()
    yield name
    postgres_server.drop_schema(name)


def enqueue(schema: str, n: int) -> None:
    """``n`` messages into the queue, by a process of its own (``twistmail worker`` made the
    schema; this writes as the spool backend would)."""
    code = (
        "import sys\n"
        "from twisted.internet import task\n"
        "from twistmail.message import envelope_from_bytes\n"
        "from twistmail.queue.postgres import PostgresQueue\n"
        "async def main(reactor, url, schema, n):\n"
        "    q = await PostgresQueue.open(url, schema=schema, reactor=reactor)\n"
        "    envs = [envelope_from_bytes('shop@example.com', [f'u{i}@example.org'],\n"
        "            f'Subject: {i}\\r\\n\\r\\nbody\\r\\n'.encode()) for i in range(int(n))]\n"
        "    await q.enqueue(envs)\n"
        "    await q.close()\n"
        "task.react(lambda r: __import__('twisted.internet.defer', fromlist=['x'])"
        ".Deferred.fromCoroutine(main(r, *sys.argv[1:])))\n"
    )
    subprocess.run(
        [sys.executable, "-c", code, postgres_server.URL, schema, str(n)], check=True, timeout=60
    )


def deliver_with_workers(
    schema: str, sink: CueServer, tmp_path: Path, n: int, *options: str, workers: int = 3
) -> list[int]:
    """``workers`` ``twistmail worker`` processes (4 connections each, ``options``) on the
    schema's queue deliver ``n`` messages enqueued once they idle, into ``sink``, and are
    stopped with SIGTERM; how many each sent."""
    args = ["--queue", f"{postgres_server.URL}?schema={schema}"]
    args += ["--smtp", f"smtp://127.0.0.1:{sink.port}", "--concurrency", "4", *options]
    logs = [tmp_path / f"worker{i}.log" for i in range(workers)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "twistmail", "worker", *args],
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        for log in logs
    ]
    try:
        wait_until(lambda: all(b"delivering" in log.read_bytes() for log in logs), timeout=60)
        enqueue(schema, n)  # every recipient at example.org
        wait_until(lambda: len(sink.received) >= n, timeout=120)
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        assert [proc.wait(60) for proc in procs] == [0] * workers
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return [int(log.read_text().rsplit("worker: ", 1)[1].split(" sent")[0]) for log in logs]


def count(schema: str, table: str) -> int:
    with psycopg.connect(postgres_server.URL, autocommit=True) as conn:
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table)))
        return int(row.fetchall()[0][0])


def test_workers_on_one_queue_share_one_rate(schema: str, tmp_path: Path) -> None:
    n, rate = 200, 25.0
    with CueServer(pipelining=True) as sink:
        sent = deliver_with_workers(schema, sink, tmp_path, n, "--rate", str(rate))
        times = list(sink.mail_times)
    assert len(times) == n
    assert window_violation(times, rate) is None
    # Each worker sent its share, so the bound held for all of them together, not each alone
    # (three workers each at the rate would have taken a third of the time).
    assert sum(sent) == n
    assert min(sent) > 0, sent
    assert count(schema, "rate_slots") == 1


def test_workers_on_one_queue_share_the_per_domain_cap(schema: str, tmp_path: Path) -> None:
    n, cap = 120, 2
    # Each message held 30 ms at its final dot: 3 workers x 4 connections would overlap.
    with CueServer(pipelining=True, data_delay=0.03) as sink:
        sent = deliver_with_workers(schema, sink, tmp_path, n, "--per-domain", str(cap))
        assert len(sink.received) == n
        assert sink.most_in_flight == cap  # used, and never passed by all workers together
    assert sum(sent) == n
    # Given back once idle; one taken for a delivery cancelled by the stop may be left, to
    # expire with its worker's lease.
    assert count(schema, "domain_slots") <= 3


def test_send_with_a_queue_delivers_at_the_rate_the_workers_share(
    schema: str, tmp_path: Path
) -> None:
    """``twistmail send --queue`` delivering its own campaign is one of the queue's deliverers:
    its ``--rate`` comes from the shared schedule, not from a bucket of its own."""
    n, rate = 60, 20.0
    (tmp_path / "people.csv").write_text(
        "email,name\n" + "".join(f"p{i}@example.org,P {i}\n" for i in range(n))
    )
    (tmp_path / "message.txt").write_text(
        "From: shop@example.com\nTo: {{ name }} <{{ email }}>\nSubject: Hi\n\nHello {{ name }}\n"
    )
    with CueServer(pipelining=True) as sink:
        sent = subprocess.run(
            [sys.executable, "-m", "twistmail", "send", "people.csv", "message.txt",
             "--queue", f"{postgres_server.URL}?schema={schema}",
             "--smtp", f"smtp://127.0.0.1:{sink.port}", "--rate", str(rate)],
            capture_output=True, text=True, cwd=tmp_path, timeout=120, check=False,
        )  # fmt: skip
        times = list(sink.mail_times)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert len(times) == n
    assert window_violation(times, rate) is None
    assert count(schema, "rate_slots") == 1  # paced by the queue's one schedule
