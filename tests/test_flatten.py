"""envelope_from_message's direct writer gives the bytes the email package writes."""

from __future__ import annotations

import copy
import email
from email import policy
from email.message import EmailMessage
from email.policy import Policy

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twistmail import AddressError, HeaderInjectionError, MessageError, envelope_from_message
from twistmail._flatten import flatten_simple
from twistmail.message import envelope_from_generator, to_wire, unstuff

BODY = "Lorem ipsum dolor sit amet, consectetur adipiscing elit.\n" * 35


def email_package_payload(msg: EmailMessage) -> bytes:
    """What the email package writes for ``msg`` with policy.SMTP, Bcc left out."""
    shown = copy.deepcopy(msg)
    del shown["Bcc"]
    return to_wire(shown.as_bytes(policy=policy.SMTP))


def made(
    headers: list[tuple[str, str]], body: str = BODY, pol: Policy = policy.default
) -> EmailMessage:
    msg = EmailMessage(policy=pol)
    for name, value in headers:
        msg[name] = value
    msg.set_content(body)
    return msg


DATED = [("Date", "Mon, 23 Nov 2026 10:00:00 +0000"), ("Message-ID", "<m.1@example.com>")]


@pytest.mark.parametrize(
    "headers",
    [
        [("From", "Bench Sender <bench@sender.example>"), ("To", "User 1 <u1@rcpt.example>")],
        [("From", "a@example.com"), ("To", "b@example.org, c@example.org"), ("Subject", "Hi")],
        # Quotes, comments and groups are written from the source, not the parsed form.
        [("From", '"Ann Lee" <ann@example.com>'), ("To", "b@example.org (Bob)")],
        [("From", "a@example.com"), ("To", "Team: b@example.org, c@example.org;")],
        [("From", "Zoë <zoe@example.com>"), ("To", "b@example.org"), ("Subject", "Grüße")],
        [("From", "a@example.com"), ("To", "b@example.org"), ("Subject", "x " * 60)],
        [("From", "a@example.com"), ("To", "b@example.org"), ("Subject", "=?utf-8?q?hi?=")],
        [("From", "a@example.com"), ("To", "b@example.org"), ("Date", "not a date")],
        [("From", "a@example.com"), ("To", "b@example.org"), ("X-Empty", "")],
        [("From", "a@example.com"), ("To", "b@example.org"), ("Resent-To", '"X Y" <x@y.org>')],
    ],
)
@pytest.mark.parametrize("pol", [policy.default, policy.SMTP])
def test_a_single_part_message_is_written_as_the_email_package_writes_it(
    headers: list[tuple[str, str]], pol: Policy
) -> None:
    given = {name for name, _ in headers}
    dated = [(name, value) for name, value in DATED if name not in given]
    msg = made([*headers, ("Bcc", "hidden@example.net"), *dated], pol=pol)
    assert flatten_simple(msg) is not None
    envelope = envelope_from_message(msg)
    assert envelope.payload == email_package_payload(msg)
    assert envelope.source is msg
    assert b"hidden" not in envelope.payload
    assert str(envelope.recipients[-1]) == "hidden@example.net"


def test_an_8bit_body_and_raw_values_are_written_as_the_email_package_writes_them() -> None:
    msg = made([("From", "a@example.com"), ("To", "b@example.org"), *DATED], "Grüße ☃\n.x\n")
    msg.set_raw("X-Raw", "a value set raw")
    msg.set_raw("X-Long", "word " * 30)
    # A header object stored under another name: the generator writes the object's own name.
    msg.set_raw("X-Stored-As", policy.SMTP.header_factory("X-Made-As", "value"))
    assert flatten_simple(msg) is not None
    assert envelope_from_message(msg).payload == email_package_payload(msg)


@pytest.mark.parametrize("pol", [policy.default, policy.SMTP, policy.compat32])
def test_a_parsed_message_is_written_as_the_email_package_writes_it(pol: Policy) -> None:
    source = (
        b"From: Ann Lee <ann@example.com> (the sender)\r\nTo: Team: b@example.org,\r\n"
        b" c@example.org;\r\nSubject: =?utf-8?q?Gr=C3=BC=C3=9Fe?= and a long subject line that"
        b" goes on\r\n and on\r\nBcc: hidden@example.net\r\n"
        b"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\nMessage-ID: <m.1@example.com>\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
        b"\r\nGr\xc3\xbc\xc3\x9fe\r\n.dot\r\n"
    )
    msg = email.message_from_bytes(source, _class=EmailMessage, policy=pol)
    assert isinstance(msg, EmailMessage)
    assert flatten_simple(msg) is not None
    envelope = envelope_from_message(msg)
    assert envelope.payload == email_package_payload(msg)
    assert envelope.payload == envelope_from_generator(msg).payload
    assert [str(r) for r in envelope.recipients] == [
        "b@example.org",
        "c@example.org",
        "hidden@example.net",
    ]


def test_date_and_message_id_are_added_as_the_full_path_adds_them() -> None:
    msg = made([("From", "Ann <ann@example.com>"), ("To", "b@example.org")], "Grüße\n")
    envelope = envelope_from_message(msg)
    parsed = email.message_from_bytes(unstuff(envelope.payload), policy=policy.default)
    assert list(parsed.keys())[-2:] == ["Date", "Message-ID"]
    assert parsed["Message-ID"] == envelope.message_id
    assert envelope.message_id is not None
    assert envelope.message_id.endswith("@example.com>")
    # The source carries them, so a 7-bit re-rendering keeps them.
    assert envelope.source is not None
    assert envelope.source is not msg
    assert envelope.source["Message-ID"] == envelope.message_id
    assert "Date" not in msg
    assert "Message-ID" not in msg
    assert unstuff(envelope.payload) == envelope.source.as_bytes(policy=policy.SMTP)


@pytest.mark.parametrize(
    "headers",
    [
        [("From", "a@example.com"), ("To", "jörg@example.org")],  # SMTPUTF8
        [("From", "a@example.com"), ("To", "b@bücher.example")],  # an A-label
    ],
)
def test_what_the_direct_writer_leaves_goes_the_full_way(headers: list[tuple[str, str]]) -> None:
    msg = made([*headers, *DATED])
    assert flatten_simple(msg) is None
    assert envelope_from_message(msg).payload


def test_refusals_are_the_full_paths() -> None:
    msg = made([("From", "a@example.com"), ("To", "b@example.org")])
    msg.set_raw("X-Bad", "a\r\nBcc: victim@example.org")
    with pytest.raises(HeaderInjectionError) as caught:
        envelope_from_message(msg)
    assert caught.value.field == "X-Bad"
    bad = made([("From", "a@example.com"), ("To", "b@example.org, nobody")])
    with pytest.raises(AddressError) as wrong:
        envelope_from_message(bad)
    assert wrong.value.field == "To"
    assert "nobody" in str(wrong.value)


_TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=90) | (
    st.sampled_from(['"Ann Lee"', "O'Brien", "x" * 70, "a  b", " lead", "=?utf-8?q?x?=", "(c)"])
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=_TEXT,
    subject=_TEXT,
    note=_TEXT,
    body=_TEXT | st.sampled_from([".", "a\n.b\n", "x\r\n.y", "no end", "cr\ronly\r"]),
    local=st.from_regex(r"[a-z0-9.+_-]{1,20}", fullmatch=True),
    smtp_policy=st.booleans(),
    dated=st.booleans(),
)
def test_whatever_the_headers_the_direct_writer_matches_the_email_package(
    name: str, subject: str, note: str, body: str, local: str, smtp_policy: bool, dated: bool
) -> None:
    headers = [
        ("From", "Sender <sender@example.com>"),
        ("To", f"{name} <{local}@example.org>"),
        ("Subject", subject),
        ("X-Note", note),
        *(DATED if dated else []),
    ]
    try:
        msg = made(headers, body, policy.SMTP if smtp_policy else policy.default)
        reference = envelope_from_generator(msg)
        full = reference.payload
    except (MessageError, ValueError, TypeError, IndexError, AttributeError):
        return  # not a message the full path sends: the direct writer is not asked
    envelope = envelope_from_message(msg)
    if dated:
        assert envelope.payload == full
        assert (envelope.size, envelope.message_id, envelope.eight_bit) == (
            reference.size,
            reference.message_id,
            reference.eight_bit,
        )
    else:  # a Date and Message-ID of its own: compare the rest
        assert envelope.payload.split(b"\r\nDate: ")[0] == full.split(b"\r\nDate: ")[0]
