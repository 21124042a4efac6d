"""Mailer end to end over 127.0.0.1 against aiosmtpd (CueServer) and Twisted's ESMTP server."""

from __future__ import annotations

import select
import socket
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from servers import CueServer
from twisted.internet import defer
from waiting import until

from twistmail.errors import (
    AuthenticationError,
    ExtensionRequiredError,
    PermanentError,
    SMTPTimeoutError,
    TLSError,
)
from twistmail.mailer import Mailer
from twistmail.message import envelope_from_message, unstuff
from twistmail.testing import CaptureServer

Cue = Callable[..., CueServer]


def sample_message(**headers: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "Sender <sender@example.com>"
    msg["To"] = "one@example.com, two@example.com"
    msg["Subject"] = "Grüße"
    # Given, so that rendering the message again (for the expected bytes) is byte-identical.
    msg["Date"] = "Mon, 02 Nov 2026 10:00:00 +0000"
    msg["Message-ID"] = "<sample@example.com>"
    for name, value in headers.items():
        msg[name.replace("_", "-")] = value
    msg.set_content("Hello\n.a line with a leading dot\nZürich ☃\n")
    return msg


def mailer(port: int, scheme: str = "smtp", host: str = "127.0.0.1", **kw: Any) -> Mailer:
    kw.setdefault("retry_delay", 0.05)
    kw.setdefault("timeout", 5)
    return Mailer(f"{scheme}://{host}:{port}", **kw)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("pipelining", [True, False])
async def test_exact_bytes_and_bcc_stripped(cue_server: Cue, pipelining: bool) -> None:
    server = cue_server(pipelining=pipelining)
    m = mailer(server.port)
    msg = sample_message(Bcc="hidden@example.com")
    result = await m.send(msg)
    await m.close()
    assert result.ok
    assert [r.recipient for r in result.recipients] == [
        "one@example.com",
        "two@example.com",
        "hidden@example.com",
    ]
    (got,) = server.received
    assert got.sender == "sender@example.com"
    assert got.recipients == ["one@example.com", "two@example.com", "hidden@example.com"]
    expected = unstuff(envelope_from_message(msg).payload)
    assert got.data == expected
    assert b"\r\r\n" not in got.data
    assert b"\n.a line with a leading dot\r\n" in got.data
    assert b"Bcc" not in got.data
    assert b"hidden" not in got.data
    assert "BODY=8BITMIME" in got.mail_options
    assert msg["Bcc"] == "hidden@example.com"  # the caller's message is untouched


@pytest_twisted.ensureDeferred
async def test_preformatted_crlf_bytes_sent_unchanged(cue_server: Cue) -> None:
    server = cue_server(pipelining=True)
    data = b"Subject: raw\r\nX-Dots: yes\r\n\r\n.\r\n..\r\nend\r\n"
    m = mailer(server.port)
    await m.send(data, sender="a@example.com", recipients=["b@example.com"])
    await m.close()
    assert server.received[0].data == data


@pytest_twisted.ensureDeferred
async def test_connection_reused_across_messages(cue_server: Cue) -> None:
    server = cue_server(pipelining=True)
    m = mailer(server.port, concurrency=3)
    report = await m.send_many(
        [
            ("a@example.com", [f"r{i}@example.com"], b"Subject: %d\r\n\r\nx\r\n" % i)
            for i in range(40)
        ]
    )
    await m.close()
    assert (report.messages, report.sent, report.failed) == (40, 40, 0)
    assert len(server.received) == 40
    assert server.connections <= 3
    assert sorted(r.recipients[0] for r in server.received) == sorted(
        f"r{i}@example.com" for i in range(40)
    )
    assert "RSET" not in server.commands  # no RSET after good transactions
    assert server.commands.count("QUIT") == server.connections  # close() says goodbye


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("pipelining", [True, False])
async def test_mixed_replies_only_4xx_recipients_retried(cue_server: Cue, pipelining: bool) -> None:
    server = cue_server(
        pipelining=pipelining,
        rcpt_replies_once={"busy": "451 4.2.1 mailbox busy"},
        rcpt_replies={"gone": "550 5.1.1 no such user"},
    )
    m = mailer(server.port)
    msg = sample_message()
    del msg["To"]
    msg["To"] = "ok@example.com, busy@example.com, gone@example.com"
    result = await m.send(msg)
    await m.close()
    outcome = {r.recipient: (r.status, r.code, r.enhanced, r.attempts) for r in result.recipients}
    assert outcome == {
        "ok@example.com": ("sent", 250, None, 1),
        "busy@example.com": ("sent", 250, None, 2),
        "gone@example.com": ("failed", 550, "5.1.1", 1),
    }
    assert result.attempts == 2
    assert [r.recipients for r in server.received] == [["ok@example.com"], ["busy@example.com"]]


@pytest_twisted.ensureDeferred
async def test_permanent_rejection_of_all_recipients_raises_with_result(cue_server: Cue) -> None:
    server = cue_server(rcpt_replies={"gone": "550 5.1.1 no such user"})
    m = mailer(server.port)
    with pytest.raises(PermanentError) as info:
        await m.send(b"Subject: x\r\n\r\nx\r\n", sender="a@example.com", recipients=["gone@x.org"])
    await m.close()
    assert info.value.code == 550
    assert info.value.recipient == "gone@x.org"
    assert info.value.result.attempts == 1  # type: ignore[attr-defined]
    assert server.received == []


@pytest_twisted.ensureDeferred
async def test_drop_after_data_is_retried_not_reported_sent(cue_server: Cue) -> None:
    server = cue_server(pipelining=True, drop_after_data_count=1)
    m = mailer(server.port)
    result = await m.send(
        b"Subject: d\r\n\r\nx\r\n", sender="a@example.com", recipients=["b@x.org"]
    )
    await m.close()
    assert result.ok
    assert result.attempts == 2
    assert len(server.dropped) == 1
    assert len(server.received) == 1
    assert server.connections == 2


@pytest_twisted.ensureDeferred
async def test_stalled_server_times_out_and_gives_up(cue_server: Cue) -> None:
    server = cue_server(stall_on="DOT")
    m = mailer(server.port, timeout=0.3, max_attempts=2, retry_delay=0.01)
    # The configured timeout ended it (the message names it), not a default or a hang.
    with pytest.raises(SMTPTimeoutError, match=r"no reply to the end of data within 0\.3s") as info:
        await m.send(b"Subject: s\r\n\r\nx\r\n", sender="a@example.com", recipients=["b@x.org"])
    await m.close()
    assert isinstance(info.value, TimeoutError)
    assert info.value.result.attempts == 2  # type: ignore[attr-defined]


@pytest_twisted.ensureDeferred
async def test_421_after_k_messages_connection_replaced(cue_server: Cue) -> None:
    server = cue_server(close_421_after=2, pipelining=True)
    m = mailer(server.port, concurrency=1)
    report = await m.send_many(
        ("a@example.com", [f"r{i}@x.org"], b"Subject: %d\r\n\r\nx\r\n" % i) for i in range(7)
    )
    await m.close()
    assert (report.sent, report.failed) == (7, 0)
    assert sorted(r.recipients[0] for r in server.received) == sorted(
        f"r{i}@x.org" for i in range(7)
    )
    assert server.connections >= 4


@pytest_twisted.ensureDeferred
async def test_starttls_verified_with_private_ca(
    cue_server: Cue, server_ssl_context: Any, ca_file: Path
) -> None:
    server = cue_server(starttls_context=server_ssl_context, require_starttls=True)
    m = mailer(server.port, scheme="smtp+tls", host="localhost", ca_file=ca_file)
    result = await m.send(
        b"Subject: t\r\n\r\nx\r\n", sender="a@example.com", recipients=["b@x.org"]
    )
    proto = m.pool.acquire_now()
    assert proto is not None
    assert proto._socket is None  # after STARTTLS every write goes through TLS
    m.pool.release(proto)
    await m.close()
    assert result.ok
    assert "STARTTLS" in server.commands
    assert len(server.received) == 1


@pytest_twisted.ensureDeferred
async def test_starttls_untrusted_certificate_refused(
    cue_server: Cue, server_ssl_context: Any
) -> None:
    server = cue_server(starttls_context=server_ssl_context, require_starttls=True)
    m = mailer(server.port, scheme="smtp+tls", host="localhost", max_attempts=1)
    with pytest.raises(TLSError) as info:
        await m.send(b"Subject: t\r\n\r\nx\r\n", sender="a@example.com", recipients=["b@x.org"])
    await m.close()
    assert "localhost" in str(info.value)
    assert server.received == []


@pytest_twisted.ensureDeferred
async def test_starttls_required_but_not_offered(cue_server: Cue) -> None:
    server = cue_server()
    m = mailer(server.port, scheme="smtp+tls", host="localhost", insecure=True)
    with pytest.raises(TLSError, match="does not offer"):
        await m.send(b"Subject: t\r\n\r\nx\r\n", sender="a@example.com", recipients=["b@x.org"])
    await m.close()
    assert server.received == []


@pytest_twisted.ensureDeferred
async def test_implicit_tls(cue_server: Cue, server_ssl_context: Any, ca_file: Path) -> None:
    server = cue_server(implicit_tls_context=server_ssl_context)
    m = mailer(server.port, scheme="smtp+ssl", host="localhost", ca_file=ca_file)
    result = await m.send(
        b"Subject: t\r\n\r\nx\r\n", sender="a@example.com", recipients=["b@x.org"]
    )
    await m.close()
    assert result.ok
    assert server.received[0].data == b"Subject: t\r\n\r\nx\r\n"


@pytest_twisted.ensureDeferred
async def test_auth_with_password_from_environment(
    cue_server: Cue, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = cue_server(auth={"alice": "correct horse"})
    monkeypatch.setenv("TWISTMAIL_SMTP_PASSWORD", "correct horse")
    m = Mailer(f"smtp://alice@127.0.0.1:{server.port}")
    assert "correct horse" not in repr(m) + repr(m.server)
    result = await m.send(
        b"Subject: a\r\n\r\nx\r\n", sender="a@example.com", recipients=["b@x.org"]
    )
    await m.close()
    assert result.ok
    assert any(c.startswith("AUTH") for c in server.commands)


@pytest_twisted.ensureDeferred
async def test_auth_refused_error_has_no_secret(cue_server: Cue) -> None:
    server = cue_server(auth={"alice": "correct horse"})
    m = Mailer(f"smtp://alice@127.0.0.1:{server.port}", password="wrong battery", max_attempts=3)
    with pytest.raises(AuthenticationError) as info:
        await m.send(b"Subject: a\r\n\r\nx\r\n", sender="a@example.com", recipients=["b@x.org"])
    await m.close()
    text = str(info.value) + repr(info.value) + repr(info.value.result)  # type: ignore[attr-defined]
    assert "wrong battery" not in text
    assert "d3JvbmcgYmF0dGVyeQ" not in text  # base64 of the secret
    assert info.value.code == 535
    # Refused at login: the message never reached the server, so no attempt is counted.
    assert info.value.result.attempts == 0  # type: ignore[attr-defined]
    assert server.received == []


@pytest_twisted.ensureDeferred
async def test_smtputf8_address(cue_server: Cue) -> None:
    server = cue_server(smtputf8=True, pipelining=True)
    m = mailer(server.port)
    msg = sample_message()
    del msg["To"]
    msg["To"] = "Jörg <jörg@bücher.example>"
    result = await m.send(msg)
    await m.close()
    assert result.ok
    got = server.received[0]
    assert got.recipients == ["jörg@bücher.example"]
    assert "SMTPUTF8" in got.mail_options
    assert "jörg@bücher.example".encode() in got.data


@pytest_twisted.ensureDeferred
async def test_smtputf8_address_refused_clearly_without_extension(cue_server: Cue) -> None:
    server = cue_server(smtputf8=False)
    m = mailer(server.port)
    with pytest.raises(ExtensionRequiredError, match="SMTPUTF8"):
        await m.send(b"Subject: u\r\n\r\nx\r\n", sender="a@example.com", recipients=["jörg@x.org"])
    await m.close()
    assert server.received == []


@pytest_twisted.ensureDeferred
async def test_twisted_server_starttls_auth_and_replies(
    capture_server: Callable[..., CaptureServer], twisted_server_tls: Any, ca_file: Path
) -> None:
    server = capture_server(
        credentials={"bob": "hunter2"},
        tls=twisted_server_tls,
        rcpt_replies={"nobody": (550, "5.1.1 no such user")},
    )
    m = Mailer(
        f"smtp+tls://bob@localhost:{server.port}", password="hunter2", ca_file=ca_file, timeout=5
    )
    msg = sample_message()
    del msg["To"]
    msg["To"] = "yes@example.com, nobody@example.com"
    result = await m.send(msg)
    await m.close()
    assert [(r.recipient, r.status) for r in result.recipients] == [
        ("yes@example.com", "sent"),
        ("nobody@example.com", "failed"),
    ]
    (got,) = server.messages
    assert got.recipients == [b"yes@example.com"]
    assert got.data == unstuff(envelope_from_message(msg).payload)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
async def test_auth_mechanism_against_twisted_server(
    capture_server: Callable[..., CaptureServer], mechanism: str
) -> None:
    server = capture_server(credentials={"bob": "hunter2"}, auth_mechanisms=[mechanism])
    m = Mailer(f"smtp://bob@127.0.0.1:{server.port}", password="hunter2", max_attempts=1)
    result = await m.send(
        b"Subject: a\r\n\r\nx\r\n", sender="a@example.com", recipients=["b@x.org"]
    )
    await m.close()
    assert result.ok
    (got,) = server.messages
    assert got.data == b"Subject: a\r\n\r\nx\r\n"


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
async def test_auth_mechanism_wrong_password_is_authentication_error(
    capture_server: Callable[..., CaptureServer], mechanism: str
) -> None:
    server = capture_server(credentials={"bob": "hunter2"}, auth_mechanisms=[mechanism])
    m = Mailer(f"smtp://bob@127.0.0.1:{server.port}", password="wrong-secret", max_attempts=1)
    with pytest.raises(AuthenticationError) as info:
        await m.send(b"Subject: a\r\n\r\nx\r\n", sender="a@example.com", recipients=["b@x.org"])
    await m.close()
    assert "wrong-secret" not in str(info.value)
    assert server.messages == []


@pytest_twisted.ensureDeferred
async def test_tcp_nodelay_on_real_connection(capture_server: Callable[..., CaptureServer]) -> None:
    server = capture_server()
    m = mailer(server.port)
    proto = await m.pool.acquire()
    sock = proto.transport.getHandle()  # type: ignore[union-attr]
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    m.pool.release(proto)
    await m.close()


@pytest_twisted.ensureDeferred
async def test_messages_larger_than_the_socket_buffer_arrive_whole_and_in_order(
    cue_server: Cue,
) -> None:
    # A plain TCP connection sends straight to its socket while the transport holds nothing;
    # what the kernel does not take at once must go out through the transport, ahead of
    # anything written later on the same connection.
    server = cue_server(pipelining=True)
    m = mailer(server.port, concurrency=1, timeout=30)
    proto = await m.pool.acquire()
    assert proto._socket is not None  # the direct path is in use on plain TCP
    m.pool.release(proto)
    bodies = [
        b"Subject: big %d\r\n\r\n" % i + (b"%d" % i * 70 + b"\r\n") * 40_000 for i in range(3)
    ]
    small = [b"Subject: small %d\r\n\r\nx\r\n" % i for i in range(3)]
    items = [("a@example.com", [f"r{i}@x.org"], data) for i, data in enumerate(bodies + small)]
    report = await m.send_many(items)
    await m.close()
    assert (report.sent, report.failed) == (6, 0)
    assert server.connections == 1
    assert [r.data for r in server.received] == bodies + small


@pytest_twisted.ensureDeferred
async def test_streaming_generator_keeps_messages_alive_bounded(
    capture_server: Callable[..., CaptureServer],
) -> None:
    server = capture_server()
    server.messages = _Counter()  # type: ignore[assignment]  # count without keeping 10,000 copies
    concurrency = 8
    produced = [0]
    finished = [0]
    peak = [0]

    def messages() -> Iterator[tuple[str, list[str], bytes]]:
        for i in range(10_000):
            produced[0] += 1
            peak[0] = max(peak[0], produced[0] - finished[0])
            yield ("a@example.com", [f"r{i}@x.org"], b"Subject: %d\r\n\r\nbody\r\n" % i)

    def on_result(index: int, result: object) -> None:
        finished[0] += 1

    m = mailer(server.port, concurrency=concurrency)
    report = await m.send_many(messages(), on_result=on_result)
    await m.close()
    assert (report.messages, report.sent) == (10_000, 10_000)
    assert server.messages.count == 10_000  # type: ignore[attr-defined]
    assert peak[0] <= concurrency * m.pool.depth + 2, peak[0]


class _Counter(list):  # type: ignore[type-arg]
    count = 0

    def append(self, item: object) -> None:
        self.count += 1


@pytest_twisted.ensureDeferred
async def test_cancel_before_connect() -> None:
    # A listening socket that never accepts: the TCP handshake completes in the kernel
    # backlog but nobody greets, so cancel while waiting for the connection/greeting.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    try:
        m = mailer(listener.getsockname()[1], timeout=30)
        d = m.send(b"Subject: c\r\n\r\nx\r\n", sender="a@example.com", recipients=["b@x.org"])
        # Connected in the kernel (the listener is readable), never greeted.
        await until(lambda: select.select([listener], [], [], 0)[0], "the TCP connection")
        d.cancel()
        with pytest.raises(defer.CancelledError):
            await d
        await m.close()
        assert m.pool.open_connections == 0
    finally:
        listener.close()


@pytest_twisted.ensureDeferred
async def test_cancel_after_connect_mid_transaction(cue_server: Cue) -> None:
    server = cue_server(stall_on="DOT")
    m = mailer(server.port, timeout=30)
    d = m.send(b"Subject: c\r\n\r\nx\r\n", sender="a@example.com", recipients=["b@x.org"])
    await until(lambda: server.stalled, "the message reached the final dot")
    assert m.pool.open_connections == 1
    d.cancel()
    with pytest.raises(defer.CancelledError):
        await d
    await m.close()
    assert m.pool.open_connections == 0
    assert server.received == []


@pytest_twisted.ensureDeferred
async def test_cancel_send_many_with_transactions_in_flight(cue_server: Cue) -> None:
    # The bulk path hands transactions to connections without a Deferred each: cancelling the
    # run must still abort what is half-sent and stop taking messages.
    server = cue_server(stall_on="DOT", pipelining=True)
    m = mailer(server.port, concurrency=2, timeout=30)
    # Both connections open beforehand, so every message takes the bulk path.
    warm = [await m.pool.acquire(), await m.pool.acquire()]
    for proto in warm:
        m.pool.release(proto)
    taken: list[int] = []

    def messages() -> Iterator[tuple[str, list[str], bytes]]:
        for i in range(10_000):
            taken.append(i)
            yield ("a@example.com", [f"r{i}@x.org"], b"Subject: %d\r\n\r\nx\r\n" % i)

    d = m.send_many(messages())
    await until(lambda: len(server.stalled) >= 2, "both connections at a final dot")
    assert m.pool.open_connections == 2
    d.cancel()
    with pytest.raises(defer.CancelledError):
        await d
    assert len(taken) <= 2 * m.pool.depth
    # The half-sent transactions' connections are dropped, not waited on (their reply timeout
    # is ten minutes, far beyond this wait).
    await until(lambda: m.pool.open_connections == 0, "the connections dropped")
    await m.close()
    assert server.received == []


@pytest_twisted.ensureDeferred
async def test_an_on_result_error_fails_send_many_and_stops_it(
    capture_server: Callable[..., CaptureServer],
) -> None:
    server = capture_server()
    m = mailer(server.port, concurrency=2)
    taken: list[int] = []

    def messages() -> Iterator[tuple[str, list[str], bytes]]:
        for i in range(1_000):
            taken.append(i)
            yield ("a@example.com", [f"r{i}@x.org"], b"Subject: %d\r\n\r\nx\r\n" % i)

    def on_result(index: int, result: object) -> None:
        if index == 10:
            raise RuntimeError("the caller's callback broke")

    with pytest.raises(RuntimeError, match="callback broke"):
        await m.send_many(messages(), on_result=on_result)
    assert len(taken) <= 11 + 2 * m.pool.depth  # it stopped soon after
    await m.close()


@pytest_twisted.ensureDeferred
async def test_insecure_skips_verification_and_logs_a_warning(
    cue_server: Cue, server_ssl_context: Any
) -> None:
    from twisted.logger import LogLevel, globalLogPublisher

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        server = cue_server(starttls_context=server_ssl_context, require_starttls=True)
        m = mailer(server.port, scheme="smtp+tls", host="localhost", insecure=True)
    finally:
        globalLogPublisher.removeObserver(events.append)
    result = await m.send(
        b"Subject: t\r\n\r\nx\r\n", sender="a@example.com", recipients=["b@x.org"]
    )
    await m.close()
    assert result.ok  # the test CA is not trusted, yet insecure=True sends
    warnings = [e for e in events if e.get("log_level") == LogLevel.warn]
    assert any("verification is disabled" in e["log_format"] for e in warnings)


@pytest_twisted.ensureDeferred
async def test_per_domain_cap_limits_concurrent_transactions(
    capture_server: Callable[..., CaptureServer],
) -> None:
    server = capture_server()
    m = mailer(server.port, concurrency=8, per_domain=2)
    peak = {"slow.example": 0, "fast.example": 0}
    assert m._domains is not None
    limiter = m._domains

    def watch(index: int, result: object) -> None:
        for domain in peak:
            peak[domain] = max(peak[domain], limiter.active(domain))

    original = limiter.acquire

    def acquire(domain: str) -> defer.Deferred[None]:
        d = original(domain)

        def note(_: None) -> None:
            peak[domain] = max(peak[domain], limiter.active(domain))

        return d.addCallback(note)

    limiter.acquire = acquire  # type: ignore[method-assign]
    messages = [
        (
            "a@example.com",
            [f"u{i}@{'slow' if i % 2 else 'fast'}.example"],
            b"Subject: x\r\n\r\ny\r\n",
        )
        for i in range(200)
    ]
    report = await m.send_many(iter(messages), on_result=watch)
    await m.close()
    assert report.sent == 200
    assert len(server.messages) == 200
    assert peak == {"slow.example": 2, "fast.example": 2}


@pytest_twisted.ensureDeferred
async def test_connect_timeout_when_the_server_never_completes_the_handshake() -> None:
    # A listener whose accept backlog is full: the kernel drops further SYNs, so connect hangs.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    try:
        m = mailer(port, connect_timeout=0.5, max_attempts=1)
        with pytest.raises(SMTPTimeoutError, match=r"could not connect within 0\.5s") as info:
            await m.send(b"Subject: c\r\n\r\nx\r\n", sender="a@example.com", recipients=["b@x.org"])
        assert isinstance(info.value, TimeoutError)
        await m.close()
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("pipelining", [True, False])
async def test_refusals_inside_pipelined_groups_settle_each_message(
    cue_server: Cue, pipelining: bool
) -> None:
    # One connection: refusals in the middle of a group must not disturb the next message.
    server = cue_server(
        pipelining=pipelining,
        rcpt_replies={"gone": "550 5.1.1 no such user", "later": "451 4.2.0 try later"},
    )
    m = mailer(server.port, concurrency=1, max_attempts=1)
    plan = [
        ["ok1@x.org"],
        ["gone@x.org"],
        ["ok3@x.org", "gone@x.org"],
        ["later@x.org"],
        ["ok5@x.org"],
    ]
    messages = [
        ("a@example.com", rcpts, b"Subject: %d\r\n\r\n.dot %d\r\n" % (i, i))
        for i, rcpts in enumerate(plan)
    ]
    results: dict[int, Any] = {}
    report = await m.send_many(messages, on_result=results.__setitem__)
    await m.close()
    statuses = {
        i: [(o.recipient, o.status, o.code) for o in results[i].recipients] for i in results
    }
    assert statuses == {
        0: [("ok1@x.org", "sent", 250)],
        1: [("gone@x.org", "failed", 550)],
        2: [("ok3@x.org", "sent", 250), ("gone@x.org", "failed", 550)],
        # max_attempts=1: the caller owns retries, so a 4xx leaves the recipient deferred.
        3: [("later@x.org", "deferred", 451)],
        4: [("ok5@x.org", "sent", 250)],
    }
    assert report.sent == 2
    assert [(r.recipients, r.data) for r in server.received] == [
        (["ok1@x.org"], b"Subject: 0\r\n\r\n.dot 0\r\n"),
        (["ok3@x.org"], b"Subject: 2\r\n\r\n.dot 2\r\n"),
        (["ok5@x.org"], b"Subject: 4\r\n\r\n.dot 4\r\n"),
    ]
    assert server.connections == 1


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("pipelining", [True, False])
async def test_mail_refused_in_every_group_keeps_the_connection(
    cue_server: Cue, pipelining: bool
) -> None:
    server = cue_server(pipelining=pipelining, mail_reply="550 5.7.1 sender refused")
    m = mailer(server.port, concurrency=1)
    results: dict[int, Any] = {}
    messages = [("a@example.com", [f"r{i}@x.org"], b"Subject: x\r\n\r\nx\r\n") for i in range(3)]
    report = await m.send_many(messages, on_result=results.__setitem__)
    await m.close()
    assert report.sent == 0
    assert [[(o.status, o.code, o.enhanced) for o in results[i].recipients] for i in range(3)] == [
        [("failed", 550, "5.7.1")]
    ] * 3
    assert server.received == []
    assert server.connections == 1


@pytest_twisted.ensureDeferred
async def test_4xx_after_the_dot_is_never_reported_sent(cue_server: Cue) -> None:
    server = cue_server(pipelining=True, data_reply="451 4.3.0 queue full")
    m = mailer(server.port, concurrency=1, max_attempts=2, retry_delay=0.01)
    results: dict[int, Any] = {}
    messages = [("a@example.com", [f"r{i}@x.org"], b"Subject: x\r\n\r\nx\r\n") for i in range(3)]
    report = await m.send_many(messages, on_result=results.__setitem__)
    await m.close()
    assert report.sent == 0
    for i in range(3):
        (outcome,) = results[i].recipients
        assert (outcome.status, outcome.code, outcome.attempts) == ("failed", 451, 2)
    assert server.connections == 1
