"""``twistmail bounces --maildir DIR`` as a subprocess, on real SQLite files."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import postgres_server
import pytest
import pytest_twisted
from test_bounce_intake import VERP, fixture, recipients_of, sent_queue
from test_cli_e2e import twistmail
from twisted.internet import threads

from twistmail.message import envelope_from_bytes
from twistmail.queue.postgres import PostgresQueue
from twistmail.queue.records import Outcome
from twistmail.queue.sqlite import SqliteQueue
from twistmail.suppression import SqliteSuppressionList

FIXTURES = Path(__file__).parent / "fixtures" / "dsn"
NOT_A_REPORT = (
    b"From: friend@example.org\r\nTo: bounces@example.com\r\nSubject: hi\r\n\r\nhello\r\n"
)


@pytest.fixture
def pg_schema() -> Iterator[str]:
    """A PostgreSQL schema of this test's own, dropped after it."""
    postgres_server.require()
    name = postgres_server.new_schema()
    yield name
    postgres_server.drop_schema(name)


def maildir(tmp: Path, messages: dict[str, bytes]) -> Path:
    root = tmp / "Maildir"
    for sub in ("new", "cur", "tmp"):
        (root / sub).mkdir(parents=True)
    for name, data in messages.items():
        (root / "new" / name).write_bytes(data)
    return root


async def suppressed(path: Path) -> list[tuple[str, str]]:
    store = await SqliteSuppressionList.open(path, create=False)
    try:
        return [(e.address, e.reason) for e in await store.entries()]
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_reports_are_applied_and_moved_other_mail_is_left_alone_and_counted(
    tmp_path: Path,
) -> None:
    names = [
        "postfix-5.1.1-user-unknown.eml",
        "exim-5.0.0-user-unknown.eml",
        "gmail-4.2.2-over-quota.eml",
        "rfc5965-b2-arf-complete.eml",
        "m365-5.1.8-bad-outbound-sender.eml",
    ]
    box = maildir(
        tmp_path,
        {f"{i}.host": (FIXTURES / n).read_bytes() for i, n in enumerate(names)}
        | {"99.host": NOT_A_REPORT},
    )
    store = tmp_path / "suppressed.db"
    done = twistmail("bounces", "--maildir", str(box), "--suppression", str(store))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == (
        "6 messages: 5 reports (3 hard, 1 soft, 1 complaints, 0 unmatched), 3 suppressed, "
        "0 recipients failed; 1 not reports, left alone"
    )
    assert "0.host: hard nobody@example.org 5.1.1 (suppressed)" in done.stdout
    assert "2.host: soft full@gmail.com 4.2.2" in done.stdout
    assert sorted(p.name for p in (box / "new").iterdir()) == ["99.host"]
    assert (box / "new" / "99.host").read_bytes() == NOT_A_REPORT
    assert sorted(p.name for p in (box / "cur").iterdir()) == [f"{i}.host:2,S" for i in range(5)]
    assert await suppressed(store) == [
        ("nobody@example.org", "hard-bounce"),
        ("user@example.com", "complaint"),
    ]

    again = twistmail("bounces", "--maildir", str(box), "--suppression", str(store))
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines() == [
        "1 messages: 0 reports (0 hard, 0 soft, 0 complaints, 0 unmatched), 0 suppressed, "
        "0 recipients failed; 1 not reports, left alone"
    ]


@pytest_twisted.ensureDeferred
async def test_a_bounce_at_a_verp_return_path_fails_the_queued_recipient(tmp_path: Path) -> None:
    queue_path = tmp_path / "queue.db"
    queue, message = await sent_queue(queue_path, "ok@example.org", "nobody@example.org")
    await queue.close()
    secret = tmp_path / "secret"
    secret.write_text("k1:" + "s" * 40 + "\n")
    path = VERP.for_queued(message, 1, "nobody@example.org")
    dsn = b"Delivered-To: " + path.encode() + b"\r\n" + fixture("postfix-5.1.1-user-unknown.eml")
    box = maildir(tmp_path, {"1.host": dsn})
    done = twistmail(
        "bounces",
        "--maildir",
        str(box),
        "--queue",
        f"sqlite:{queue_path}",
        "--verp-domain",
        "bounces.example.com",
        "--secret-file",
        str(secret),
    )
    assert done.returncode == 0, done.stderr
    assert "1.host: hard nobody@example.org 5.1.1 (suppressed, failed)" in done.stdout
    queue = await SqliteQueue.open(queue_path, create=False)
    try:
        assert await recipients_of(queue, message) == [
            ("ok@example.org", "sent", 250),
            ("nobody@example.org", "failed", 550),
        ]
    finally:
        await queue.close()
    assert await suppressed(queue_path) == [("nobody@example.org", "hard-bounce")]


def test_a_directory_that_is_no_maildir_is_a_clear_error(tmp_path: Path) -> None:
    done = twistmail("bounces", "--maildir", str(tmp_path), "--suppression", str(tmp_path / "s"))
    assert done.returncode == 2
    assert "not a Maildir (no new/ directory)" in done.stderr
    assert not (tmp_path / "s").exists()


def test_a_verp_domain_needs_a_readable_secret_file(tmp_path: Path) -> None:
    box = maildir(tmp_path, {})
    done = twistmail("bounces", "--maildir", str(box), "--verp-domain", "b.example.com")
    assert done.returncode == 2
    assert "--verp-domain and --secret-file go together" in done.stderr
    (tmp_path / "secret").write_text("k1:short\n")
    done = twistmail(
        "bounces",
        "--maildir",
        str(box),
        "--verp-domain",
        "b.example.com",
        "--secret-file",
        str(tmp_path / "secret"),
    )
    assert done.returncode == 2
    assert "line 1" in done.stderr
    assert "short" not in done.stderr


def test_a_missing_queue_is_an_error_and_nothing_moves(tmp_path: Path) -> None:
    box = maildir(tmp_path, {"1.host": (FIXTURES / "postfix-5.1.1-user-unknown.eml").read_bytes()})
    done = twistmail("bounces", "--maildir", str(box), "--queue", f"sqlite:{tmp_path / 'nope.db'}")
    assert done.returncode == 1
    assert "error:" in done.stderr
    assert [p.name for p in (box / "new").iterdir()] == ["1.host"]
    shutil.rmtree(box)


@pytest_twisted.ensureDeferred
async def test_a_postgresql_queue_gets_its_recipient_failed_and_suppressed(
    tmp_path: Path, pg_schema: str
) -> None:
    url = f"{postgres_server.URL}?schema={pg_schema}"
    queue = await PostgresQueue.open(postgres_server.URL, schema=pg_schema)
    try:
        data = b"Message-ID: <feb-news.42@example.com>\r\nSubject: hi\r\n\r\nbody\r\n"
        envelope = envelope_from_bytes("news@example.com", ["nobody@example.org"], data)
        (message,) = await queue.enqueue([envelope])
        (claimed,) = await queue.claim("test", 1, lease=60)
        await queue.record(
            "test",
            Outcome(
                id=message,
                fence=claimed.fence,
                state="sent",
                attempts=1,
                code=250,
                response="ok",
                recipients=((0, "sent", 250, "250 ok"),),
            ),
        )
    finally:
        await queue.close()
    secret = tmp_path / "secret"
    secret.write_text("k1:" + "s" * 40 + "\n")
    path = VERP.for_queued(message, 0, "nobody@example.org")
    dsn = b"Delivered-To: " + path.encode() + b"\r\n" + fixture("exim-5.0.0-user-unknown.eml")
    box = maildir(tmp_path, {"1.host": dsn})
    done = await threads.deferToThread(
        twistmail,
        "bounces",
        "--maildir",
        str(box),
        "--queue",
        url,
        "--verp-domain",
        "bounces.example.com",
        "--secret-file",
        str(secret),
    )
    assert done.returncode == 0, done.stderr
    assert "1.host: hard nobody@example.org 5.1.1 (suppressed, failed)" in done.stdout
    queue = await PostgresQueue.open(postgres_server.URL, schema=pg_schema)
    try:
        status = await queue.message(message)
        assert status is not None
        assert [(r.state, r.code) for r in status.recipients] == [("failed", 550)]
    finally:
        await queue.close()
