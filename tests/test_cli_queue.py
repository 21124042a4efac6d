"""``twistmail send --queue URL``: a CSV campaign stored in a queue, on SQLite and PostgreSQL.

The CLI and the workers run as subprocesses against a real SMTP server on 127.0.0.1; the
queue is a real SQLite file or a schema of the local PostgreSQL server.
"""

from __future__ import annotations

import csv
import re
import signal
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import dkimcheck
import postgres_server
import pytest
from servers import CueServer
from test_cli_e2e import TEMPLATE, _many_rows, _popen, twistmail, write_campaign
from test_cli_resume import _rows
from waiting import wait_until

Cue = Callable[..., CueServer]


@pytest.fixture(params=["sqlite", "postgresql"])
def queue_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A queue URL of each kind; the PostgreSQL schema is dropped afterwards."""
    if request.param == "sqlite":
        yield f"sqlite:{tmp_path / 'queue.db'}"
        return
    url = postgres_server.require()
    schema = postgres_server.new_schema()
    yield f"{url}?schema={schema}"
    postgres_server.drop_schema(schema)


def _report(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _ids(server: CueServer) -> dict[str, str]:
    """Recipient -> Message-ID of every message the server received (each recipient once)."""
    got: dict[str, str] = {}
    for message in server.received:
        match = re.search(rb"\r\nMessage-ID: (<[^>]+>)\r\n", message.data)
        assert match is not None
        for rcpt in message.recipients:
            if rcpt == "audit@example.com":
                continue
            assert rcpt not in got, f"{rcpt} received twice"
            got[rcpt] = match.group(1).decode()
    return got


def test_validated_sent_reported_and_resumed_from_a_fixed_resorted_csv(
    cue_server: Cue, tmp_path: Path, queue_url: str
) -> None:
    server = cue_server()
    url = f"smtp://127.0.0.1:{server.port}"
    rows = _rows("ann", "bob", "cat")
    rows[1]["email"] = "bob@@example.org"  # a typo: invalid
    rows.append(dict(rows[0], name="Ann Again"))  # a duplicate of row 1
    csv_path, template_path = write_campaign(tmp_path, rows)

    first = twistmail("send", csv_path, template_path, "--queue", queue_url, "--smtp", url)
    assert first.returncode == 1, first.stdout + first.stderr
    assert "invalid: row 2" in first.stdout
    assert "duplicate: row 4 ann@example.org" in first.stdout
    sent = _ids(server)
    assert sorted(sent) == ["ann@example.org", "cat@example.org"]
    got = _report(tmp_path / "people.report.csv")
    assert [(r["row"], r["email"], r["status"]) for r in got] == [
        ("1", "ann@example.org", "sent"),
        ("2", "bob@@example.org", "invalid"),
        ("3", "cat@example.org", "sent"),
        ("4", "ann@example.org", "duplicate"),
    ]
    assert {r["email"]: r["message_id"] for r in got if r["status"] == "sent"} == sent

    # Fixed, extended and re-sorted: only the fixed row and the new one go.
    rows[1]["email"] = "bob@example.org"
    write_campaign(tmp_path, [*_rows("dan"), rows[2], rows[1], rows[0]])
    again = twistmail("send", csv_path, template_path, "--queue", queue_url, "--smtp", url)
    assert again.returncode == 0, again.stdout + again.stderr
    now = _ids(server)  # asserts nobody got a second message
    assert sorted(now) == [f"{n}@example.org" for n in ("ann", "bob", "cat", "dan")]
    assert {k: now[k] for k in sent} == sent, "Message-IDs are stable across runs"

    status = twistmail("status", "--queue", queue_url, "people")
    assert status.returncode == 0, status.stdout + status.stderr
    assert re.search(r"sent\s+4\n", status.stdout)
    written = tmp_path / "again.csv"
    made = twistmail("report", "people", "--queue", queue_url, "--report", str(written))
    assert made.returncode == 0, made.stdout + made.stderr
    assert [(r["row"], r["email"], r["status"], r["message_id"]) for r in _report(written)] == [
        ("1", "dan@example.org", "sent", now["dan@example.org"]),
        ("2", "cat@example.org", "sent", now["cat@example.org"]),
        ("3", "bob@example.org", "sent", now["bob@example.org"]),
        ("4", "ann@example.org", "sent", now["ann@example.org"]),
    ]


def test_failed_rows_go_again_only_with_retry_failed(
    cue_server: Cue, tmp_path: Path, queue_url: str
) -> None:
    # 5.7.1, not 5.1.1: a refusal that does not suppress the address, so it can be retried.
    server = cue_server(rcpt_replies_once={"bob": "550 5.7.1 no such user"})
    url = f"smtp://127.0.0.1:{server.port}"
    csv_path, template_path = write_campaign(tmp_path, _rows("ann", "bob"))
    send = ("send", csv_path, template_path, "--queue", queue_url, "--smtp", url)
    first = twistmail(*send)
    assert first.returncode == 1, first.stdout + first.stderr
    assert "no such user" in first.stdout
    assert sorted(_ids(server)) == ["ann@example.org"]
    assert twistmail(*send).returncode == 1
    assert sorted(_ids(server)) == ["ann@example.org"], "a failed row stays failed"
    retried = twistmail(*send, "--retry-failed")
    assert retried.returncode == 0, retried.stdout + retried.stderr
    assert sorted(_ids(server)) == ["ann@example.org", "bob@example.org"]


def test_enqueue_only_then_a_worker_delivers_and_a_changed_template_is_refused(
    cue_server: Cue, tmp_path: Path, queue_url: str
) -> None:
    server = cue_server()
    csv_path, template_path = write_campaign(tmp_path, _rows("ann", "bob", "cat"))
    queued = twistmail(
        "send", csv_path, template_path, "--queue", queue_url, "--enqueue-only",
        "--campaign", "spring",
    )  # fmt: skip
    assert queued.returncode == 0, queued.stdout + queued.stderr
    assert "3 queued now" in queued.stdout
    assert server.received == []
    pending = twistmail("status", "--queue", queue_url)
    assert pending.returncode == 1
    assert "campaign spring" in pending.stdout
    assert re.search(r"pending\s+3\n", pending.stdout)

    worker = _popen("worker", "--queue", queue_url, "--smtp", f"smtp://127.0.0.1:{server.port}")
    try:
        wait_until(lambda: len(server.received) == 3, timeout=30)
    finally:
        worker.send_signal(signal.SIGTERM)
        output, _ = worker.communicate(timeout=30)
    assert worker.returncode == 0, output
    assert sorted(_ids(server)) == [f"{n}@example.org" for n in ("ann", "bob", "cat")]
    wait_until(lambda: twistmail("status", "--queue", queue_url, "spring").returncode == 0)

    changed = TEMPLATE.replace("Hello", "Hi")
    write_campaign(tmp_path, _rows("ann", "bob", "cat"), template=changed)
    refused = twistmail(
        "send", csv_path, template_path, "--queue", queue_url, "--enqueue-only",
        "--campaign", "spring",
    )  # fmt: skip
    assert refused.returncode == 2
    assert "another template" in refused.stdout


def _queued(queue_url: str) -> list[tuple[str, int]]:
    """Each Message-ID the queue holds, and how many messages carry it."""
    text = "SELECT message_id, count(*) FROM messages GROUP BY message_id"
    if queue_url.startswith("sqlite:"):
        with sqlite3.connect(queue_url[len("sqlite:") :]) as db:
            return [tuple(row) for row in db.execute(text)]
    import psycopg

    url, _, schema = queue_url.partition("?schema=")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'SET search_path TO "{schema}"')
        return [tuple(row) for row in conn.execute(text)]


def test_a_store_killed_midway_then_run_again_queues_every_row_once(
    tmp_path: Path, queue_url: str
) -> None:
    n = 10_000
    csv_path, template_path = write_campaign(tmp_path, _many_rows(n))
    send = ("send", csv_path, template_path, "--queue", queue_url, "--enqueue-only")
    first = _popen(*send)
    try:
        wait_until(lambda: _safe_count(queue_url) > 0, timeout=60)  # a chunk is stored
    finally:
        first.kill()  # SIGKILL, between two chunks or in one
        first.wait()
    assert 0 < _safe_count(queue_url) < n, "killed too late to show anything"
    again = twistmail(*send)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "already queued" in again.stdout
    counts = _queued(queue_url)
    assert len(counts) == n
    assert {count for _, count in counts} == {1}


def _safe_count(queue_url: str) -> int:
    try:
        return len(_queued(queue_url))
    except Exception:  # not created yet
        return 0


def test_an_interrupted_send_resumes_and_sends_nobody_twice(
    cue_server: Cue, tmp_path: Path, queue_url: str
) -> None:
    server = cue_server()
    n = 3000
    csv_path, template_path = write_campaign(tmp_path, _many_rows(n))
    send = ("send", csv_path, template_path, "--queue", queue_url)
    send += ("--smtp", f"smtp://127.0.0.1:{server.port}")
    first = _popen(*send)
    wait_until(lambda: len(server.received) >= 200, timeout=120)
    first.send_signal(signal.SIGTERM)
    output, _ = first.communicate(timeout=60)
    assert first.returncode == 3, output
    assert "interrupted: run the same command again" in output
    assert len(server.received) < n, "interrupted too late to show anything"
    again = twistmail(*send)
    assert again.returncode == 0, again.stdout + again.stderr
    assert len(_ids(server)) == n  # each recipient once: in-flight messages were recorded
    assert [r["status"] for r in _report(tmp_path / "people.report.csv")] == ["sent"] * n


SECRET = "k1:" + "v" * 43


def test_a_queued_campaign_goes_out_from_signed_return_paths_with_verp_domain(
    cue_server: Cue, tmp_path: Path
) -> None:
    from twistmail.bounces.verp import VerpSigner, read_verp_keys

    server = cue_server()
    secret = tmp_path / "secret.key"
    secret.write_text(SECRET + "\n")
    template = TEMPLATE.replace("Bcc: audit@example.com\n", "")
    csv_path, template_path = write_campaign(tmp_path, _rows("ann", "bob"), template)
    queue = f"sqlite:{tmp_path / 'queue.db'}"
    url = f"smtp://127.0.0.1:{server.port}"
    verp = ("--verp-domain", "bounces.example.com", "--secret-file", str(secret))
    sent = twistmail("send", csv_path, template_path, "--queue", queue, "--smtp", url, *verp)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    signer = VerpSigner(read_verp_keys(secret), "bounces.example.com")
    assert sorted(m.recipients[0] for m in server.received) == [
        "ann@example.org",
        "bob@example.org",
    ]
    for message in server.received:
        ref = signer.verify(message.sender)
        assert ref is not None, message.sender
        assert ref.kind == "queue"
        assert signer.names(ref, message.recipients[0])


def test_send_queue_refuses_the_options_it_cannot_carry_out(tmp_path: Path) -> None:
    secret = tmp_path / "secret.key"
    secret.write_text(SECRET + "\n")
    key_file = dkimcheck.write_key(tmp_path / "dkim.pem", dkimcheck.rsa_key())
    csv_path, template_path = write_campaign(tmp_path, _rows("ann"))
    queue_path = tmp_path / "queue.db"
    base = ("send", csv_path, template_path, "--queue", f"sqlite:{queue_path}")
    smtp = ["--smtp", "smtp://127.0.0.1:1"]
    to_workers = "give --verp-domain and --dkim to them"
    cases = [
        ([*smtp, "--suppression", str(tmp_path / "s.db")], "--suppression does not apply"),
        (
            ["--enqueue-only", "--verp-domain", "b.example.com", "--secret-file", str(secret)],
            to_workers,
        ),
        (["--enqueue-only", "--dkim", f"example.com:s1:{key_file}"], to_workers),
    ]
    for options, message in cases:
        done = twistmail(*base, *options)
        assert done.returncode == 2, done.stdout + done.stderr
        assert message in done.stderr, done.stderr
        assert not queue_path.exists()
