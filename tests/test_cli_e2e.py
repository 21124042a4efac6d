"""``twistmail send`` and friends run as subprocesses against real servers on 127.0.0.1."""

from __future__ import annotations

import collections
import csv
import mailbox
import os
import pty
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import pytest_twisted
from servers import CueServer
from waiting import until

from twistmail.testing import CaptureServer

Cue = Callable[..., CueServer]

TEMPLATE = """\
From: Shop <shop@example.com>
To: {{ name }} <{{ email }}>
Bcc: audit@example.com
Subject: Hello {{ name }}

Dear {{ name }},
.a line that starts with a dot
your code is {{ code }}.
"""


def twistmail(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "twistmail", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def write_campaign(
    tmp: Path, rows: list[dict[str, str]], template: str = TEMPLATE
) -> tuple[str, str]:
    csv_path = tmp / "people.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["email", "name", "code"])
        writer.writeheader()
        writer.writerows(rows)
    template_path = tmp / "message.txt"
    template_path.write_text(template, encoding="utf-8")
    return str(csv_path), str(template_path)


def report(tmp: Path) -> list[dict[str, str]]:
    with (tmp / "people.report.csv").open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_campaign_mixed_outcomes_report_exit_status_and_exact_bytes(
    cue_server: Cue, tmp_path: Path
) -> None:
    server = cue_server(
        # 5.7.1, not 5.1.1: a refusal that does not put the address on the suppression list,
        # so that --retry-failed below sends the row again.
        rcpt_replies={"bounce": "550 5.7.1 refused by policy"},
        rcpt_replies_once={"slow": "451 4.2.1 try again later"},
    )
    rows = [
        {"email": "ann@example.org", "name": "Ann", "code": "A1"},
        {"email": "not-an-address", "name": "Bad", "code": "B2"},
        {"email": "slow@example.org", "name": "Slow", "code": "C3"},
        {"email": "bounce@example.org", "name": "Bounce", "code": "D4"},
        {"email": "eve@example.org", "name": "Eve\r\nBcc: thief@evil.example", "code": "E5"},
        {"email": "zoe@example.org", "name": "Zoë", "code": "F6"},
    ]
    csv_path, template_path = write_campaign(tmp_path, rows)
    url = f"smtp://127.0.0.1:{server.port}"
    proc = twistmail("send", csv_path, template_path, "--smtp", url, "--retry-delay", "0.2")
    assert proc.returncode == 1, proc.stdout + proc.stderr  # some failed or invalid

    by_row = {r["row"]: r for r in report(tmp_path)}
    assert list(by_row) == ["1", "2", "3", "4", "5", "6"]
    assert [by_row[str(i)]["status"] for i in range(1, 7)] == [
        "sent",
        "invalid",
        "sent",
        "failed",
        "invalid",
        "sent",
    ]
    assert by_row["3"]["attempts"] == "2"  # 451 once, then accepted
    assert by_row["4"]["code"] == "550"
    assert "To" in by_row["2"]["response"]
    assert "row 2" in by_row["2"]["response"]
    assert "row 5" in by_row["5"]["response"]
    assert "To" in by_row["5"]["response"]
    ids = {by_row[r]["message_id"] for r in ("1", "3", "6")}
    assert len(ids) == 3
    assert all(i.endswith("@example.com>") for i in ids)

    got = collections.Counter(tuple(m.recipients) for m in server.received)
    # Only the recipient that got 451 is retried; the Bcc copy went out with the first try.
    assert got == collections.Counter(
        {
            ("ann@example.org", "audit@example.com"): 1,
            ("audit@example.com",): 2,  # rows 3 (slow: 451) and 4 (bounce: 550)
            ("slow@example.org",): 1,
            ("zoe@example.org", "audit@example.com"): 1,
        }
    )
    delivered = {tuple(m.recipients): m for m in server.received}
    assert not any("thief" in r for m in server.received for r in m.recipients)
    ann = delivered[("ann@example.org", "audit@example.com")].data
    assert ann.startswith(b"From: Shop <shop@example.com>\r\nTo: Ann <ann@example.org>\r\n")
    assert b"Bcc" not in ann
    assert b"\r\n.a line that starts with a dot\r\n" in ann  # dot-unstuffed by the server
    assert b"\r\r\n" not in ann
    assert b"Message-ID: " + by_row["1"]["message_id"].encode() in ann
    zoe = delivered[("zoe@example.org", "audit@example.com")].data
    assert b"To: =?utf-8?q?Zo=C3=AB?= <zoe@example.org>" in zoe

    # Re-running resumes: nothing more is sent; failed rows stay failed.
    again = twistmail("send", csv_path, template_path, "--smtp", url)
    assert again.returncode == 1
    assert len(server.received) == 5
    # --retry-failed sends the failed row again (still refused, still one try more).
    retried = twistmail("send", csv_path, template_path, "--smtp", url, "--retry-failed")
    assert retried.returncode == 1
    assert report(tmp_path)[3]["status"] == "failed"
    assert len(server.received) == 6  # row 4 once more (its Bcc copy; bounce refused again)

    status = twistmail("status", str(tmp_path / "people.journal.db"))
    assert re.search(r"sent\s+3", status.stdout)
    assert re.search(r"invalid\s+2", status.stdout)
    assert "bounce@example.org" in status.stdout


def test_changed_template_is_refused_unless_new_campaign(cue_server: Cue, tmp_path: Path) -> None:
    server = cue_server()
    rows = [{"email": "ann@example.org", "name": "Ann", "code": "1"}]
    csv_path, template_path = write_campaign(tmp_path, rows)
    url = f"smtp://127.0.0.1:{server.port}"
    assert twistmail("send", csv_path, template_path, "--smtp", url).returncode == 0
    rows.append({"email": "bob@example.org", "name": "Bob", "code": "2"})
    write_campaign(tmp_path, rows, TEMPLATE.replace("Hello", "Hi"))
    refused = twistmail("send", csv_path, template_path, "--smtp", url)
    assert refused.returncode == 2
    assert "template changed" in refused.stdout
    assert "--new-campaign" in refused.stdout
    assert len(server.received) == 1
    fresh = twistmail("send", csv_path, template_path, "--smtp", url, "--new-campaign")
    assert fresh.returncode == 0, fresh.stdout
    assert len(server.received) == 3


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"email,name,code\nann@example.org,Ann,1\n\xff\xfe,Bad,2\n", "byte 38 (row 2)"),
        (
            "\ufeffemail,name,code\nann@example.org,Ann,1\n".encode(),
            "every row is valid",
        ),
    ],
)
def test_check_encoding(tmp_path: Path, content: bytes, expected: str) -> None:
    _, template_path = write_campaign(tmp_path, [])
    (tmp_path / "people.csv").write_bytes(content)
    proc = twistmail("check", str(tmp_path / "people.csv"), template_path)
    assert expected in proc.stdout


def test_check_lists_every_bad_row_naming_row_and_field(tmp_path: Path) -> None:
    rows = [
        {"email": "ann@example.org", "name": "Ann", "code": "1"},
        {"email": "nobody", "name": "X", "code": "2"},
        {"email": "c@example.org", "name": "C\nBcc: x@evil.example", "code": "3"},
        {"email": "d@example.org", "name": "D" * 70000, "code": "4"},
    ]
    csv_path, template_path = write_campaign(tmp_path, rows)
    with open(csv_path, "a", encoding="utf-8") as f:
        f.write("ragged@example.org,only two\n")
    proc = twistmail("check", csv_path, template_path)
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert any(line.startswith("row 2:") and "To" in line for line in lines)
    assert any(line.startswith("row 3:") and "To" in line for line in lines)
    assert any("row 4" in line and "'name'" in line for line in lines)
    assert any("row 5" in line and "2 cells" in line for line in lines)
    assert "4 invalid row(s)" in proc.stdout


def test_template_errors_abort_before_sending(cue_server: Cue, tmp_path: Path) -> None:
    server = cue_server()
    rows = [{"email": "ann@example.org", "name": "Ann", "code": "1"}]
    url = f"smtp://127.0.0.1:{server.port}"
    csv_path, template_path = write_campaign(
        tmp_path, rows, TEMPLATE.replace("{{ code }}", "{{ code ")
    )
    proc = twistmail("send", csv_path, template_path, "--smtp", url)
    assert proc.returncode == 2
    assert "line 8" in proc.stdout
    csv_path, template_path = write_campaign(
        tmp_path, rows, TEMPLATE.replace("{{ code }}", "{{ coupon }}")
    )
    proc = twistmail("send", csv_path, template_path, "--smtp", url)
    assert proc.returncode == 2
    assert "'coupon'" in proc.stdout
    assert "line 8" in proc.stdout
    assert server.received == []


def test_strict_and_dry_run_send_nothing(cue_server: Cue, tmp_path: Path) -> None:
    server = cue_server()
    rows = [
        {"email": "ann@example.org", "name": "Ann", "code": "1"},
        {"email": "broken", "name": "B", "code": "2"},
    ]
    csv_path, template_path = write_campaign(tmp_path, rows)
    url = f"smtp://127.0.0.1:{server.port}"
    strict = twistmail("send", csv_path, template_path, "--smtp", url, "--strict")
    assert strict.returncode == 2
    assert "row 2" in strict.stdout
    dry = twistmail("send", csv_path, template_path, "--smtp", url, "--dry-run")
    assert dry.returncode == 1
    assert "To: Ann <ann@example.org>" in dry.stdout
    assert server.received == []
    assert not (tmp_path / "people.journal.db").exists()


def test_password_never_on_the_command_line_or_in_output(cue_server: Cue, tmp_path: Path) -> None:
    server = cue_server(auth={"bob": "pa55word"})
    rows = [{"email": "ann@example.org", "name": "Ann", "code": "1"}]
    csv_path, template_path = write_campaign(tmp_path, rows)
    secret = tmp_path / "secret"
    secret.write_text("pa55word\n", encoding="utf-8")
    url = f"smtp://bob@127.0.0.1:{server.port}"
    ok = twistmail("send", csv_path, template_path, "--smtp", url, "--password-file", str(secret))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert len(server.received) == 1
    secret.write_text("wrong-pa55\n", encoding="utf-8")
    bad = twistmail(
        "send",
        csv_path,
        template_path,
        "--smtp",
        url,
        "--password-file",
        str(secret),
        "--new-campaign",
    )
    # A refused login stops the run (exit 2) naming the host, and spends no attempt on the row.
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert "authentication failed" in bad.stdout
    assert f"127.0.0.1:{server.port}" in bad.stdout
    assert "wrong-pa55" not in bad.stdout + bad.stderr
    assert "wrong-pa55" not in (tmp_path / "people.report.csv").read_text(encoding="utf-8")


def test_password_in_the_url_is_refused_and_never_echoed(tmp_path: Path) -> None:
    rows = [{"email": "ann@example.org", "name": "Ann", "code": "1"}]
    csv_path, template_path = write_campaign(tmp_path, rows)
    for command in (
        ["send", csv_path, template_path],
        ["drain", "--spool", str(tmp_path / "spool.db")],
    ):
        proc = twistmail(*command, "--smtp", "smtp://bob:s3cr3t-pw@127.0.0.1:1")
        assert proc.returncode == 2
        assert "process list" in proc.stderr
        assert "TWISTMAIL_SMTP_PASSWORD" in proc.stderr
        assert "--password-file" in proc.stderr
        assert "s3cr3t-pw" not in proc.stdout + proc.stderr
    assert not (tmp_path / "people.report.csv").exists()
    assert not (tmp_path / "people.journal.db").exists()


# Interruption ---------------------------------------------------------------------------------


async def _finish(proc: subprocess.Popen[str], seconds: float = 120) -> int:
    await until(lambda: proc.poll() is not None, "the CLI finished", seconds)
    return proc.returncode


def _popen(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "twistmail", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _many_rows(n: int) -> list[dict[str, str]]:
    return [
        {"email": f"user{i}@example.org", "name": f"User {i}", "code": str(i)} for i in range(n)
    ]


def _message_ids(server: CaptureServer) -> list[bytes]:
    ids = []
    for message in server.messages:
        match = re.search(rb"\r\nMessage-ID: (<[^>]+>)\r\n", message.data)
        assert match is not None
        ids.append(match.group(1))
    return ids


@pytest_twisted.ensureDeferred
async def test_sigkill_then_rerun_loses_nobody_and_duplicates_at_most_concurrency(
    capture_server: Callable[..., CaptureServer], tmp_path: Path
) -> None:
    server = capture_server()
    n, concurrency = 5000, 10
    csv_path, template_path = write_campaign(tmp_path, _many_rows(n))
    args = ("send", csv_path, template_path, "--smtp", f"smtp://127.0.0.1:{server.port}")
    args += ("--concurrency", str(concurrency))
    proc = _popen(*args)
    try:
        await until(
            lambda: len(server.messages) >= 1500 or proc.poll() is not None, "1,500 sent", 120
        )
        assert proc.poll() is None, "finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        assert await _finish(proc) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        assert proc.stdout is not None
        proc.stdout.close()
    before = len(server.messages)
    assert before < n

    rerun = _popen(*args)
    assert await _finish(rerun) == 0
    assert rerun.stdout is not None
    rerun.stdout.close()

    delivered = collections.Counter(tuple(m.recipients) for m in server.messages)
    expected = {(f"user{i}@example.org".encode(), b"audit@example.com") for i in range(n)}
    assert set(delivered) == expected  # nobody lost
    duplicates = sum(count - 1 for count in delivered.values())
    assert duplicates <= concurrency
    ids = collections.Counter(_message_ids(server))
    assert len(ids) == n  # a duplicate carries the same Message-ID as its first copy
    rows = report(tmp_path)
    assert len(rows) == n
    assert {r["status"] for r in rows} == {"sent"}


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_sigterm_stops_cleanly_with_exit_3_and_resumes(
    capture_server: Callable[..., CaptureServer], tmp_path: Path, signum: int
) -> None:
    server = capture_server()
    n = 300
    csv_path, template_path = write_campaign(tmp_path, _many_rows(n))
    args = ("send", csv_path, template_path, "--smtp", f"smtp://127.0.0.1:{server.port}")
    proc = _popen(*args, "--rate", "100")
    try:
        await until(lambda: len(server.messages) >= 20, "20 messages")
        proc.send_signal(signum)
        assert await _finish(proc, 30) == 3
        assert proc.stdout is not None
        output = proc.stdout.read()
        proc.stdout.close()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "interrupted" in output
    rows = report(tmp_path)
    sent_rows = [r for r in rows if r["status"] == "sent"]
    assert len(sent_rows) == len(server.messages) < n  # journal agrees with the server
    assert {r["status"] for r in rows} == {"sent", "pending"}  # nothing failed or lost
    assert len(rows) == n
    rerun = _popen(*args)
    assert await _finish(rerun) == 0
    assert rerun.stdout is not None
    rerun.stdout.close()
    assert len(server.messages) == n
    assert len(set(_message_ids(server))) == n


def test_limit_sends_at_most_n_then_resumes(cue_server: Cue, tmp_path: Path) -> None:
    server = cue_server()
    csv_path, template_path = write_campaign(tmp_path, _many_rows(5))
    url = f"smtp://127.0.0.1:{server.port}"
    first = twistmail("send", csv_path, template_path, "--smtp", url, "--limit", "2")
    assert first.returncode == 3  # rows remain to send
    assert len(server.received) == 2
    # Rows not reached yet are in the journal as pending: status and the report name them.
    assert [r["status"] for r in report(tmp_path)] == ["sent"] * 2 + ["pending"] * 3
    status = twistmail("status", str(tmp_path / "people.journal.db"))
    assert re.search(r"pending\s+3", status.stdout)
    assert "user4@example.org" in status.stdout
    rest = twistmail("send", csv_path, template_path, "--smtp", url)
    assert rest.returncode == 0
    assert sorted(m.recipients[0] for m in server.received) == sorted(
        f"user{i}@example.org" for i in range(5)
    )


def test_help_explains_every_option_with_an_example() -> None:
    proc = twistmail("send", "--help")
    assert proc.returncode == 0
    for option in (
        "--smtp",
        "--password-file",
        "--ca-file",
        "--insecure",
        "--concurrency",
        "--rate",
        "--max-attempts",
        "--retry-delay",
        "--from",
        "--journal",
        "--report",
        "--dry-run",
        "--limit",
        "--strict",
        "--retry-failed",
        "--new-campaign",
    ):
        assert option in proc.stdout, option
    assert "example:" in proc.stdout
    for command in ("check", "preview", "status", "capture"):
        sub = twistmail(command, "--help")
        assert sub.returncode == 0
        assert "Example: twistmail " + command in " ".join(sub.stdout.split())


def test_capture_command_receives_the_example_campaign(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parent.parent / "examples"
    for name in ("recipients.csv", "message.txt", "terms.txt"):
        (tmp_path / name).write_bytes((root / name).read_bytes())
    maildir = tmp_path / "maildir"
    capture = subprocess.Popen(
        [sys.executable, "-m", "twistmail", "capture", "--port", "0", "--maildir", str(maildir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert capture.stdout is not None
        first = capture.stdout.readline()
        match = re.match(r"capture server listening on 127\.0\.0\.1:(\d+)", first)
        assert match, first
        url = f"smtp://127.0.0.1:{match.group(1)}"
        sent = twistmail(
            "send", str(tmp_path / "recipients.csv"), str(tmp_path / "message.txt"), "--smtp", url
        )
        assert sent.returncode == 0, sent.stdout + sent.stderr
        lines = [capture.stdout.readline() for _ in range(4)]
    finally:
        capture.send_signal(signal.SIGTERM)
        capture.wait(timeout=10)
        if capture.stdout is not None:
            capture.stdout.close()
    assert capture.returncode == 0
    assert sorted(line.split(" to ")[1].split(":")[0] for line in lines) == [
        "ada@example.org",
        "grace@example.org",
        "jose@example.org",
        "linus@example.org",
    ]
    assert any("Your Básico plan" in line for line in lines)  # subject decoded for display
    stored = list(mailbox.Maildir(str(maildir), create=False))
    assert len(stored) == 4
    for message in stored:
        assert message.get_content_type() == "multipart/mixed"
        parts = [part.get_content_type() for part in message.walk()]
        assert "multipart/alternative" in parts
        assert "text/html" in parts
        assert [p.get_filename() for p in message.walk() if p.get_filename()] == ["terms.txt"]
        assert message["Attachment"] is None
        assert message["Content-Type"].startswith("multipart/mixed")


def test_live_progress_on_a_terminal(cue_server: Cue, tmp_path: Path) -> None:
    server = cue_server()
    csv_path, template_path = write_campaign(tmp_path, _many_rows(20))
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "twistmail",
            "send",
            csv_path,
            template_path,
            "--smtp",
            f"smtp://127.0.0.1:{server.port}",
        ],
        stdout=secondary,
        stderr=secondary,
        env={**os.environ, "COLUMNS": "120"},
    )
    os.close(secondary)
    output = b""
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # the terminal closed: the process has exited
            break
        if not chunk:
            break
        output += chunk
    os.close(primary)
    assert proc.wait(timeout=60) == 0
    text = output.decode("utf-8", "replace")
    assert "sending" in text  # the rich progress bar, only shown on a terminal
    assert "20/20" in text
    assert "progress:" not in text  # not the plain line used when stdout is not a terminal
    assert len(server.received) == 20


def test_unreachable_server_is_named_in_the_report(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    rows = [{"email": "ann@example.org", "name": "Ann", "code": "1"}]
    csv_path, template_path = write_campaign(tmp_path, rows)
    proc = twistmail(
        "send",
        csv_path,
        template_path,
        "--smtp",
        f"smtp://127.0.0.1:{port}",
        "--max-attempts",
        "1",
        "--timeout",
        "2",
        "--give-up-after",
        "1",
    )
    # Nobody to deliver to says nothing about the row: it stays pending for the next run,
    # with no attempt spent, and the run ends with 3 naming the server and the reason.
    assert proc.returncode == 3, proc.stdout + proc.stderr
    (row,) = report(tmp_path)
    assert row["status"] == "pending"
    assert row["attempts"] in ("", "0")
    # From the first failure on, the output says what the run is waiting for.
    assert "waiting for the server: could not connect" in proc.stdout
    assert "error: could not connect" in proc.stdout
    assert f"127.0.0.1:{port}" in proc.stdout


def test_a_later_row_for_the_same_recipient_is_reported_duplicate_not_sent(
    cue_server: Cue, tmp_path: Path
) -> None:
    server = cue_server()
    rows = [
        {"email": "ann@example.org", "name": "Ann", "code": "1"},
        {"email": "bob@example.org", "name": "Bob", "code": "2"},
        {"email": "ANN@Example.ORG", "name": "Ann again", "code": "3"},
    ]
    csv_path, template_path = write_campaign(tmp_path, rows)
    url = f"smtp://127.0.0.1:{server.port}"
    proc = twistmail("send", csv_path, template_path, "--smtp", url)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(r.recipients[0] for r in server.received) == [
        "ann@example.org",
        "bob@example.org",
    ]
    assert "duplicate: row 3" in proc.stdout
    states = {r["row"]: r["status"] for r in report(tmp_path)}
    assert states == {"1": "sent", "2": "sent", "3": "duplicate"}
    # A re-run sends nobody again (row 1 is settled; its duplicate stays a duplicate).
    again = twistmail("send", csv_path, template_path, "--smtp", url)
    assert again.returncode == 0, again.stdout + again.stderr
    assert len(server.received) == 2


def test_a_duplicate_of_a_row_sent_by_an_earlier_run_is_not_sent(
    cue_server: Cue, tmp_path: Path
) -> None:
    server = cue_server()
    rows = [
        {"email": "ann@example.org", "name": "Ann", "code": "1"},
        {"email": "bob@example.org", "name": "Bob", "code": "2"},
        {"email": "Ann@example.org", "name": "Ann again", "code": "3"},
    ]
    csv_path, template_path = write_campaign(tmp_path, rows)
    url = f"smtp://127.0.0.1:{server.port}"
    # The first run stops after one message, before it reads row 3.
    first = twistmail("send", csv_path, template_path, "--smtp", url, "--limit", "1")
    assert first.returncode == 3, first.stdout + first.stderr  # --limit left rows to send
    second = twistmail("send", csv_path, template_path, "--smtp", url)
    assert second.returncode == 0, second.stdout + second.stderr
    assert [r.recipients[0] for r in server.received] == ["ann@example.org", "bob@example.org"]
    assert {r["row"]: r["status"] for r in report(tmp_path)} == {
        "1": "sent",
        "2": "sent",
        "3": "duplicate",
    }


def test_allow_duplicates_sends_every_row(cue_server: Cue, tmp_path: Path) -> None:
    server = cue_server()
    rows = [
        {"email": "ann@example.org", "name": "Ann", "code": "1"},
        {"email": "ann@example.org", "name": "Ann", "code": "2"},
    ]
    csv_path, template_path = write_campaign(tmp_path, rows)
    url = f"smtp://127.0.0.1:{server.port}"
    proc = twistmail("send", csv_path, template_path, "--smtp", url, "--allow-duplicates")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(server.received) == 2
