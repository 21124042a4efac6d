"""``twistmail send`` resumes from a CSV fixed, extended or re-sorted since the last run.

The CLI runs as a subprocess against real SMTP servers on 127.0.0.1; the journal is a real file.
"""

from __future__ import annotations

import collections
import csv
import hashlib
import signal
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest_twisted
from servers import CueServer
from test_cli_e2e import (
    TEMPLATE,
    _finish,
    _many_rows,
    _message_ids,
    _popen,
    report,
    twistmail,
    write_campaign,
)
from waiting import until

from twistmail.testing import CaptureServer

Cue = Callable[..., CueServer]


def _rows(*names: str) -> list[dict[str, str]]:
    return [{"email": f"{n}@example.org", "name": n.title(), "code": n[:1]} for n in names]


def _sent_to(server: CueServer) -> list[str]:
    return sorted(m.recipients[0] for m in server.received)


def test_fixing_an_invalid_row_then_rerunning_sends_only_that_row(
    cue_server: Cue, tmp_path: Path
) -> None:
    server = cue_server()
    rows = _rows("ann", "bob", "cat")
    rows[1]["email"] = "bob@@example.org"  # a typo: invalid
    csv_path, template_path = write_campaign(tmp_path, rows)
    url = f"smtp://127.0.0.1:{server.port}"
    first = twistmail("send", csv_path, template_path, "--smtp", url)
    assert first.returncode == 1, first.stdout  # an invalid row
    assert _sent_to(server) == ["ann@example.org", "cat@example.org"]
    assert [r["status"] for r in report(tmp_path)] == ["sent", "invalid", "sent"]

    rows[1]["email"] = "bob@example.org"
    write_campaign(tmp_path, rows)
    fixed = twistmail("send", csv_path, template_path, "--smtp", url)
    assert fixed.returncode == 0, fixed.stdout
    assert [m.recipients[0] for m in server.received[2:]] == ["bob@example.org"]
    got = report(tmp_path)
    assert [(r["row"], r["email"], r["status"]) for r in got] == [
        ("1", "ann@example.org", "sent"),
        ("2", "bob@example.org", "sent"),
        ("3", "cat@example.org", "sent"),
    ], "the invalid row's report line is gone with the typo"


def test_appended_rows_alone_are_sent(cue_server: Cue, tmp_path: Path) -> None:
    server = cue_server()
    rows = _rows("ann", "bob")
    csv_path, template_path = write_campaign(tmp_path, rows)
    url = f"smtp://127.0.0.1:{server.port}"
    assert twistmail("send", csv_path, template_path, "--smtp", url).returncode == 0
    # New rows at the top and at the bottom, as an export sorted by signup date might put them.
    write_campaign(tmp_path, [*_rows("cat"), *rows, *_rows("dan")])
    more = twistmail("send", csv_path, template_path, "--smtp", url)
    assert more.returncode == 0, more.stdout
    assert [m.recipients[0] for m in server.received[2:]] == [
        "cat@example.org",
        "dan@example.org",
    ]
    assert len(server.received) == 4
    assert [(r["email"], r["status"]) for r in report(tmp_path)] == [
        ("cat@example.org", "sent"),
        ("ann@example.org", "sent"),
        ("bob@example.org", "sent"),
        ("dan@example.org", "sent"),
    ]


def test_a_resorted_csv_sends_nobody_again_and_keeps_message_ids(
    cue_server: Cue, tmp_path: Path
) -> None:
    server = cue_server()
    rows = _rows("ann", "bob", "cat", "dan")
    csv_path, template_path = write_campaign(tmp_path, rows)
    url = f"smtp://127.0.0.1:{server.port}"
    # Half now, half after the sort: the rest keep the Message-ID their key gives them.
    assert twistmail("send", csv_path, template_path, "--smtp", url, "--limit", "2").returncode == 3
    ids = {r["email"]: r["message_id"] for r in report(tmp_path) if r["message_id"]}
    write_campaign(tmp_path, list(reversed(rows)))
    rest = twistmail("send", csv_path, template_path, "--smtp", url)
    assert rest.returncode == 0, rest.stdout
    assert _sent_to(server) == [f"{n}@example.org" for n in ("ann", "bob", "cat", "dan")]
    got = report(tmp_path)
    assert [(r["row"], r["email"]) for r in got] == [
        ("1", "dan@example.org"),
        ("2", "cat@example.org"),
        ("3", "bob@example.org"),
        ("4", "ann@example.org"),
    ], "the report follows the CSV's new order"
    assert {r["email"]: r["message_id"] for r in got if r["email"] in ids} == ids
    again = twistmail("send", csv_path, template_path, "--smtp", url)
    assert again.returncode == 0
    assert len(server.received) == 4


def test_a_row_changed_after_it_was_sent_is_reported_not_resent(
    cue_server: Cue, tmp_path: Path
) -> None:
    server = cue_server()
    rows = _rows("ann", "bob")
    csv_path, template_path = write_campaign(tmp_path, rows)
    url = f"smtp://127.0.0.1:{server.port}"
    assert twistmail("send", csv_path, template_path, "--smtp", url).returncode == 0
    rows[1]["code"] = "NEW"
    rows[0]["email"] = "ANN@Example.ORG"  # the same mailbox: not a change of recipient
    write_campaign(tmp_path, rows)
    again = twistmail("send", csv_path, template_path, "--smtp", url)
    assert again.returncode == 0, again.stdout
    assert len(server.received) == 2
    assert "changed: row 2 bob@example.org" in again.stdout
    assert "row 1" not in again.stdout.replace("changed: row 2", "")
    changed = {r["email"]: r["changed"] for r in report(tmp_path)}
    assert changed == {"ann@example.org": "", "bob@example.org": "yes"}  # as it was sent
    status = twistmail("status", str(tmp_path / "people.journal.db"))
    assert "changed since sent: 1" in status.stdout
    # Undoing the change clears the flag.
    rows[1]["code"] = "b"
    write_campaign(tmp_path, rows)
    assert "changed:" not in twistmail("send", csv_path, template_path, "--smtp", url).stdout
    assert [r["changed"] for r in report(tmp_path)] == ["", ""]


_JOURNAL_V2 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE rows (
    row INTEGER PRIMARY KEY,
    email TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN
        ('pending', 'sent', 'deferred', 'failed', 'invalid', 'duplicate')),
    code INTEGER,
    response TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    message_id TEXT,
    next_attempt_at REAL,
    updated_at REAL NOT NULL
);
"""


def test_a_journal_of_the_previous_version_is_migrated_and_resumes(
    cue_server: Cue, tmp_path: Path
) -> None:
    server = cue_server()
    rows = _rows("ann", "bob", "cat")
    rows.append({"email": "Ann@example.org", "name": "Ann again", "code": "x"})
    csv_path, template_path = write_campaign(tmp_path, rows)
    journal = tmp_path / "people.journal.db"
    # As version 2 left it: row 1 sent, row 4 its duplicate, row 2 deferred, row 3 pending.
    conn = sqlite3.connect(journal)
    conn.executescript(_JOURNAL_V2)
    template_sha = hashlib.sha256(Path(template_path).read_bytes()).hexdigest()
    conn.executemany(
        "INSERT INTO meta VALUES (?, ?)",
        [
            ("schema_version", "2"),
            ("campaign_id", "0123456789abcdef01234567"),
            ("csv_sha256", "an old fingerprint"),
            ("template_sha256", template_sha),
            ("created_at", "0"),
        ],
    )
    conn.executemany(
        "INSERT INTO rows VALUES (?, ?, ?, ?, ?, ?, ?, NULL, 0)",
        [
            (1, "ann@example.org", "sent", 250, "ok", 1, "<old.1@example.com>"),
            (2, "bob@example.org", "deferred", 451, "later", 1, "<old.2@example.com>"),
            (3, "cat@example.org", "pending", None, "", 0, None),
            (4, "Ann@example.org", "duplicate", None, "dup", 0, None),
        ],
    )
    conn.commit()
    conn.close()
    status = twistmail("status", str(journal))
    assert status.returncode == 1, status.stdout + status.stderr  # read as it is: rows unsent
    assert "bob@example.org" in status.stdout

    # Re-sorted as well: the rows are found by their address, not their old numbers.
    write_campaign(tmp_path, list(reversed(rows)))
    url = f"smtp://127.0.0.1:{server.port}"
    proc = twistmail("send", csv_path, template_path, "--smtp", url)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _sent_to(server) == ["bob@example.org", "cat@example.org"]
    got = [(r["row"], r["email"], r["status"], r["changed"]) for r in report(tmp_path)]
    # Reversed, the second Ann row comes first now: it stands for the Ann already sent (its
    # cells unknown to version 2, so not "changed"); the first Ann row is now its duplicate.
    assert got == [
        ("1", "ann@example.org", "sent", ""),
        ("2", "cat@example.org", "sent", ""),
        ("3", "bob@example.org", "sent", ""),
        ("4", "ann@example.org", "duplicate", ""),
    ]
    conn = sqlite3.connect(journal)
    assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("3",)
    conn.close()


def _write_csv(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["email", "name", "code"])
        writer.writeheader()
        writer.writerows(rows)


@pytest_twisted.ensureDeferred
async def test_sigkill_then_rerun_with_a_resorted_csv_loses_nobody(
    capture_server: Callable[..., CaptureServer], tmp_path: Path
) -> None:
    server = capture_server()
    n, concurrency = 3000, 10
    rows = _many_rows(n)
    csv_path, template_path = write_campaign(tmp_path, rows, TEMPLATE)
    args = ("send", csv_path, template_path, "--smtp", f"smtp://127.0.0.1:{server.port}")
    args += ("--concurrency", str(concurrency))
    proc = _popen(*args)
    try:
        await until(
            lambda: len(server.messages) >= 1000 or proc.poll() is not None,
            "1,000 messages or the CLI ended",
            120,
        )
        assert proc.poll() is None, "finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        assert await _finish(proc) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        assert proc.stdout is not None
        proc.stdout.close()
    assert len(server.messages) < n

    # The export comes back sorted another way (every other row first, then the rest).
    _write_csv(Path(csv_path), rows[1::2] + rows[::2])
    rerun = _popen(*args)
    assert await _finish(rerun) == 0
    assert rerun.stdout is not None
    rerun.stdout.close()

    delivered = collections.Counter(tuple(m.recipients) for m in server.messages)
    expected = {(f"user{i}@example.org".encode(), b"audit@example.com") for i in range(n)}
    assert set(delivered) == expected  # nobody lost
    assert sum(count - 1 for count in delivered.values()) <= concurrency
    assert len(collections.Counter(_message_ids(server))) == n  # a copy keeps its Message-ID
    assert [r["status"] for r in report(tmp_path)] == ["sent"] * n


def test_a_csv_unreadable_halfway_stops_cleanly_and_resumes_once_fixed(
    cue_server: Cue, tmp_path: Path
) -> None:
    server = cue_server()
    rows = _many_rows(3000)
    csv_path, template_path = write_campaign(tmp_path, rows)
    good = Path(csv_path).read_bytes()
    Path(csv_path).write_bytes(good.replace(b"user2000@", b"user2000\xff@"))
    url = f"smtp://127.0.0.1:{server.port}"
    broken = twistmail("send", csv_path, template_path, "--smtp", url)
    assert broken.returncode == 2, broken.stdout + broken.stderr
    assert "not valid UTF-8" in broken.stdout
    assert "(row 2001)" in broken.stdout
    assert "Traceback" not in broken.stdout + broken.stderr
    sent_before = len(server.received)
    assert 0 < sent_before < 2000  # the rows read before the bad byte went out
    Path(csv_path).write_bytes(good)
    fixed = twistmail("send", csv_path, template_path, "--smtp", url)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert sorted(m.recipients[0] for m in server.received) == sorted(
        f"user{i}@example.org" for i in range(3000)
    )
