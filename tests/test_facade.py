"""The smtplib-shaped facade against real servers on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from servers import CueServer

from twistmail import SMTP, AuthenticationError, PermanentError, TLSError
from twistmail.message import envelope_from_message, unstuff
from twistmail.testing import CaptureServer


def message() -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "a@example.com"
    msg["To"] = "b@example.org"
    msg["Bcc"] = "hidden@example.org"
    msg["Subject"] = "ported"
    msg["Date"] = "Mon, 02 Nov 2026 10:00:00 +0000"
    msg["Message-ID"] = "<ported@example.com>"
    msg.set_content("from smtplib code\n")
    return msg


@pytest_twisted.ensureDeferred
async def test_smtplib_sequence_with_starttls_and_login(
    cue_server: Callable[..., CueServer], server_ssl_context: Any, ca_file: Path
) -> None:
    server = cue_server(
        starttls_context=server_ssl_context, require_starttls=True, auth={"bob": "s3cret"}
    )
    smtp = SMTP(ca_file=ca_file, timeout=5)
    await smtp.connect("localhost", server.port)
    assert smtp.has_extn("STARTTLS")
    await smtp.starttls()
    await smtp.login("bob", "s3cret")
    msg = message()
    refused = await smtp.send_message(msg)
    await smtp.quit()
    assert refused == {}
    (got,) = server.received
    assert got.recipients == ["b@example.org", "hidden@example.org"]
    assert got.data == unstuff(envelope_from_message(msg).payload)
    assert b"Bcc" not in got.data
    assert "STARTTLS" in server.commands


@pytest_twisted.ensureDeferred
async def test_sendmail_reports_refused_recipients_like_smtplib(
    cue_server: Callable[..., CueServer],
) -> None:
    server = cue_server(rcpt_replies={"nobody": "550 5.1.1 no such user"})
    smtp = SMTP(timeout=5)
    await smtp.connect("127.0.0.1", server.port)
    refused = await smtp.sendmail(
        "a@example.com", ["yes@example.org", "nobody@example.org"], b"Subject: x\r\n\r\nhi\r\n"
    )
    assert refused == {"nobody@example.org": (550, "5.1.1 no such user")}
    with pytest.raises(PermanentError) as info:
        await smtp.sendmail("a@example.com", "nobody@example.org", b"Subject: x\r\n\r\nhi\r\n")
    assert info.value.refused == {"nobody@example.org": (550, "5.1.1 no such user")}
    await smtp.quit()
    (got,) = server.received
    assert got.recipients == ["yes@example.org"]
    assert got.data == b"Subject: x\r\n\r\nhi\r\n"


@pytest_twisted.ensureDeferred
async def test_login_failure_and_untrusted_tls_surface_from_their_calls(
    capture_server: Callable[..., CaptureServer], twisted_server_tls: Any
) -> None:
    server = capture_server(credentials={"bob": "right"}, tls=twisted_server_tls)
    smtp = SMTP(timeout=5)
    await smtp.connect("localhost", server.port)
    with pytest.raises(TLSError):
        await smtp.starttls()  # the test CA is not trusted
    smtp = SMTP(timeout=5, insecure=True)
    await smtp.connect("localhost", server.port)
    await smtp.starttls()
    with pytest.raises(AuthenticationError) as info:
        await smtp.login("bob", "wrong-password")
    assert "wrong-password" not in str(info.value)
    smtp.close()
    assert server.messages == []


def test_send_before_connect_is_a_clear_error() -> None:
    with pytest.raises(ConnectionError, match="connect"):
        SMTP().sendmail("a@example.com", "b@example.org", b"x\r\n")


@pytest_twisted.ensureDeferred
async def test_handshake_calls_return_code_and_message_like_smtplib(
    cue_server: Callable[..., CueServer], server_ssl_context: Any, ca_file: Path
) -> None:
    server = cue_server(
        starttls_context=server_ssl_context, require_starttls=True, auth={"bob": "s3cret"}
    )
    smtp = SMTP(ca_file=ca_file, timeout=5)
    code, greeting = await smtp.connect("localhost", server.port)
    assert code == 220
    assert isinstance(greeting, bytes)
    assert greeting
    code, features = await smtp.ehlo()
    assert code == 250
    assert b"STARTTLS" in features.split(b"\n")
    assert await smtp.starttls() == (220, b"Ready to start TLS")
    code, features = await smtp.ehlo()  # the EHLO sent over TLS
    assert code == 250
    assert b"STARTTLS" not in features.split(b"\n")
    code, text = await smtp.login("bob", "s3cret")
    assert code == 235
    assert b"s3cret" not in text
    await smtp.quit()


@pytest_twisted.ensureDeferred
async def test_starttls_on_a_server_without_it_names_no_url(
    cue_server: Callable[..., CueServer],
) -> None:
    server = cue_server()
    smtp = SMTP(timeout=5)
    await smtp.connect("127.0.0.1", server.port)
    with pytest.raises(TLSError) as info:
        await smtp.starttls()
    assert "does not offer STARTTLS" in str(info.value)
    assert "smtp+tls" not in str(info.value)
    assert "://" not in str(info.value)
    await smtp.quit()
