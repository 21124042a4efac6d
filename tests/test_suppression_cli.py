"""``twistmail send`` and ``twistmail suppress`` as subprocesses: the suppression list checked
before every message, fed by hard bounces at RCPT (aiosmtpd refusing with 550 5.1.1), and the
one-click unsubscribe headers, signed by DKIM (checked with dkimpy)."""

from __future__ import annotations

import csv
import email
import os
import re
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import dkimcheck
import pytest
import pytest_twisted
from servers import CueServer

from twistmail.queue import SqliteQueue
from twistmail.unsubscribe import TokenBox

Cue = Callable[..., CueServer]
SECRET = "k1:" + "x" * 43
LIST = "news.example.org"

TEMPLATE = """\
From: Shop <shop@example.com>
To: {{ name }} <{{ email }}>
List-Id: Shop news <news.example.org>
Subject: Hello {{ name }}

Dear {{ name }}, news.
"""


def twistmail(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "twistmail", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        input=stdin,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def campaign(tmp: Path, emails: list[str], template: str = TEMPLATE) -> tuple[str, str]:
    csv_path = tmp / "people.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["email", "name"])
        writer.writerows([e, e.split("@")[0].title()] for e in emails)
    template_path = tmp / "message.txt"
    template_path.write_text(template, encoding="utf-8")
    return str(csv_path), str(template_path)


def report(tmp: Path) -> dict[str, dict[str, str]]:
    with (tmp / "people.report.csv").open(newline="", encoding="utf-8") as f:
        return {r["email"]: r for r in csv.DictReader(f)}


def entries(path: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(path) as db:
        return db.execute(
            "SELECT address, reason, list_id FROM suppressions ORDER BY address, list_id"
        ).fetchall()


def test_send_skips_suppressed_rows_reports_them_and_suppresses_hard_bounces(
    cue_server: Cue, tmp_path: Path
) -> None:
    server = cue_server(rcpt_replies={"gone": "550 5.1.1 <gone@example.org>: no such user"})
    store = tmp_path / "suppression.db"
    where = ("--suppression", str(store))
    assert twistmail("suppress", "add", "Blocked@Example.org", *where).returncode == 0
    listed = twistmail("suppress", "add", "reader@example.org", "--list", LIST, *where)
    assert listed.returncode == 0, listed.stderr
    other = twistmail("suppress", "add", "elsewhere@example.org", "--list", "other.example", *where)
    assert other.returncode == 0
    people = [
        "ann@example.org",
        "blocked@example.org",
        "reader@example.org",
        "elsewhere@example.org",
        "gone@example.org",
    ]
    csv_path, template_path = campaign(tmp_path, people)
    url = f"smtp://127.0.0.1:{server.port}"
    sent = twistmail("send", csv_path, template_path, "--smtp", url, *where)
    assert sent.returncode == 1, sent.stdout + sent.stderr  # gone@ failed
    rows = report(tmp_path)
    assert {e: r["status"] for e, r in rows.items()} == {
        "ann@example.org": "sent",
        "blocked@example.org": "suppressed",
        "reader@example.org": "suppressed",
        "elsewhere@example.org": "sent",  # unsubscribed from another list only
        "gone@example.org": "failed",
    }
    assert rows["blocked@example.org"]["response"] == "suppressed: manual"
    assert rows["reader@example.org"]["response"] == f"suppressed: unsubscribed from {LIST}"
    assert sorted(r for m in server.received for r in m.recipients) == [
        "ann@example.org",
        "elsewhere@example.org",
    ]
    assert re.search(r"suppressed\s+│?\s*2", sent.stdout), sent.stdout
    # The hard bounce was added (the only one of a mostly accepted run).
    assert ("gone@example.org", "hard-bounce", "") in entries(store)

    # Sending the failed row again: it is suppressed now, not sent.
    again = twistmail("send", csv_path, template_path, "--smtp", url, *where, "--retry-failed")
    assert again.returncode == 0, again.stdout + again.stderr
    assert report(tmp_path)["gone@example.org"]["status"] == "suppressed"
    assert len(server.received) == 2
    status = twistmail("status", str(tmp_path / "people.journal.db"))
    assert re.search(r"suppressed\s+3", status.stdout), status.stdout
    assert status.returncode == 0  # every row sent or suppressed

    # Removing an entry lets the row go on the next run.
    assert twistmail("suppress", "remove", "blocked@example.org", *where).returncode == 0
    third = twistmail("send", csv_path, template_path, "--smtp", url, *where)
    assert third.returncode == 0, third.stdout
    assert report(tmp_path)["blocked@example.org"]["status"] == "sent"
    assert len(server.received) == 3


def test_a_run_refused_at_once_suppresses_nobody(cue_server: Cue, tmp_path: Path) -> None:
    # A server answering 5.1.1 to everyone (a misconfigured upstream) must not empty the list.
    server = cue_server(rcpt_replies={f"user{n}": "550 5.1.1 no such user" for n in range(12)})
    store = tmp_path / "suppression.db"
    csv_path, template_path = campaign(tmp_path, [f"user{n}@example.org" for n in range(12)])
    url = f"smtp://127.0.0.1:{server.port}"
    sent = twistmail("send", csv_path, template_path, "--smtp", url, "--suppression", str(store))
    assert sent.returncode == 1
    assert set(r["status"] for r in report(tmp_path).values()) == {"failed"}
    assert entries(store) == []


def test_the_default_list_lives_in_the_users_data_directory(
    cue_server: Cue, tmp_path: Path
) -> None:
    server = cue_server()
    default = Path(os.environ["XDG_DATA_HOME"]) / "twistmail" / "suppression.db"
    assert twistmail("suppress", "add", "blocked@example.org").returncode == 0
    assert default.is_file()
    csv_path, template_path = campaign(tmp_path, ["ann@example.org", "blocked@example.org"])
    sent = twistmail("send", csv_path, template_path, "--smtp", f"smtp://127.0.0.1:{server.port}")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert report(tmp_path)["blocked@example.org"]["status"] == "suppressed"
    assert [m.recipients for m in server.received] == [["ann@example.org"]]


def test_send_suppresses_for_a_reply_to_the_data_only_a_rows_sole_recipient(
    cue_server: Cue, tmp_path: Path
) -> None:
    # One reply answers the data for every recipient: with a Bcc it names no one address.
    refused = "550 5.1.1 no such user"
    server = cue_server(data_replies={"ann": refused, "dan": refused})
    store = tmp_path / "suppression.db"
    smtp = ("--smtp", f"smtp://127.0.0.1:{server.port}", "--suppression", str(store))
    with_bcc = TEMPLATE.replace("Subject:", "Bcc: audit@example.com\nSubject:")
    (tmp_path / "two").mkdir()
    (tmp_path / "one").mkdir()
    two = campaign(tmp_path / "two", ["ann@example.org"], with_bcc)
    one = campaign(tmp_path / "one", ["dan@example.org"])
    assert twistmail("send", *two, *smtp).returncode == 1
    assert entries(store) == []
    assert twistmail("send", *one, *smtp).returncode == 1
    assert entries(store) == [("dan@example.org", "hard-bounce", "")]
    assert [m.recipients for m in server.rejected] == [
        ["ann@example.org", "audit@example.com"],
        ["dan@example.org"],
    ]


def one_click_options(tmp: Path) -> tuple[str, ...]:
    """The unsubscribe options (an https URL and a mailto, the key file written in ``tmp``)."""
    secret = tmp / "unsubscribe.key"
    secret.write_text(SECRET + "\n")
    return (
        "--unsubscribe-url",
        "https://mail.example.com/unsubscribe/{token}",
        "--unsubscribe-mailto",
        "unsubscribe@example.com",
        "--secret-file",
        str(secret),
    )


def one_click_token(parsed: email.message.Message) -> str:
    """The token of a message's one-click headers (https URL and mailto, as the tests ask)."""
    assert parsed["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    value = " ".join(parsed["List-Unsubscribe"].split())
    match = re.fullmatch(
        r"<https://mail\.example\.com/unsubscribe/([A-Za-z0-9_.-]+)>, "
        r"<mailto:unsubscribe@example\.com\?subject=unsubscribe%20\1>",
        value,
    )
    assert match is not None, value
    return match.group(1)


@pytest.mark.parametrize("door", ["direct", "queue", "enqueue-then-drain"])
def test_one_click_headers_per_recipient_inside_the_dkim_signature(
    cue_server: Cue, tmp_path: Path, door: str
) -> None:
    """``send`` (directly, or through a queue: the tokens are made when the rows are queued,
    with the sender's secret, and the worker that renders a row adds them)."""
    server = cue_server()
    key_file = dkimcheck.write_key(tmp_path / "dkim.pem", dkimcheck.rsa_key())
    csv_path, template_path = campaign(tmp_path, ["ann@example.org", "bob@example.org"])
    smtp = ("--smtp", f"smtp://127.0.0.1:{server.port}")
    dkim = ("--dkim", f"example.com:rsa1:{key_file}")
    queue = tmp_path / "queue.db"
    where = {
        "direct": ("--suppression", str(tmp_path / "s.db"), *smtp, *dkim),
        "queue": ("--queue", f"sqlite:{queue}", *smtp, *dkim),
        "enqueue-then-drain": ("--queue", f"sqlite:{queue}", "--enqueue-only"),
    }[door]
    sent = twistmail("send", csv_path, template_path, *where, *one_click_options(tmp_path))
    if door == "enqueue-then-drain":
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert server.received == []
        sent = twistmail("drain", "--spool", str(queue), *smtp, *dkim)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    box = TokenBox([("k1", SECRET[3:].encode())])
    tokens = set()
    for message in server.received:
        assert dkimcheck.verify(message.data, keys=(dkimcheck.rsa_key(),))
        parsed = email.message_from_bytes(message.data)
        signed = parsed["DKIM-Signature"].replace("\r\n", "").replace(" ", "").lower()
        assert "list-unsubscribe:list-unsubscribe-post" in signed
        token = one_click_token(parsed)
        assert "ann" not in token
        assert "bob" not in token
        subject = box.open(token)
        assert subject is not None
        assert (subject.address, subject.list_id) == (message.recipients[0], LIST)
        tokens.add(token)
        # The headers changed in any way, the signature fails.
        other = b"B" if token.endswith("A") else b"A"  # a token may end in "A" already
        tampered = message.data.replace(token.encode(), token[:-1].encode() + other, 1)
        assert tampered != message.data
        assert not dkimcheck.verify(tampered, keys=(dkimcheck.rsa_key(),))
    assert len(tokens) == 2


def test_unsubscribe_options_are_checked_before_sending(tmp_path: Path) -> None:
    csv_path, template_path = campaign(tmp_path, ["ann@example.org"])
    base = ("send", csv_path, template_path, "--smtp", "smtp://127.0.0.1:1")
    plain = twistmail(*base, "--unsubscribe-url", "http://x.example/{token}")
    assert plain.returncode == 2
    assert "https" in plain.stderr
    no_secret = twistmail(*base, "--unsubscribe-url", "https://x.example/u/{token}")
    assert no_secret.returncode == 2
    assert "--secret-file" in no_secret.stderr
    weak = tmp_path / "weak.key"
    weak.write_text("k1:short\n")
    bad = twistmail(
        *base, "--unsubscribe-url", "https://x.example/u/{token}", "--secret-file", str(weak)
    )
    assert bad.returncode == 2
    assert "line 1" in bad.stderr
    assert "short" not in bad.stderr


def test_preview_and_dry_run_show_the_unsubscribe_headers_send_adds(tmp_path: Path) -> None:
    csv_path, template_path = campaign(tmp_path, ["ann@example.org", "bob@example.org"])
    options = one_click_options(tmp_path)
    box = TokenBox([("k1", SECRET[3:].encode())])
    preview = twistmail("preview", csv_path, template_path, "--row", "2", *options)
    dry_run = twistmail("send", csv_path, template_path, "--dry-run", *options)
    for shown, address in ((preview, "bob@example.org"), (dry_run, "ann@example.org")):
        assert shown.returncode == 0, shown.stdout + shown.stderr
        head = shown.stdout.split("\n\n", 1)[0]
        parsed = email.message_from_string(head.split("\n", 3)[3])  # after the envelope
        subject = box.open(one_click_token(parsed))
        assert subject is not None
        assert (subject.address, subject.list_id) == (address, LIST)
    # check takes the same options and refuses what send would refuse.
    assert twistmail("check", csv_path, template_path, *options).returncode == 0
    bad = twistmail("check", csv_path, template_path, "--unsubscribe-url", "http://x/{token}")
    assert bad.returncode == 2
    assert "https" in bad.stderr


def test_suppress_import_export_list_remove_and_a_queues_list(tmp_path: Path) -> None:
    store = ("--suppression", str(tmp_path / "s.db"))
    good = tmp_path / "in.csv"
    good.write_text(
        "Email,Reason,List_ID,Created_At,Detail\r\n"
        "ann@example.org,hard-bounce,,2026-01-02T03:04:05Z,550 5.1.1\r\n"
        "BOB@example.org,,news.example.org,,\r\n"
        "carl@example.org,complaint,,1700000000,ARF\r\n"
    )
    bad = tmp_path / "bad.csv"
    bad.write_text("address,reason\r\nok@example.org,manual\r\nnot an address,manual\r\n")
    refused = twistmail("suppress", "import", str(bad), *store)
    assert refused.returncode == 2
    assert "row 3" in refused.stderr
    assert twistmail("suppress", "export", *store).stdout.count("\n") == 1  # header only
    imported = twistmail("suppress", "import", str(good), *store)
    assert imported.returncode == 0, imported.stderr
    assert "imported 3 new of 3" in imported.stdout
    exported = twistmail("suppress", "export", *store)
    assert list(csv.reader(exported.stdout.splitlines())) == [
        ["address", "reason", "list_id", "created_at", "detail"],
        ["ann@example.org", "hard-bounce", "", "2026-01-02T03:04:05Z", "550 5.1.1"],
        ["bob@example.org", "unsubscribed", "news.example.org", exported_time(exported), ""],
        ["carl@example.org", "complaint", "", "2023-11-14T22:13:20Z", "ARF"],
    ]
    # The export imports into another list as it is.
    copy = tmp_path / "copy.csv"
    assert twistmail("suppress", "export", str(copy), *store).returncode == 0
    other = ("--suppression", str(tmp_path / "other.db"))
    assert twistmail("suppress", "import", str(copy), *other).returncode == 0
    assert twistmail("suppress", "export", *other).stdout == exported.stdout
    listed = twistmail("suppress", "list", *store).stdout
    assert "bob@example.org unsubscribed list=news.example.org" in listed
    assert twistmail("suppress", "remove", "nobody@example.org", *store).returncode == 1
    assert twistmail("suppress", "remove", "ann@example.org", *store).returncode == 0
    assert "ann@" not in twistmail("suppress", "list", *store).stdout

    # --queue: the relay's and the workers' list, in the queue's own file.
    queue = tmp_path / "queue.db"
    missing = twistmail("suppress", "list", "--queue", f"sqlite:{queue}")
    assert missing.returncode == 2
    assert "no such spool" in missing.stderr
    assert not queue.exists()  # never made by mistake (a typo in --queue)


@pytest_twisted.ensureDeferred
async def test_suppress_with_queue_uses_the_list_the_relay_and_workers_check(
    tmp_path: Path,
) -> None:
    path = tmp_path / "queue.db"
    await (await SqliteQueue.open(path)).close()
    where = ("--queue", f"sqlite:{path}")
    added = twistmail("suppress", "import", "-", *where, stdin="address\nX@Example.org\n")
    assert added.returncode == 0, added.stderr
    assert entries(path) == [("x@example.org", "manual", "")]
    queue = await SqliteQueue.open(path, create=False)  # still a queue, of the same version
    await queue.close()


def exported_time(done: subprocess.CompletedProcess[str]) -> str:
    """The created_at the export gave bob@ (added at import time: now)."""
    line = next(x for x in done.stdout.splitlines() if x.startswith("bob@"))
    value = line.split(",")[3]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", value)
    return value


def test_a_suppressed_copy_is_left_out_and_a_suppressed_row_sends_no_copy(
    cue_server: Cue, tmp_path: Path
) -> None:
    server = cue_server()
    where = ("--suppression", str(tmp_path / "s.db"))
    assert (
        twistmail("suppress", "add", "copy@example.org", "bob@example.org", *where).returncode == 0
    )
    with_cc = TEMPLATE.replace("List-Id", "Cc: copy@example.org, audit@example.org\nList-Id")
    csv_path, template_path = campaign(tmp_path, ["ann@example.org", "bob@example.org"], with_cc)
    sent = twistmail(
        "send", csv_path, template_path, "--smtp", f"smtp://127.0.0.1:{server.port}", *where
    )
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert [m.recipients for m in server.received] == [["ann@example.org", "audit@example.org"]]
    assert {e: r["status"] for e, r in report(tmp_path).items()} == {
        "ann@example.org": "sent",
        "bob@example.org": "suppressed",
    }
