"""The test servers do what they claim, checked with the stdlib smtplib as an independent client.

smtplib blocks, so against the Twisted CaptureServer it runs in a thread (deferToThread) while
the reactor serves; against the aiosmtpd CueServer (its own thread) it can run inline.
"""

from __future__ import annotations

import mailbox
import smtplib
import ssl
from collections.abc import Callable, Generator
from typing import Any

import pytest
import pytest_twisted
from servers import STALL_STEPS, CueServer
from twisted.internet import defer, threads

from twistmail.testing import CapturedMessage, CaptureServer

HOST = "127.0.0.1"
SHORT_TIMEOUT = 0.4

# Headers, a line that starts with "." (stuffed on the wire), a lone "." line, "..",
# 8-bit UTF-8 text, a bare CR inside a line and trailing whitespace: all must come back as sent.
TRICKY = (
    b"From: a@example.com\r\n"
    b"To: b@example.com\r\n"
    b"Subject: tricky\r\n"
    b"\r\n"
    b".starts with a dot\r\n"
    b".\r\n"
    b"..\r\n"
    b"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x93\xa7\r\n"
    b"bare\rcr and trailing space  \r\n"
    b"last line\r\n"
)

CaptureFactory = Callable[..., CaptureServer]
CueFactory = Callable[..., CueServer]


def in_thread(function: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
    return threads.deferToThread(function, *args)


def ehlo_features(port: int) -> dict[str, str]:
    with smtplib.SMTP(HOST, port, timeout=5) as client:
        client.ehlo()
        return dict(client.esmtp_features)


# CaptureServer (Twisted) -------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_capture_server_keeps_exact_bytes_and_envelope(
    capture_server: CaptureFactory,
) -> Generator[defer.Deferred[Any], Any, None]:
    seen: list[CapturedMessage] = []
    server = capture_server(on_message=seen.append)

    def send() -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP(HOST, server.port, timeout=5) as client:
            refused = client.sendmail(
                "sender@example.com",
                ["b@example.com", "c@example.org"],
                TRICKY,
                mail_options=["BODY=8BITMIME"],
            )
            client.sendmail("", ["d@example.net"], b"no header here\r\nsecond\r\n")
            return refused

    refused = yield in_thread(send)

    assert refused == {}
    assert server.messages == [
        CapturedMessage(
            sender=b"sender@example.com",
            recipients=[b"b@example.com", b"c@example.org"],
            data=TRICKY,
            mail_options=[b"BODY=8BITMIME"],
        ),
        # Null sender; a body with no header (Twisted would insert a blank line there).
        CapturedMessage(b"", [b"d@example.net"], b"no header here\r\nsecond\r\n", []),
    ]
    assert seen == server.messages
    assert server.connections == 1


@pytest_twisted.inlineCallbacks
def test_capture_server_advertises_8bitmime_only_without_options(
    capture_server: CaptureFactory,
) -> Generator[defer.Deferred[Any], Any, None]:
    server = capture_server()
    features = yield in_thread(ehlo_features, server.port)
    assert "8bitmime" in features
    assert "auth" not in features
    assert "starttls" not in features


@pytest_twisted.inlineCallbacks
def test_capture_server_rcpt_replies(
    capture_server: CaptureFactory,
) -> Generator[defer.Deferred[Any], Any, None]:
    server = capture_server(
        rcpt_replies={"busy": (451, "4.2.1 try later"), "nobody": (550, "5.1.1 no such user")}
    )

    def send() -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP(HOST, server.port, timeout=5) as client:
            return client.sendmail(
                "s@example.com",
                ["busy@example.com", "ok@example.com", "nobody@example.com"],
                b"Subject: x\r\n\r\nhi\r\n",
            )

    refused = yield in_thread(send)
    assert refused == {
        "busy@example.com": (451, b"4.2.1 try later"),
        "nobody@example.com": (550, b"5.1.1 no such user"),
    }
    assert [m.recipients for m in server.messages] == [[b"ok@example.com"]]


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
@pytest_twisted.inlineCallbacks
def test_capture_server_requires_and_accepts_auth(
    capture_server: CaptureFactory, mechanism: str
) -> Generator[defer.Deferred[Any], Any, None]:
    server = capture_server(credentials={"alice": "s3cret"})

    def session() -> tuple[str, tuple[int, bytes], int]:
        with smtplib.SMTP(HOST, server.port, timeout=5) as client:
            client.ehlo()
            advertised = client.esmtp_features["auth"]
            before = client.mail("s@example.com")
            client.rset()
            client.user, client.password = "alice", "s3cret"
            method = getattr(client, "auth_" + mechanism.lower().replace("-", "_"))
            code, _ = client.auth(mechanism, method)
            client.sendmail("s@example.com", ["r@example.com"], b"Subject: x\r\n\r\nhi\r\n")
            return advertised, before, code

    advertised, before, code = yield in_thread(session)
    assert advertised.split() == ["PLAIN", "LOGIN", "CRAM-MD5"]
    assert before[0] == 530
    assert code == 235
    assert [m.recipients for m in server.messages] == [[b"r@example.com"]]


@pytest_twisted.inlineCallbacks
def test_capture_server_refuses_wrong_password(
    capture_server: CaptureFactory,
) -> Generator[defer.Deferred[Any], Any, None]:
    server = capture_server(credentials={"alice": "s3cret"})

    def login() -> int:
        with smtplib.SMTP(HOST, server.port, timeout=5) as client:
            try:
                client.login("alice", "wrong")
            except smtplib.SMTPAuthenticationError as error:
                return error.smtp_code
            return 0

    code = yield in_thread(login)
    assert code == 535
    assert server.messages == []


@pytest_twisted.inlineCallbacks
def test_capture_server_starttls_with_trustme_ca(
    capture_server: CaptureFactory, twisted_server_tls: Any, client_ssl_context: ssl.SSLContext
) -> Generator[defer.Deferred[Any], Any, None]:
    server = capture_server(tls=twisted_server_tls)

    def send() -> tuple[bool, bool, str]:
        with smtplib.SMTP(HOST, server.port, timeout=5) as client:
            client.ehlo()
            offered = client.has_extn("starttls")
            client.starttls(context=client_ssl_context)
            client.ehlo()
            offered_again = client.has_extn("starttls")
            version = client.sock.version()
            client.sendmail("s@example.com", ["r@example.com"], TRICKY)
            return offered, offered_again, version

    def untrusted() -> None:
        with smtplib.SMTP(HOST, server.port, timeout=5) as client:
            client.starttls(context=ssl.create_default_context())

    offered, offered_again, version = yield in_thread(send)
    assert (offered, offered_again) == (True, False)
    assert version.startswith("TLSv1.")
    assert [m.data for m in server.messages] == [TRICKY]
    with pytest.raises(ssl.SSLCertVerificationError):
        yield in_thread(untrusted)


@pytest_twisted.inlineCallbacks
def test_capture_server_maildir(
    capture_server: CaptureFactory, tmp_path: Any
) -> Generator[defer.Deferred[Any], Any, None]:
    server = capture_server(maildir=tmp_path / "Maildir")

    def send() -> None:
        with smtplib.SMTP(HOST, server.port, timeout=5) as client:
            client.sendmail("s@example.com", ["r1@example.com", "r2@example.com"], TRICKY)

    yield in_thread(send)
    # The 250 after the final dot waited for the Maildir write.
    maildir = mailbox.Maildir(tmp_path / "Maildir", create=False)
    [key] = maildir.keys()
    assert maildir.get_bytes(key) == (
        b"X-Twistmail-Envelope-From: <s@example.com>\n"
        b"X-Twistmail-Envelope-To: <r1@example.com>\n"
        b"X-Twistmail-Envelope-To: <r2@example.com>\n" + TRICKY.replace(b"\r\n", b"\n")
    )
    assert [m.data for m in server.messages] == [TRICKY]


@pytest_twisted.inlineCallbacks
def test_capture_server_stop_closes_open_connections(
    capture_server: CaptureFactory,
) -> Generator[defer.Deferred[Any], Any, None]:
    server = capture_server()
    client = smtplib.SMTP(timeout=5)
    try:
        yield in_thread(client.connect, HOST, server.port)
        yield in_thread(client.ehlo)
        assert server.connections == 1
        yield server.stop()  # must not wait for the idle client, nor leave its timeout armed
        with pytest.raises(smtplib.SMTPServerDisconnected):
            yield in_thread(client.noop)
    finally:
        client.close()


# CueServer (aiosmtpd) ------------------------------------------------------------------------


def test_cue_server_exact_bytes_smtputf8_and_options(cue_server: CueFactory) -> None:
    server = cue_server()
    with smtplib.SMTP(HOST, server.port, timeout=5) as client:
        client.sendmail(
            "jörg@exämple.com",
            ["zoë@example.com"],
            TRICKY,
            mail_options=["SMTPUTF8", "BODY=8BITMIME"],
        )
    [received] = server.received
    assert received.sender == "jörg@exämple.com"
    assert received.recipients == ["zoë@example.com"]
    assert received.data == TRICKY
    # smtplib adds SIZE= because aiosmtpd offers SIZE; aiosmtpd upper-cases the options.
    assert received.mail_options == [f"SIZE={len(TRICKY)}", "SMTPUTF8", "BODY=8BITMIME"]
    assert received.connection == 0
    assert server.connections == 1
    assert server.commands[1:] == [
        f"MAIL FROM:<jörg@exämple.com> size={len(TRICKY)} SMTPUTF8 BODY=8BITMIME",
        "RCPT TO:<zoë@example.com>",
        "DATA",
        "QUIT",
    ]


@pytest.mark.parametrize(("smtputf8", "pipelining"), [(True, True), (False, False)])
def test_cue_server_advertises_what_it_is_told(
    cue_server: CueFactory, smtputf8: bool, pipelining: bool
) -> None:
    features = ehlo_features(cue_server(smtputf8=smtputf8, pipelining=pipelining).port)
    assert ("smtputf8" in features) is smtputf8
    assert ("pipelining" in features) is pipelining
    assert "8bitmime" in features
    assert "auth" not in features


def test_cue_server_null_sender_and_connection_index(cue_server: CueFactory) -> None:
    server = cue_server()
    for _ in range(2):
        with smtplib.SMTP(HOST, server.port, timeout=5) as client:
            client.sendmail("", ["r@example.com"], b"x\r\n")
    assert [(m.sender, m.connection) for m in server.received] == [("", 0), ("", 1)]


def test_cue_server_rcpt_replies_and_once(cue_server: CueFactory) -> None:
    server = cue_server(
        rcpt_replies={"nobody": "550 5.1.1 no such user"},
        rcpt_replies_once={"busy": "451 4.2.1 mailbox busy"},
    )
    recipients = ["busy@example.com", "ok@example.com", "nobody@example.com"]
    with smtplib.SMTP(HOST, server.port, timeout=5) as client:
        first = client.sendmail("s@example.com", recipients, b"x\r\n")
        second = client.sendmail("s@example.com", recipients, b"y\r\n")
    assert first == {
        "busy@example.com": (451, b"4.2.1 mailbox busy"),
        "nobody@example.com": (550, b"5.1.1 no such user"),
    }
    assert second == {"nobody@example.com": (550, b"5.1.1 no such user")}
    assert [m.recipients for m in server.received] == [
        ["ok@example.com"],
        ["busy@example.com", "ok@example.com"],
    ]


def test_cue_server_mail_and_data_replies(cue_server: CueFactory) -> None:
    refuses_mail = cue_server(mail_reply="451 4.3.0 try later")
    refuses_data = cue_server(data_reply="452 4.3.1 no space")
    with (
        smtplib.SMTP(HOST, refuses_mail.port, timeout=5) as client,
        pytest.raises(smtplib.SMTPSenderRefused) as sender_refused,
    ):
        client.sendmail("s@example.com", ["r@example.com"], b"x\r\n")
    with (
        smtplib.SMTP(HOST, refuses_data.port, timeout=5) as client,
        pytest.raises(smtplib.SMTPDataError) as data_error,
    ):
        client.sendmail("s@example.com", ["r@example.com"], b"x\r\n")
    assert sender_refused.value.smtp_code == 451
    assert (data_error.value.smtp_code, data_error.value.smtp_error) == (452, b"4.3.1 no space")
    assert refuses_mail.received == refuses_data.received == []
    assert [m.data for m in refuses_data.rejected] == [b"x\r\n"]


def test_cue_server_drops_after_data_without_reply(cue_server: CueFactory) -> None:
    server = cue_server(drop_after_data_count=1)
    client = smtplib.SMTP(HOST, server.port, timeout=5)
    with pytest.raises(smtplib.SMTPServerDisconnected):
        client.sendmail("s@example.com", ["r@example.com"], b"first\r\n")
    client.close()
    with smtplib.SMTP(HOST, server.port, timeout=5) as client:
        client.sendmail("s@example.com", ["r@example.com"], b"second\r\n")
    assert [(m.data, m.connection) for m in server.dropped] == [(b"first\r\n", 0)]
    assert [(m.data, m.connection) for m in server.received] == [(b"second\r\n", 1)]


def test_cue_server_421_after_k_messages(cue_server: CueFactory) -> None:
    server = cue_server(close_421_after=2)
    client = smtplib.SMTP(HOST, server.port, timeout=5)
    for n in range(2):
        client.sendmail("s@example.com", ["r@example.com"], b"%d\r\n" % n)
    with pytest.raises(smtplib.SMTPSenderRefused) as refused:
        client.sendmail("s@example.com", ["r@example.com"], b"third\r\n")
    client.close()
    assert (refused.value.smtp_code, refused.value.smtp_error) == (421, b"4.7.0 closing")
    assert [m.data for m in server.received] == [b"0\r\n", b"1\r\n"]


@pytest.mark.parametrize("step", sorted(STALL_STEPS))
def test_cue_server_stall_makes_client_time_out(cue_server: CueFactory, step: str) -> None:
    server = cue_server(stall_on=step)
    client = smtplib.SMTP(timeout=SHORT_TIMEOUT)

    def session() -> None:
        client.connect(HOST, server.port)
        client.sendmail("s@example.com", ["r@example.com"], b"x\r\n")

    try:
        # smtplib reports a read timeout as a disconnection caused by TimeoutError.
        with pytest.raises(smtplib.SMTPServerDisconnected) as disconnected:
            session()
    finally:
        client.close()
    assert isinstance(disconnected.value.__context__, TimeoutError)
    assert server.received == []
    expected_last = {"greeting": None, "EHLO": "EHLO", "MAIL": "MAIL", "RCPT": "RCPT"}
    expected_last |= {"DATA": "DATA", "DOT": "DATA"}
    last = server.commands[-1].split()[0] if server.commands else None
    assert last == expected_last[step]
    assert len(server.stalled) == (step == "DOT")
    server.stop()
    assert not server.stop_forced  # the stalled session ended when told, not by a timeout
    assert not server.thread_alive


def test_cue_server_stop_with_client_mid_session(cue_server: CueFactory) -> None:
    server = cue_server()
    assert server.thread_alive
    client = smtplib.SMTP(HOST, server.port, timeout=5)
    client.ehlo()
    client.mail("s@example.com")
    server.stop()
    assert not server.stop_forced  # the open session was closed, not waited out
    with pytest.raises(smtplib.SMTPServerDisconnected):
        client.rcpt("r@example.com")
    client.close()
    assert not server.running
    assert not server.thread_alive


def test_cue_server_implicit_tls(
    cue_server: CueFactory, server_ssl_context: ssl.SSLContext, client_ssl_context: ssl.SSLContext
) -> None:
    server = cue_server(implicit_tls_context=server_ssl_context)
    with smtplib.SMTP_SSL(HOST, server.port, timeout=5, context=client_ssl_context) as client:
        version = client.sock.version()
        client.sendmail("s@example.com", ["r@example.com"], TRICKY)
    assert version is not None
    assert [m.data for m in server.received] == [TRICKY]
    with pytest.raises(ssl.SSLCertVerificationError):
        smtplib.SMTP_SSL(HOST, server.port, timeout=5, context=ssl.create_default_context())


def test_cue_server_requires_starttls(
    cue_server: CueFactory, server_ssl_context: ssl.SSLContext, client_ssl_context: ssl.SSLContext
) -> None:
    server = cue_server(starttls_context=server_ssl_context, require_starttls=True)
    with smtplib.SMTP(HOST, server.port, local_hostname="client.test", timeout=5) as client:
        client.ehlo()
        assert client.has_extn("starttls")
        before = client.mail("s@example.com")
        client.starttls(context=client_ssl_context)
        client.sendmail("s@example.com", ["r@example.com"], b"x\r\n")
    assert before[0] == 530
    assert [m.data for m in server.received] == [b"x\r\n"]
    assert server.commands[:3] == ["EHLO client.test", "MAIL FROM:<s@example.com>", "STARTTLS"]


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_cue_server_auth(cue_server: CueFactory, mechanism: str) -> None:
    server = cue_server(auth={"bob": "hunter2"})
    with smtplib.SMTP(HOST, server.port, timeout=5) as client:
        client.ehlo()
        assert set(client.esmtp_features["auth"].split()) == {"PLAIN", "LOGIN"}
        before = client.mail("s@example.com")
        client.user, client.password = "bob", "wrong"
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            client.auth(mechanism, getattr(client, "auth_" + mechanism.lower()))
        client.user, client.password = "bob", "hunter2"
        code, _ = client.auth(mechanism, getattr(client, "auth_" + mechanism.lower()))
        client.sendmail("s@example.com", ["r@example.com"], b"x\r\n")
    assert before[0] == 530
    assert refused.value.smtp_code == 535
    assert code == 235
    assert len(server.received) == 1
    transcript = "\n".join(server.commands)
    assert "AUTH <redacted>" in transcript
    assert "hunter2" not in transcript
    assert "Ym9i" not in transcript  # base64 of "bob" (AUTH LOGIN initial response)
    assert "AGJvYgBodW50ZXIy" not in transcript  # base64 of "\0bob\0hunter2"
