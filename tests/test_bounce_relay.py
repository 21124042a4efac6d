"""Bounces over SMTP: ``twistd twistmail --bounce-domain`` as a subprocess, smtplib as the remote
server sending the bounce, aiosmtpd (CueServer) as the upstream."""

from __future__ import annotations

import re
import smtplib
import sqlite3
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from relay_process import RelayProcess
from servers import CueServer, Received
from test_bounce_intake import fixture
from twisted.python import usage
from waiting import wait_until

from twistmail.bounces.verp import VerpKeys, VerpSigner
from twistmail.relay.tap import Options

SECRET = "k1:" + "s" * 40
VERP = VerpSigner(VerpKeys((("k1", b"s" * 40),)), "bounces.example.com")
MESSAGE = (
    b"From: news@example.com\r\nTo: nobody@example.org\r\nSubject: news\r\n"
    b"Message-ID: <feb-news.42@example.com>\r\n\r\nHello.\r\n"
)
TRUSTED = "127.0.0.2"  # the application; the test's other connections come from 127.0.0.1


@pytest.fixture(scope="module")
def upstream() -> Iterator[CueServer]:
    with CueServer(pipelining=True) as server:
        yield server


@pytest.fixture(scope="module")
def relay(upstream: CueServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    tmp = tmp_path_factory.mktemp("bounces")
    (tmp / "secret").write_text(SECRET + "\n")
    with RelayProcess(
        tmp / "queue.db",
        upstream.port,
        "--bounce-domain",
        "bounces.example.com",
        "--secret-file",
        str(tmp / "secret"),
        "--allow-from",
        f"{TRUSTED}/32",
        "--no-bounces",
        "--verp",
        http="tcp:0:interface=127.0.0.1",
    ) as r:
        yield r


def delivered_message(relay: RelayProcess, upstream: CueServer) -> int:
    """A message from the application, delivered upstream; its queue id."""
    with smtplib.SMTP("127.0.0.1", relay.port, source_address=(TRUSTED, 0)) as c:
        c.ehlo()
        c.mail("news@example.com")
        c.rcpt("nobody@example.org")
        code, reply = c.data(MESSAGE)
    assert code == 250, reply
    match = re.search(rb"queued as (\d+)", reply)
    assert match is not None
    queue_id = int(match.group(1))
    wait_until(lambda: recipient_state(relay.queue_path, queue_id) == "sent")
    return queue_id


def recipient_state(path: Path, message: int) -> str | None:
    with sqlite3.connect(path) as conn:
        row = conn.execute(
            "SELECT state FROM recipients WHERE message = ? AND position = 0", (message,)
        ).fetchone()
    return None if row is None else str(row[0])


def suppressions(path: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(path) as conn:
        try:
            return conn.execute("SELECT address, reason FROM suppressions").fetchall()
        except sqlite3.OperationalError:
            return []


def test_a_message_goes_out_from_its_signed_return_path(
    relay: RelayProcess, upstream: CueServer
) -> None:
    queue_id = delivered_message(relay, upstream)
    (sent,) = [m for m in upstream.received if b"<feb-news.42@example.com>" in m.data][-1:]
    assert sent.recipients == ["nobody@example.org"]
    ref = VERP.verify(sent.sender)
    assert ref is not None
    assert (ref.kind, ref.message, ref.number) == ("queue", queue_id, 0)
    assert VERP.names(ref, "nobody@example.org")


def test_a_postfix_dsn_to_a_signed_return_path_fails_and_suppresses_and_is_never_relayed(
    relay: RelayProcess, upstream: CueServer
) -> None:
    queue_id = delivered_message(relay, upstream)
    # The remote server bounces to the envelope sender the relay used.
    (sent,) = [m for m in upstream.received if b"<feb-news.42@example.com>" in m.data][-1:]
    return_path = sent.sender
    assert return_path == VERP.for_queued(queue_id, 0, "nobody@example.org")
    dsn = fixture(
        "postfix-5.1.1-user-unknown.eml", **{"To: newsletter@example.com": f"To: {return_path}"}
    ).replace(b"\n", b"\r\n")  # as on the wire
    before = len(upstream.received)
    # A remote server: not in --allow-from, no AUTH.
    with smtplib.SMTP("127.0.0.1", relay.port) as c:
        c.ehlo("mx.example.net")
        assert c.mail("")[0] == 250
        assert c.rcpt(return_path)[0] == 250
        code, reply = c.data(dsn)
    assert code == 250, reply
    assert b"1 recipient reports applied" in reply
    assert recipient_state(relay.queue_path, queue_id) == "failed"
    assert suppressions(relay.queue_path) == [("nobody@example.org", "hard-bounce")]
    with sqlite3.connect(relay.queue_path) as conn:
        (count,) = conn.execute("SELECT count(*) FROM messages").fetchone()
    assert count == queue_id  # the bounce was not queued
    assert len(upstream.received) == before  # nor relayed
    relay.wait_for(r"bounce \(queue \d+:0\): hard 5\.1\.1, suppressed, recipient failed")
    assert 'twistmail_relay_bounces_total{kind="hard"} 1.0' in metrics(relay)


def metrics(relay: RelayProcess) -> str:
    line = relay.wait_for(r"HTTP \(API[^)]*\) listening on [^:]+:\d+")
    port = line.rsplit(":", 1)[1].strip()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def test_mail_to_a_return_path_that_is_no_report_is_dropped_and_counted(
    relay: RelayProcess,
) -> None:
    return_path = VERP.for_queued(1, 0, "nobody@example.org")
    before = suppressions(relay.queue_path)
    with smtplib.SMTP("127.0.0.1", relay.port) as c:
        c.ehlo("mx.example.net")
        assert c.mail("someone@example.net")[0] == 250
        assert c.rcpt(return_path)[0] == 250
        code, reply = c.data(b"Subject: out of office\r\n\r\nI am away.\r\n")
    assert (code, reply) == (250, b"2.0.0 Ok: not a delivery report, dropped")
    assert suppressions(relay.queue_path) == before
    text = metrics(relay)
    assert 'twistmail_relay_bounces_total{kind="not_report"} 1.0' in text


def test_a_forged_return_path_and_any_other_address_are_refused(relay: RelayProcess) -> None:
    genuine = VERP.for_queued(1, 0, "nobody@example.org")
    local, _, domain = genuine.partition("@")
    forged = [
        "bounces@bounces.example.com",
        f"{local[:-1]}{'a' if local[-1] != 'a' else 'b'}@{domain}",  # one character changed
        VERP.for_queued(1, 0, "x@example.org").replace("-q1-", "-q2-"),  # another message
        VerpSigner(VerpKeys((("k1", b"t" * 40),)), domain).for_queued(1, 0, "a@example.org"),
    ]
    with smtplib.SMTP("127.0.0.1", relay.port) as c:
        c.ehlo("mx.example.net")
        assert c.mail("")[0] == 250
        for address in forged:
            code, reply = c.rcpt(address)
            assert (code, reply) == (550, b"5.1.1 No such bounce address"), address
        # No open relay: any other recipient still needs AUTH.
        assert c.rcpt("someone@example.org") == (530, b"5.7.0 Authentication required")
        assert c.rcpt("postmaster@bounces.example.com")[0] == 550
        # With nothing accepted there is nothing to send.
        assert c.docmd("DATA")[0] == 554


def test_bounces_and_other_mail_never_share_a_message(relay: RelayProcess) -> None:
    with smtplib.SMTP("127.0.0.1", relay.port, source_address=(TRUSTED, 0)) as c:
        c.ehlo()
        assert c.mail("app@example.com")[0] == 250
        assert c.rcpt("someone@example.org")[0] == 250
        code, _ = c.rcpt(VERP.for_queued(1, 0, "nobody@example.org"))
        assert code == 452


def options(tmp_path: Path, *argv: str) -> Options:
    parsed = Options()
    parsed.parseOptions(
        ["--smtp", "smtp://127.0.0.1:2525", "--queue", f"sqlite:{tmp_path / 'q.db'}", *argv]
    )
    return parsed


def test_the_bounce_options_are_checked_at_start(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text(SECRET + "\n")
    config = options(
        tmp_path,
        "--bounce-domain",
        "Bounces.Example.com",
        "--secret-file",
        str(tmp_path / "secret"),
    ).config
    assert config.verp is not None
    assert config.verp.domain == "bounces.example.com"
    assert not config.verp_send
    assert options(tmp_path).config.verp is None  # off by default
    with pytest.raises(usage.UsageError, match="--bounce-domain needs --secret-file"):
        options(tmp_path, "--bounce-domain", "bounces.example.com")
    with pytest.raises(usage.UsageError, match="--verp needs --bounce-domain"):
        options(tmp_path, "--verp")
    (tmp_path / "bad").write_text("k1:short\n")
    with pytest.raises(usage.UsageError, match="line 1") as caught:
        options(
            tmp_path, "--bounce-domain", "b.example.com", "--secret-file", str(tmp_path / "bad")
        )
    assert "short" not in str(caught.value)


def test_a_complaint_to_a_return_path_suppresses_its_recipient_even_redacted(
    relay: RelayProcess, upstream: CueServer
) -> None:
    with smtplib.SMTP("127.0.0.1", relay.port, source_address=(TRUSTED, 0)) as c:
        c.ehlo()
        c.mail("news@example.com")
        c.rcpt("carol@example.org")
        code, reply = c.data(MESSAGE.replace(b"nobody@", b"carol@").replace(b"42@", b"43@"))
    assert code == 250, reply

    def delivered() -> list[Received]:
        return [m for m in upstream.received if b"<feb-news.43@example.com>" in m.data]

    wait_until(lambda: len(delivered()) == 1)
    (sent,) = delivered()
    # The feedback loop names nobody (RFC 5965 B.1): only the return path says who.
    arf = fixture(
        "rfc5965-b1-arf-minimal.eml", **{"To: <abuse@example.net>": f"To: <{sent.sender}>"}
    )
    with smtplib.SMTP("127.0.0.1", relay.port) as c:
        c.ehlo("fbl.example.net")
        assert c.mail("")[0] == 250
        assert c.rcpt(sent.sender)[0] == 250
        code, reply = c.data(arf.replace(b"\n", b"\r\n"))
    assert code == 250, reply
    assert ("carol@example.org", "complaint") in suppressions(relay.queue_path)


def test_a_message_to_two_goes_as_two_copies_and_a_bounce_fails_only_its_recipient(
    relay: RelayProcess, upstream: CueServer
) -> None:
    two = ["stays@example.org", "gone@example.org"]
    message = MESSAGE.replace(b"<feb-news.42@", b"<feb-news.two@").replace(
        b"To: nobody@example.org", b"To: " + ", ".join(two).encode()
    )
    with smtplib.SMTP("127.0.0.1", relay.port, source_address=(TRUSTED, 0)) as c:
        c.ehlo()
        c.mail("news@example.com")
        for rcpt in two:
            c.rcpt(rcpt)
        code, reply = c.data(message)
    assert code == 250, reply
    match = re.search(rb"queued as (\d+)", reply)
    assert match is not None
    queue_id = int(match.group(1))
    wait_until(lambda: len([m for m in upstream.received if b"<feb-news.two@" in m.data]) == 2)
    copies = {m.recipients[0]: m.sender for m in upstream.received if b"<feb-news.two@" in m.data}
    assert copies == {r: VERP.for_queued(queue_id, n, r) for n, r in enumerate(two)}

    dsn = fixture(
        "postfix-5.1.1-user-unknown.eml",
        **{"nobody@example.org": "gone@example.org", "To: newsletter@example.com": "To: x@y"},
    ).replace(b"\n", b"\r\n")
    with smtplib.SMTP("127.0.0.1", relay.port) as c:
        c.ehlo("mx.example.net")
        assert c.mail("")[0] == 250
        assert c.rcpt(copies["gone@example.org"])[0] == 250
        code, reply = c.data(dsn)
    assert code == 250, reply
    with sqlite3.connect(relay.queue_path) as conn:
        states = conn.execute(
            "SELECT address, state FROM recipients WHERE message = ? ORDER BY position",
            (queue_id,),
        ).fetchall()
    assert states == [("stays@example.org", "sent"), ("gone@example.org", "failed")]
    suppressed = [address for address, _ in suppressions(relay.queue_path)]
    assert "gone@example.org" in suppressed
    assert "stays@example.org" not in suppressed
