"""``twistmail send --verp-domain``: each row's message goes out from its signed return path,
and the bounce that comes back to it (via ``twistmail bounces --maildir``) names the row; and
``twistmail drain --verp-domain``."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest_twisted
from servers import CueServer
from test_bounce_intake import fixture
from test_bounce_maildir import maildir
from test_cli_e2e import twistmail, write_campaign
from test_drain_e2e import enqueue, finish, start_drain, triple

from twistmail.bounces.verp import VerpKeys, VerpSigner

Cue = Callable[..., CueServer]
VERP = VerpSigner(VerpKeys((("k1", b"s" * 40),)), "bounces.example.com")
TEMPLATE = """\
From: Shop <shop@example.com>
To: {{ name }} <{{ email }}>
Subject: Hello {{ name }}

Your code is {{ code }}.
"""


def test_rows_go_out_from_their_return_paths_and_a_bounce_comes_back_to_its_row(
    cue_server: Cue, tmp_path: Path
) -> None:
    server = cue_server()
    rows = [
        {"email": "ann@example.org", "name": "Ann", "code": "A1"},
        {"email": "bob@example.org", "name": "Bob", "code": "B2"},
    ]
    csv_path, template_path = write_campaign(tmp_path, rows, TEMPLATE)
    secret = tmp_path / "secret"
    secret.write_text("k1:" + "s" * 40 + "\n")
    suppression = tmp_path / "suppressed.db"
    sent = twistmail(
        "send",
        csv_path,
        template_path,
        "--smtp",
        f"smtp://127.0.0.1:{server.port}",
        "--suppression",
        str(suppression),
        "--verp-domain",
        "bounces.example.com",
        "--secret-file",
        str(secret),
    )
    assert sent.returncode == 0, sent.stdout + sent.stderr
    with sqlite3.connect(tmp_path / "people.journal.db") as conn:
        (campaign,) = conn.execute("SELECT value FROM meta WHERE key = 'campaign_id'").fetchone()
        keys = dict(conn.execute("SELECT email, id FROM rows"))
    paths = {}
    for message in server.received:
        (recipient,) = message.recipients
        ref = VERP.verify(message.sender)
        assert ref is not None, message.sender
        assert (ref.kind, ref.campaign, ref.number) == ("campaign", campaign[:10], keys[recipient])
        assert VERP.names(ref, recipient)
        paths[recipient] = message.sender
    assert sorted(paths) == ["ann@example.org", "bob@example.org"]

    # Ann's server bounces to her return path. A forged report naming Bob, sent to Ann's
    # return path, can only be about Ann: Bob is left alone.
    bounce = fixture("postfix-5.1.1-user-unknown.eml", **{"nobody@example.org": "ann@example.org"})
    forged = fixture("postfix-5.1.1-user-unknown.eml", **{"nobody@example.org": "bob@example.org"})
    box = maildir(
        tmp_path,
        {
            "1.host": b"Delivered-To: " + paths["ann@example.org"].encode() + b"\n" + bounce,
            "2.host": b"Delivered-To: " + paths["ann@example.org"].encode() + b"\n" + forged,
        },
    )
    done = twistmail(
        "bounces",
        "--maildir",
        str(box),
        "--suppression",
        str(suppression),
        "--journal",
        str(tmp_path / "people.journal.db"),
        "--verp-domain",
        "bounces.example.com",
        "--secret-file",
        str(secret),
    )
    assert done.returncode == 0, done.stderr
    assert "1.host: hard ann@example.org 5.1.1 (suppressed, failed)" in done.stdout
    assert "2.host: hard ann@example.org 5.1.1 (suppressed, failed)" in done.stdout
    with sqlite3.connect(tmp_path / "people.journal.db") as conn:
        states = {
            email: (state, code, response[:16])
            for email, state, code, response in conn.execute(
                "SELECT email, state, code, response FROM rows"
            )
        }
    assert states["ann@example.org"] == ("failed", 550, "bounced: 5.1.1 5")
    assert states["bob@example.org"][0] == "sent"
    listed = twistmail("suppress", "list", "--suppression", str(suppression))
    assert "ann@example.org" in listed.stdout
    assert "bob@example.org" not in listed.stdout


def test_a_journal_in_use_by_a_running_campaign_is_an_error_and_the_bounce_waits(
    tmp_path: Path,
) -> None:
    import fcntl
    import os

    journal = tmp_path / "people.journal.db"
    with sqlite3.connect(journal) as conn:
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        conn.execute("INSERT INTO meta VALUES ('schema_version', '3'), ('campaign_id', 'abc')")
    secret = tmp_path / "secret"
    secret.write_text("k1:" + "s" * 40 + "\n")
    path = VERP.for_campaign("abc", 1, "ann@example.org")
    bounce = fixture("postfix-5.1.1-user-unknown.eml", **{"nobody@example.org": "ann@example.org"})
    box = maildir(tmp_path, {"1.host": b"Delivered-To: " + path.encode() + b"\n" + bounce})
    fd = os.open(journal, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running twistmail send holds it
        done = twistmail(
            "bounces",
            "--maildir",
            str(box),
            "--suppression",
            str(tmp_path / "s.db"),
            "--journal",
            str(journal),
            "--verp-domain",
            "bounces.example.com",
            "--secret-file",
            str(secret),
        )
    finally:
        os.close(fd)
    assert done.returncode == 1
    assert "in use by another twistmail run" in done.stderr
    assert [p.name for p in (box / "new").iterdir()] == ["1.host"]


def test_verp_domain_needs_the_secret_file(tmp_path: Path) -> None:
    csv_path, template_path = write_campaign(
        tmp_path, [{"email": "a@example.org", "name": "A", "code": "1"}], TEMPLATE
    )
    done = twistmail(
        "send", csv_path, template_path, "--smtp", "smtp://127.0.0.1:1", "--verp-domain", "b.test"
    )
    assert done.returncode == 2
    assert "--verp-domain needs --secret-file" in done.stderr


@pytest_twisted.ensureDeferred
async def test_a_drain_sends_each_recipient_its_own_copy_and_a_bounce_fails_only_its_own(
    cue_server: Cue, tmp_path: Path
) -> None:
    server = cue_server()
    spool = tmp_path / "outbox.db"
    two = ("ok@example.org", "nobody@example.org")
    await enqueue(spool, [triple(1), triple(2, *two)])
    secret = tmp_path / "secret"
    secret.write_text("k1:" + "s" * 40 + "\n")
    verp = ("--verp-domain", "bounces.example.com", "--secret-file", str(secret))
    code, output = await finish(
        start_drain("--spool", str(spool), "--smtp", f"smtp://127.0.0.1:{server.port}", *verp)
    )
    assert code == 0, output
    senders = {tuple(m.recipients): m.sender for m in server.received}
    assert sorted(senders) == [("nobody@example.org",), ("ok@example.org",), ("user1@example.org",)]
    refs = {rcpts[0]: VERP.verify(sender) for rcpts, sender in senders.items()}
    named = {a: (r.kind, r.message, r.number) for a, r in refs.items() if r is not None}
    # Two recipients: one copy each, from its own return path (as list managers send).
    assert named == {
        "user1@example.org": ("queue", 1, 0),
        "ok@example.org": ("queue", 2, 0),
        "nobody@example.org": ("queue", 2, 1),
    }
    copies = [m.data for m in server.received if m.recipients[0] in two]
    assert copies[0] == copies[1]

    # Postfix's DSN for nobody@, at nobody@'s return path: only nobody@ fails.
    dsn = fixture("postfix-5.1.1-user-unknown.eml")
    box = maildir(
        tmp_path, {"1.host": f"Delivered-To: {senders[('nobody@example.org',)]}\r\n".encode() + dsn}
    )
    done = twistmail("bounces", "--maildir", str(box), "--queue", f"sqlite:{spool}", *verp)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1.host: hard nobody@example.org 5.1.1 (suppressed, failed)" in done.stdout
    with sqlite3.connect(spool) as db:
        states = db.execute(
            "SELECT address, state FROM recipients WHERE message = 2 ORDER BY position"
        ).fetchall()
        added = db.execute("SELECT address FROM suppressions").fetchall()
    assert states == [("ok@example.org", "sent"), ("nobody@example.org", "failed")]
    assert added == [("nobody@example.org",)]
