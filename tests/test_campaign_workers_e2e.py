"""A 20,000-row campaign stored in PostgreSQL, delivered by three ``twistmail worker`` processes,
one of them SIGKILLed midway, into a loopback CaptureServer run by the test's reactor.

The CLI (``send --enqueue-only``) and the workers run as subprocesses on the local PostgreSQL
server; the template and the rows are stored once, and each worker renders the rows it claims.
"""

from __future__ import annotations

import collections
import csv
import os
import re
import signal
import sys
from pathlib import Path

import pytest_twisted
from test_worker_e2e import (
    finish,
    query,
    queue_url,
    schema,  # noqa: F401 - the fixture
    start_worker,
    wait_for,
)
from twisted.internet import utils

from twistmail.ratelimit import window_violation
from twistmail.testing import CaptureServer

TEMPLATE = """\
From: Shop <shop@example.com>
To: {{ name }} <{{ email }}>
Subject: Hello {{ name }}

Dear {{ name }}, your code is {{ code }}.
"""

ROWS = 20_000
CONCURRENCY = 10
RATE = 400.0
"""``--rate`` for every worker, shared through the database: at most ceil(R*w) + 1 MAIL
commands in any window of w >= 1 s, all workers together (about what three workers reach
here without it, so the bound is at work)."""


def _campaign(tmp_path: Path) -> tuple[str, str]:
    csv_path = tmp_path / "spring.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["email", "name", "code"])
        writer.writerows((f"user{i}@example.org", f"User {i}", str(i)) for i in range(ROWS))
    template_path = tmp_path / "message.txt"
    template_path.write_text(TEMPLATE, encoding="utf-8")
    return str(csv_path), str(template_path)


def _message_id(data: bytes) -> str:
    match = re.search(rb"\r\nMessage-ID: (<[^>]+>)\r\n", data)
    assert match is not None
    return match.group(1).decode()


@pytest_twisted.ensureDeferred
async def test_three_workers_one_killed_deliver_every_row_of_a_campaign(
    capture_server: object,
    schema: str,  # noqa: F811 - the fixture
    tmp_path: Path,
) -> None:
    server: CaptureServer = capture_server()  # type: ignore[operator]
    url = queue_url(schema)
    args = ("--queue", url, "--smtp", f"smtp://127.0.0.1:{server.port}")
    args += ("--concurrency", str(CONCURRENCY), "--lease", "2")
    args += ("--rate", str(RATE))
    logs = [tmp_path / f"worker{i}.log" for i in range(3)]
    workers = [start_worker(log, *args) for log in logs]
    try:
        await wait_for(
            lambda: all(b"delivering" in log.read_bytes() for log in logs), "the workers"
        )
        csv_path, template_path = _campaign(tmp_path)
        output, _, code = await utils.getProcessOutputAndValue(
            sys.executable,
            ("-m", "twistmail", "send", csv_path, template_path, "--queue", url, "--enqueue-only"),
            env=dict(os.environ),
        )
        assert code == 0, output
        assert f"{ROWS} queued now".encode() in output
        killed = workers[0]
        await wait_for(lambda: len(server.messages) >= ROWS // 3, "a third delivered")
        assert killed.poll() is None, logs[0].read_text()
        killed.kill()  # SIGKILL: its claims stay "sending" until its lease runs out
        assert await finish(killed) == -signal.SIGKILL
        owner = re.search(r"worker (\S+): delivering", logs[0].read_text())
        assert owner is not None
        in_flight = {
            mid
            for (mid,) in query(
                schema,
                "SELECT message_id FROM messages WHERE state = 'sending' "
                f"AND owner = '{owner.group(1)}'",
            )
        }
        await wait_for(
            lambda: (
                query(schema, "SELECT count(*) FROM messages WHERE state = 'sent'") == [(ROWS,)]
            ),
            "every row sent",
            seconds=180,
        )
        for proc in workers[1:]:
            proc.send_signal(signal.SIGTERM)
            assert await finish(proc) == 0
    finally:
        for proc in workers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    # Every row arrived, under its row's Message-ID (rendered by whichever worker claimed it).
    row_ids = dict(
        query(
            schema,
            "SELECT r.address, m.message_id FROM messages m JOIN recipients r ON r.message = m.id",
        )
    )
    assert len(row_ids) == ROWS
    delivered: collections.Counter[str] = collections.Counter()
    for message in server.messages:
        (rcpt,) = message.recipients
        address = rcpt.decode()
        assert _message_id(message.data) == row_ids[address], address
        assert f"your code is {address[4:].split('@')[0]}.".encode() in message.data
        delivered[row_ids[address]] += 1
    assert set(delivered) == set(row_ids.values()), "a row was lost"
    twice = {mid for mid, count in delivered.items() if count > 1}
    # Duplicates only among what the killed worker had in flight, at most its duplicate bound.
    assert twice <= in_flight, twice - in_flight
    assert len(twice) <= CONCURRENCY
    assert query(schema, "SELECT state, count(*) FROM messages GROUP BY state") == [("sent", ROWS)]
    # The --rate bound, all workers together (the killed one's MAIL commands included).
    assert window_violation([message.mail_at for message in server.messages], RATE) is None
