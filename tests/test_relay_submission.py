"""SMTP submission to the real ``twistd twistmail``, with smtplib (and raw sockets for what smtplib
will not send) as the client and aiosmtpd (CueServer) as the upstream on 127.0.0.1."""

from __future__ import annotations

import email
import re
import select
import smtplib
import socket
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from relay_process import RelayProcess
from servers import CueServer
from waiting import wait_until

MESSAGE = b"From: app@example.com\r\nTo: user@example.org\r\nSubject: hi\r\n\r\nHello.\r\n"
QUEUED = re.compile(rb"2\.0\.0 Ok: queued as (\d+)")


@pytest.fixture(scope="module")
def upstream() -> Iterator[CueServer]:
    with CueServer(pipelining=True, line_length_limit=70_000) as server:
        yield server


@pytest.fixture(scope="module")
def relay(upstream: CueServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    path = tmp_path_factory.mktemp("relay") / "queue.db"
    with RelayProcess(
        path, upstream.port, "--max-message-size", "64k", "--max-recipients", "3"
    ) as r:
        yield r


def delivered(upstream: CueServer, marker: bytes) -> list[bytes]:
    """The data of every message received upstream that contains ``marker``."""
    return [m.data for m in upstream.received if marker in m.data]


def client(relay: RelayProcess) -> smtplib.SMTP:
    smtp = smtplib.SMTP("127.0.0.1", relay.port, timeout=30)
    smtp.ehlo("app.test")
    return smtp


def raw(relay: RelayProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", relay.port), timeout=30)
    sock.recv(1000)  # the greeting
    return sock


def replies(sock: socket.socket, count: int) -> list[bytes]:
    """The next ``count`` complete replies (their last lines)."""
    data = b""
    while data.count(b"\r\n") < count or not _complete(data, count):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return [line for line in data.split(b"\r\n") if line[3:4] == b" "][:count]


def _complete(data: bytes, count: int) -> bool:
    return len([line for line in data.split(b"\r\n") if line[3:4] == b" "]) >= count


def test_a_message_is_queued_committed_delivered_and_logged(
    relay: RelayProcess, upstream: CueServer
) -> None:
    with client(relay) as smtp:
        body = MESSAGE.replace(b"Hello.", b"Hello 1.")
        smtp.mail("app@example.com")
        smtp.rcpt("user@example.org")
        code, reply = smtp.data(body)
    assert code == 250
    match = QUEUED.search(reply)
    assert match, reply
    queue_id = int(match.group(1))
    # The 250 came after the commit: the row is in the file for any reader.
    with sqlite3.connect(relay.queue_path) as db:
        assert db.execute("SELECT count(*) FROM messages WHERE id = ?", (queue_id,)).fetchone()[0]
    wait_until(lambda: bool(delivered(upstream, b"Hello 1.")))
    (data,) = delivered(upstream, b"Hello 1.")
    assert data.startswith(b"Received: from app.test ([127.0.0.1])\r\n\tby relay.test (twistmail)")
    message = email.message_from_bytes(data)
    assert message["Message-ID"].endswith("@relay.test>")  # added: it had none
    assert message["Date"]
    assert data.endswith(MESSAGE.replace(b"Hello.", b"Hello 1."))  # kept as received
    relay.wait_for(
        rf"queued {queue_id} from=<app@example.com> size=\d+ nrcpt=1 client=127\.0\.0\.1"
    )
    relay.wait_for(rf"delivery {queue_id} to=<user@example.org> .*status=sent reply=250")


def test_message_id_and_date_are_kept_when_present(
    relay: RelayProcess, upstream: CueServer
) -> None:
    own = b"Message-ID: <own-2@app.test>\r\nDate: Tue, 01 Dec 2026 10:00:00 +0000\r\n" + MESSAGE
    with client(relay) as smtp:
        smtp.sendmail("app@example.com", ["user@example.org"], own.replace(b"Hello.", b"Hi 2."))
    wait_until(lambda: bool(delivered(upstream, b"Hi 2.")))
    (data,) = delivered(upstream, b"Hi 2.")
    message = email.message_from_bytes(data)
    assert message.get_all("Message-ID") == ["<own-2@app.test>"]
    assert message.get_all("Date") == ["Tue, 01 Dec 2026 10:00:00 +0000"]


def test_extensions_offered(relay: RelayProcess) -> None:
    with client(relay) as smtp:
        for name in ("pipelining", "8bitmime", "smtputf8", "size"):
            assert smtp.has_extn(name), name
        assert smtp.esmtp_features["size"] == str(64 * 1024)
        assert not smtp.has_extn("auth")  # no users file


def test_pipelined_transactions_are_answered_in_order(
    relay: RelayProcess, upstream: CueServer
) -> None:
    sock = raw(relay)
    batch = b"EHLO app.test\r\n"
    for n in (1, 2):
        batch += (
            b"MAIL FROM:<app@example.com>\r\nRCPT TO:<user@example.org>\r\nDATA\r\n"
            + b"Subject: pipelined %d\r\n\r\nbody\r\n.\r\n" % n
        )
    sock.sendall(batch + b"QUIT\r\n")
    got = replies(sock, 10)
    sock.close()
    codes = [line[:3] for line in got]
    assert codes == [b"250", b"250", b"250", b"354", b"250", b"250", b"250", b"354", b"250", b"221"]
    first, second = int(QUEUED.search(got[4]).group(1)), int(QUEUED.search(got[8]).group(1))  # type: ignore[union-attr]
    assert second > first
    wait_until(lambda: len(delivered(upstream, b"Subject: pipelined")) == 2)


@pytest.mark.parametrize(
    "smuggled",
    [b"\n.\n", b"\r\n.\r"],
    ids=["lf-dot-lf", "crlf-dot-cr"],
)
def test_smtp_smuggling_is_refused_not_forwarded(
    relay: RelayProcess, upstream: CueServer, smuggled: bytes
) -> None:
    sock = raw(relay)
    marker = b"smuggled-" + smuggled.hex().encode()
    sock.sendall(
        b"EHLO app.test\r\nMAIL FROM:<app@example.com>\r\nRCPT TO:<user@example.org>\r\nDATA\r\n"
    )
    assert [r[:3] for r in replies(sock, 4)] == [b"250", b"250", b"250", b"354"]
    sock.sendall(
        b"Subject: outer\r\n\r\nouter body"
        + smuggled
        + b"MAIL FROM:<ceo@example.com>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n"
        + b"Subject: "
        + marker
        + b"\r\n\r\nforged\r\n.\r\n"
    )
    (reply,) = replies(sock, 1)
    assert reply.startswith(b"550 5.6.11"), reply
    sock.sendall(b"QUIT\r\n")
    sock.close()
    # A clean message afterwards goes through, and nothing of the refused one ever does.
    with client(relay) as smtp:
        smtp.sendmail(
            "app@example.com", ["user@example.org"], b"Subject: after " + marker + b"\r\n\r\nok\r\n"
        )
    wait_until(lambda: bool(delivered(upstream, b"after " + marker)))
    assert not delivered(upstream, b"Subject: " + marker)
    assert not [m for m in upstream.received if "victim@example.org" in m.recipients]


def test_size_limit_declared_and_enforced_when_the_client_lies(
    relay: RelayProcess, upstream: CueServer
) -> None:
    with client(relay) as smtp:
        code, reply = smtp.docmd(f"MAIL FROM:<app@example.com> SIZE={64 * 1024 + 1}")
        assert (code, reply[:5]) == (552, b"5.3.4")
        smtp.mail("app@example.com")  # no SIZE given: the bytes are counted
        smtp.rcpt("user@example.org")
        big = b"Subject: too big\r\n\r\n" + (b"x" * 999 + b"\r\n") * 70
        code, reply = smtp.data(big)
        assert (code, reply[:5]) == (552, b"5.3.4")
        smtp.mail("app@example.com")  # the session goes on
        smtp.rcpt("user@example.org")
        assert smtp.data(b"Subject: small after big\r\n\r\nok\r\n")[0] == 250
    wait_until(lambda: bool(delivered(upstream, b"small after big")))
    assert not delivered(upstream, b"Subject: too big")


def test_recipient_limit(relay: RelayProcess, upstream: CueServer) -> None:
    with client(relay) as smtp:
        smtp.mail("app@example.com")
        for n in range(3):
            assert smtp.rcpt(f"r{n}@example.org")[0] == 250
        code, reply = smtp.rcpt("r3@example.org")
        assert (code, reply[:5]) == (452, b"4.5.3")
        assert smtp.data(b"Subject: three recipients\r\n\r\nx\r\n")[0] == 250
    wait_until(lambda: bool(delivered(upstream, b"three recipients")))
    (message,) = [m for m in upstream.received if b"three recipients" in m.data]
    assert sorted(message.recipients) == ["r0@example.org", "r1@example.org", "r2@example.org"]


def test_addresses_are_checked_by_the_librarys_parser(relay: RelayProcess) -> None:
    with client(relay) as smtp:
        code, reply = smtp.docmd("MAIL FROM:app@example.com")  # no angle brackets
        assert code == 501
        code, reply = smtp.docmd("MAIL FROM:<app@@example.com>")
        assert code == 553
        assert b"app@@example.com" in reply
        assert smtp.docmd("MAIL FROM:<>")[0] == 250  # the null sender is a sender
        code, reply = smtp.docmd("RCPT TO:<no-at-sign>")
        assert code == 553
        assert b"missing '@'" in reply
        code, reply = smtp.docmd("RCPT TO:<>")
        assert code == 553
        assert b"empty" in reply


def test_long_lines_up_to_64_kb_pass_and_longer_ones_close(
    relay: RelayProcess, upstream: CueServer
) -> None:
    line = b"y" * 60_000
    with client(relay) as smtp:
        smtp.sendmail(
            "app@example.com", ["user@example.org"], b"Subject: long\r\n\r\n" + line + b"\r\n"
        )
    wait_until(lambda: bool(delivered(upstream, line)))
    sock = raw(relay)
    sock.sendall(b"EHLO a\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
    replies(sock, 4)
    sock.sendall(b"z" * 70_000 + b"\r\n")
    (reply,) = replies(sock, 1)
    assert reply.startswith(b"500 5.5.6")
    assert sock.recv(100) == b""  # closed
    sock.close()


def test_a_connection_speaking_http_is_dropped(relay: RelayProcess) -> None:
    for first in (b"GET / HTTP/1.1\r\n", b"POST /x HTTP/1.1\r\n", b"Host: relay\r\n"):
        sock = raw(relay)
        sock.sendall(first + b"Host: relay\r\n\r\n")
        try:
            answer = sock.recv(1000)
        except ConnectionResetError:
            answer = b""
        assert answer == b""  # dropped, nothing said
        sock.close()


def _closed_and_freed(relay: RelayProcess, socks: list[socket.socket]) -> None:
    """Close ``socks``, then wait until the relay has freed their places (the next test's
    client must not meet this one's connection limit)."""
    for sock in socks:
        sock.close()

    def greeted() -> bool:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=30) as probe:
            greeting = probe.recv(1000)
            probe.sendall(b"QUIT\r\n")
            return greeting.startswith(b"220")

    wait_until(greeted)


def test_more_than_20_sessions_from_one_address_get_421(relay: RelayProcess) -> None:
    open_ = [raw(relay) for _ in range(20)]
    try:
        extra = socket.create_connection(("127.0.0.1", relay.port), timeout=30)
        greeting = extra.recv(1000)
        assert greeting.startswith(b"421 4.7.0"), greeting
        extra.close()
    finally:
        _closed_and_freed(relay, open_)


def test_a_session_that_quit_frees_its_place_at_once(relay: RelayProcess) -> None:
    open_ = [raw(relay) for _ in range(20)]
    try:
        for _ in range(30):  # a client reconnecting as soon as it reads 221 is let in
            quitting = open_.pop()
            quitting.sendall(b"QUIT\r\n")
            assert quitting.recv(1000).startswith(b"221")
            again = socket.create_connection(("127.0.0.1", relay.port), timeout=30)
            open_.append(again)
            assert again.recv(1000).startswith(b"220")
            quitting.close()
    finally:
        _closed_and_freed(relay, open_)


def test_smtputf8_addresses(relay: RelayProcess, upstream: CueServer) -> None:
    with client(relay) as smtp:
        assert smtp.docmd("MAIL FROM:<app@example.com> SMTPUTF8")[0] == 250
        smtp.send("RCPT TO:<δοκιμή@παράδειγμα.δοκιμή>\r\n".encode())
        assert smtp.getreply()[0] == 250
        assert smtp.data(b"Subject: utf8 rcpt\r\n\r\nx\r\n")[0] == 250
    wait_until(lambda: bool(delivered(upstream, b"utf8 rcpt")))


def test_relaying_is_refused_to_clients_outside_allow_from(
    upstream: CueServer, tmp_path: Path
) -> None:
    with RelayProcess(tmp_path / "q.db", upstream.port, "--allow-from", "192.0.2.0/24") as relay:
        with client(relay) as smtp:
            code, reply = smtp.docmd("MAIL FROM:<app@example.com>")
        assert (code, reply[:5]) == (530, b"5.7.0")


def test_idle_and_data_timeouts_close_with_421(upstream: CueServer, tmp_path: Path) -> None:
    options = ("--idle-timeout", "1", "--data-timeout", "2")
    with RelayProcess(tmp_path / "q.db", upstream.port, *options) as relay:
        sock = raw(relay)
        (reply,) = replies(sock, 1)  # says nothing: the idle timeout
        assert reply.startswith(b"421 4.4.2")
        sock.close()
        sock = raw(relay)
        sock.sendall(b"EHLO a\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
        replies(sock, 4)
        started = time.monotonic()
        # A line every half second: never idle, but the DATA takes too long.
        while not select.select([sock], [], [], 0.5)[0]:
            sock.sendall(b"slow line\r\n")
        data = sock.recv(1000)
        assert time.monotonic() - started > 1.5
        assert b"421 4.4.2" in data
        sock.close()


def test_a_commit_that_fails_is_answered_4xx_and_leaves_nothing(
    upstream: CueServer, tmp_path: Path
) -> None:
    path = tmp_path / "q.db"
    with RelayProcess(path, upstream.port) as relay:
        with client(relay) as smtp:
            assert (
                smtp.sendmail("app@example.com", ["u@example.org"], b"Subject: one\r\n\r\n1\r\n")
                == {}
            )
        wait_until(lambda: bool(delivered(upstream, b"Subject: one")))
        # Another process holds the file's write lock past the queue's busy timeout (10 s).
        blocker = sqlite3.connect(
            path, isolation_level=None, timeout=10
        )  # waits out a write in progress
        blocker.execute("BEGIN IMMEDIATE")
        try:
            with client(relay) as smtp:
                smtp.mail("app@example.com")
                smtp.rcpt("u@example.org")
                code, reply = smtp.data(b"Subject: two\r\n\r\n2\r\n")
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert code == 451, reply
        with sqlite3.connect(path) as db:
            assert db.execute("SELECT count(*) FROM messages").fetchone()[0] == 1
            assert db.execute("SELECT count(*) FROM recipients").fetchone()[0] == 1
        with client(relay) as smtp:  # the queue works again
            assert (
                smtp.sendmail("app@example.com", ["u@example.org"], b"Subject: three\r\n\r\n3\r\n")
                == {}
            )
        wait_until(lambda: bool(delivered(upstream, b"Subject: three")))
        assert not delivered(upstream, b"Subject: two")
