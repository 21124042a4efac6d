"""Delivery status notifications (RFC 3464), parsed back with the email package."""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime
from email.message import EmailMessage, Message
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twistmail.relay import dsn
from twistmail.relay.dsn import FailedRecipient, make_dsn, should_bounce

ORIGINAL = (
    b"From: App <app@sender.example>\r\n"
    b"To: ann@rcpt.example, bob@rcpt.example\r\n"
    b"Subject: Your invoice\r\n"
    b"Message-ID: <inv-1@sender.example>\r\n"
    b"\r\n"
    b"The secret body of the message.\r\n"
)
ARRIVED = datetime(2026, 12, 1, 9, 30, tzinfo=UTC)
TOP_HEADERS = [
    "From",
    "To",
    "Subject",
    "Date",
    "Message-ID",
    "Auto-Submitted",
    "MIME-Version",
    "Content-Type",
]
BLOCK_FIELDS = ["Final-Recipient", "Action", "Status", "Diagnostic-Code"]


def build(
    failed: list[Any], original: bytes = ORIGINAL, sender: str = "app@sender.example"
) -> bytes:
    return make_dsn(
        original,
        sender,
        failed,
        reporting_mta="relay.example",
        arrival_date=ARRIVED,
        from_address="Mail Delivery System <MAILER-DAEMON@relay.example>",
    )


def parse(data: bytes) -> tuple[EmailMessage, list[Message], list[Message]]:
    """The notification, its status blocks (per-message first), and its three parts."""
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    parts = message.get_payload()
    assert isinstance(parts, list)
    blocks = parts[1].get_payload()
    assert isinstance(blocks, list)
    return message, blocks, parts


def test_a_notification_reports_each_failed_recipient() -> None:
    data = build(
        [
            ("ann@rcpt.example", "5.1.1", "550 5.1.1 <ann@rcpt.example>: no such user", "failed"),
            FailedRecipient("bob@rcpt.example", "4.4.7", "message expired after 5 days"),
        ]
    )
    assert b"\n" not in data.replace(b"\r\n", b"")  # CRLF only
    assert data.isascii()
    message, blocks, parts = parse(data)
    assert list(message.keys()) == TOP_HEADERS
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["To"] == "app@sender.example"
    assert message["Message-ID"].endswith("@relay.example>")
    assert [part.get_content_type() for part in parts] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    assert message.defects == []
    per_message, ann, bob = blocks
    assert per_message["Reporting-MTA"] == "dns; relay.example"
    assert per_message["Arrival-Date"] == "Tue, 01 Dec 2026 09:30:00 +0000"
    assert ann["Final-Recipient"] == "rfc822; ann@rcpt.example"
    assert ann["Action"] == "failed"
    assert ann["Status"] == "5.1.1"
    assert ann["Diagnostic-Code"] == "smtp; 550 5.1.1 <ann@rcpt.example>: no such user"
    assert bob["Status"] == "4.4.7"
    assert bob["Diagnostic-Code"] == "smtp; message expired after 5 days"
    human = parts[0].get_content()
    assert "<ann@rcpt.example>: failed" in human
    assert "no such user" in human


def test_only_the_original_headers_are_attached() -> None:
    _, _, parts = parse(build([("ann@rcpt.example", "5.1.1", "550 no")]))
    attached = parts[2].get_payload(decode=True)
    assert attached == ORIGINAL.split(b"\r\n\r\n")[0] + b"\r\n"
    assert b"secret body" not in build([("ann@rcpt.example", "5.1.1", "550 no")])


def test_lf_and_bare_cr_line_ends_in_the_original_become_crlf() -> None:
    original = b"Subject: one\nX-A: two\rX-B: three\n\nbody\n"
    _, _, parts = parse(build([("a@b.example", "5.0.0", "550 no")], original=original))
    assert parts[2].get_payload(decode=True) == b"Subject: one\r\nX-A: two\r\nX-B: three\r\n"


def test_eight_bit_original_headers_travel_base64() -> None:
    original = "Subject: Grüße\r\nFrom: Jörg <j@x.example>\r\n\r\nbody\r\n".encode()
    data = build([("a@b.example", "5.0.0", "550 no")], original=original)
    assert data.isascii()
    _, _, parts = parse(data)
    assert parts[2]["Content-Transfer-Encoding"] == "base64"
    assert parts[2].get_payload(decode=True) == original.split(b"\r\n\r\n")[0] + b"\r\n"


def test_huge_original_headers_are_cut_at_a_line() -> None:
    original = b"".join(b"X-Filler-%06d: %s\r\n" % (n, b"y" * 80) for n in range(2000))
    _, _, parts = parse(build([("a@b.example", "5.0.0", "550 no")], original=original + b"\r\n"))
    attached = parts[2].get_payload(decode=True)
    assert dsn.MAX_HEADERS_BYTES - 100 < len(attached) <= dsn.MAX_HEADERS_BYTES
    assert attached.endswith(b"y\r\n")


def test_a_hostile_reply_or_recipient_cannot_add_headers_or_parts() -> None:
    reply = "550 nope\r\nX-Injected: yes\r\n\r\nContent-Type: text/html\n--x--\rX-Too: 1"
    recipient = "ann@rcpt.example\r\nBcc: victim@else.example"
    data = build([(recipient, "5.1.1", reply)], sender="app@sender.example")
    message, blocks, parts = parse(data)
    assert list(message.keys()) == TOP_HEADERS
    assert len(parts) == 3
    assert len(blocks) == 2
    (block,) = blocks[1:]
    assert list(block.keys()) == BLOCK_FIELDS
    assert block["Final-Recipient"] == "rfc822; ann@rcpt.example Bcc: victim@else.example"
    assert "X-Injected: yes" in block["Diagnostic-Code"]
    assert block["Diagnostic-Code"].startswith("smtp; 550 nope")
    for line in data.split(b"\r\n"):
        assert not line.startswith((b"X-Injected", b"X-Too", b"Bcc"))


def test_non_ascii_recipients_use_the_utf8_address_type() -> None:
    _, blocks, _ = parse(build([("jörg@x.example", "5.1.1", "550 nein: Grüße")]))
    assert blocks[1]["Final-Recipient"] == "utf-8; j\\x{F6}rg@x.example"
    assert blocks[1]["Diagnostic-Code"] == "smtp; 550 nein: Gr\\x{FC}\\x{DF}e"


def test_the_boundary_never_appears_in_the_content(monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = iter(["a" * 32, "b" * 32])
    monkeypatch.setattr(dsn.secrets, "token_hex", lambda _: next(tokens))
    original = b"X-Trap: --=_twistmail_dsn_" + b"a" * 32 + b"\r\n\r\nbody\r\n"
    data = build([("a@b.example", "5.0.0", "550 no")], original=original)
    message, _, parts = parse(data)
    assert message.get_param("boundary") == "=_twistmail_dsn_" + "b" * 32
    assert len(parts) == 3


@pytest.mark.parametrize(
    ("failed", "kwargs", "problem"),
    [
        ([], {}, "at least one recipient"),
        ([("a@b.example", "5.1", "550")], {}, "not an enhanced status code"),
        ([("a@b.example", "5.1.1", "550", "bounced")], {}, "action 'bounced'"),
        ([("a@b.example", "5.1.1", "550")], {"reporting_mta": "relay\r\nX: y"}, "not a host"),
        ([("a@b.example", "5.1.1", "550")], {"envelope_sender": "a@b\r\nX: y"}, "line break"),
    ],
)
def test_bad_arguments_are_refused(failed: list[Any], kwargs: dict[str, Any], problem: str) -> None:
    arguments: dict[str, Any] = {
        "envelope_sender": "app@sender.example",
        "reporting_mta": "relay.example",
        "arrival_date": 0.0,
        "from_address": "MAILER-DAEMON@relay.example",
        **kwargs,
    }
    with pytest.raises(ValueError, match=problem):
        make_dsn(ORIGINAL, failed=failed, **arguments)


@settings(max_examples=200, deadline=None)
@given(recipient=st.text(max_size=80), diagnostic=st.text(max_size=300))
def test_any_reply_text_stays_inside_its_field(recipient: str, diagnostic: str) -> None:
    message, blocks, parts = parse(build([(recipient, "5.0.0", diagnostic)]))
    assert list(message.keys()) == TOP_HEADERS
    assert len(parts) == 3
    assert len(blocks) == 2
    assert list(blocks[1].keys()) == BLOCK_FIELDS
    assert blocks[1]["Diagnostic-Code"].startswith("smtp;")


@pytest.mark.parametrize(
    ("sender", "expected"),
    [
        ("app@sender.example", True),
        ("<app@sender.example>", True),
        ("", False),
        ("<>", False),
        (None, False),
        ("MAILER-DAEMON@relay.example", False),
        ("<Bounces@Relay.Example>", False),
        ("not an address", False),
    ],
)
def test_should_bounce(sender: str | None, expected: bool) -> None:
    own = ["mailer-daemon@relay.example", "bounces@relay.example", "not valid"]
    assert should_bounce(sender, own) is expected
