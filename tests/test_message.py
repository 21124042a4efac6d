"""Tests for twistmail.message: wire format, envelopes from bytes and from EmailMessage."""

from __future__ import annotations

import email
import re
from email import policy
from email.message import EmailMessage

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from twistmail.address import Address
from twistmail.errors import AddressError, HeaderInjectionError, MessageError
from twistmail.message import (
    Envelope,
    envelope_from_bytes,
    envelope_from_message,
    reflatten_7bit,
    to_wire,
    unstuff,
)

CRLF_MESSAGE = (
    b"From: a@example.com\r\nTo: b@example.org\r\nSubject: hi\r\n"
    b"Message-ID: <id-1@example.com>\r\n\r\nline one\r\nline two\r\n"
)


def normalised(data: bytes) -> bytes:
    """The reference CRLF normalisation, written independently of the implementation."""
    text = re.sub(rb"\r\n|\r|\n", b"\r\n", data)
    return text if not text or text.endswith(b"\r\n") else text + b"\r\n"


def header_block(payload: bytes) -> bytes:
    return payload.split(b"\r\n\r\n", 1)[0]


# -- to_wire / unstuff -----------------------------------------------------------------------


def test_crlf_data_is_sent_byte_identical() -> None:
    wire = to_wire(CRLF_MESSAGE)
    assert wire == CRLF_MESSAGE + b".\r\n"
    assert b"\r\r\n" not in wire


def test_bare_lf_is_normalised() -> None:
    assert to_wire(b"a: b\n\nbody\n") == b"a: b\r\n\r\nbody\r\n.\r\n"


def test_bare_cr_is_normalised() -> None:
    assert to_wire(b"one\rtwo\r") == b"one\r\ntwo\r\n.\r\n"


def test_mixed_line_ends() -> None:
    assert to_wire(b"a\r\nb\nc\rd\r\r\ne") == b"a\r\nb\r\nc\r\nd\r\n\r\ne\r\n.\r\n"


def test_dot_stuffing_at_start_and_after_every_line_end() -> None:
    assert to_wire(b".start\r\nmid\r\n.dot\r\n..two\r\n") == (
        b"..start\r\nmid\r\n..dot\r\n...two\r\n.\r\n"
    )
    assert to_wire(b".a\n.b\r.c") == b"..a\r\n..b\r\n..c\r\n.\r\n"


def test_lone_dot_line_cannot_end_data_early() -> None:
    wire = to_wire(b"before\r\n.\r\nafter\r\n")
    assert wire == b"before\r\n..\r\nafter\r\n.\r\n"
    assert wire.index(b"\r\n.\r\n") == len(wire) - 5


def test_data_not_ending_in_crlf_gets_one() -> None:
    assert to_wire(b"no newline") == b"no newline\r\n.\r\n"
    assert to_wire(b"a\r\nb") == b"a\r\nb\r\n.\r\n"


def test_empty_data() -> None:
    assert to_wire(b"") == b".\r\n"
    assert unstuff(b".\r\n") == b""


@given(st.binary())
@example(b"\r\r\n")
@example(b".\r.\n.")
@example(b"\r\n.")
def test_unstuff_inverts_to_wire(data: bytes) -> None:
    assert unstuff(to_wire(data)) == normalised(data)


@given(st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b".", b"x", b"\xff"]), max_size=30))
def test_to_wire_output_is_well_formed(parts: list[bytes]) -> None:
    wire = to_wire(b"".join(parts))
    assert wire.endswith(b".\r\n")
    assert wire.count(b"\r") == wire.count(b"\n") == wire.count(b"\r\n")
    body_lines = wire[:-3].split(b"\r\n")[:-1]
    # every line of the message that starts with "." was stuffed, so none can be the terminator
    assert all(line != b"." for line in body_lines)


@given(st.lists(st.binary().map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))))
def test_crlf_clean_data_without_leading_dots_is_untouched(lines: list[bytes]) -> None:
    lines = [line.lstrip(b".") for line in lines]
    data = b"".join(line + b"\r\n" for line in lines)
    assert to_wire(data) == data + b".\r\n"


def test_unstuff_refuses_unterminated_payload() -> None:
    with pytest.raises(MessageError, match=r"CRLF\.CRLF"):
        unstuff(b"no terminator\r\n")
    with pytest.raises(MessageError):
        unstuff(b"x.\r\n")


# -- envelope_from_bytes ---------------------------------------------------------------------


def test_envelope_from_crlf_bytes() -> None:
    envelope = envelope_from_bytes("a@example.com", ["b@example.org"], CRLF_MESSAGE)
    assert envelope == Envelope(
        sender=Address("a", "example.com"),
        recipients=(Address("b", "example.org"),),
        payload=CRLF_MESSAGE + b".\r\n",
        size=len(CRLF_MESSAGE),
        eight_bit=False,
        smtputf8=False,
        message_id="<id-1@example.com>",
        source=None,
    )


def test_envelope_from_bytes_normalises_bare_lf_and_counts_size_before_stuffing() -> None:
    envelope = envelope_from_bytes("a@example.com", ["b@example.org"], b"S: x\n\n.dot\n")
    assert envelope.payload == b"S: x\r\n\r\n..dot\r\n.\r\n"
    assert envelope.size == len(b"S: x\r\n\r\n.dot\r\n")


def test_envelope_from_bytes_validates_addresses() -> None:
    with pytest.raises(AddressError, match="in field sender") as info:
        envelope_from_bytes("not an address", ["b@example.org"], CRLF_MESSAGE)
    assert info.value.field == "sender"
    with pytest.raises(AddressError, match="in field recipients"):
        envelope_from_bytes("a@example.com", ["b@example.org", "bad"], CRLF_MESSAGE)
    with pytest.raises(AddressError, match="control character"):
        envelope_from_bytes("a@example.com", ["b@example.org\r\nRCPT TO:<x@y>"], CRLF_MESSAGE)


def test_envelope_from_bytes_refuses_no_recipients() -> None:
    with pytest.raises(AddressError, match="no recipients"):
        envelope_from_bytes("a@example.com", [], CRLF_MESSAGE)


def test_envelope_from_bytes_refuses_null_recipient_and_single_str() -> None:
    with pytest.raises(AddressError, match="null path"):
        envelope_from_bytes("a@example.com", [Address("", "")], CRLF_MESSAGE)
    with pytest.raises(TypeError, match="not a single str"):
        envelope_from_bytes("a@example.com", "b@example.org", CRLF_MESSAGE)
    with pytest.raises(TypeError, match="must be bytes"):
        envelope_from_bytes("a@example.com", ["b@example.org"], "text")  # type: ignore[arg-type]


def test_envelope_from_bytes_null_sender_and_address_objects() -> None:
    recipient = Address("b", "example.org")
    envelope = envelope_from_bytes("<>", [recipient], CRLF_MESSAGE)
    assert envelope.sender == Address("", "")
    assert envelope.recipients == (recipient,)


def test_recipients_deduplicated_on_case_insensitive_domain_in_order() -> None:
    envelope = envelope_from_bytes(
        "a@example.com",
        [
            "x@Example.org",
            "y@example.org",
            "x@EXAMPLE.ORG",
            "X@example.org",
            "z@bücher.de",
            "Z <z@xn--bcher-kva.de>",
        ],
        CRLF_MESSAGE,
    )
    assert envelope.recipients == (
        Address("x", "Example.org"),
        Address("y", "example.org"),
        Address("X", "example.org"),
        Address("z", "bücher.de"),
    )


def test_eight_bit_detection() -> None:
    seven = envelope_from_bytes("a@example.com", ["b@example.org"], CRLF_MESSAGE)
    data = CRLF_MESSAGE + b"caf\xc3\xa9\r\n"
    eight = envelope_from_bytes("a@example.com", ["b@example.org"], data)
    assert not seven.eight_bit
    assert eight.eight_bit
    assert not eight.smtputf8  # 8-bit body only: 8BITMIME is enough


def test_smtputf8_when_header_block_has_raw_utf8() -> None:
    data = "From: a@example.com\r\nSubject: café\r\n\r\nbody\r\n".encode()
    envelope = envelope_from_bytes("a@example.com", ["b@example.org"], data)
    assert envelope.smtputf8
    assert envelope.eight_bit


def test_smtputf8_when_an_address_has_non_ascii_local_part() -> None:
    by_recipient = envelope_from_bytes("a@example.com", ["jürgen@example.org"], CRLF_MESSAGE)
    by_sender = envelope_from_bytes("jürgen@example.com", ["b@example.org"], CRLF_MESSAGE)
    assert by_recipient.smtputf8
    assert by_sender.smtputf8
    assert not by_recipient.eight_bit


def test_non_ascii_domain_only_needs_no_smtputf8_and_goes_as_a_label() -> None:
    envelope = envelope_from_bytes("a@bücher.de", ["b@münchen.example"], CRLF_MESSAGE)
    assert not envelope.smtputf8
    assert envelope.sender.smtp_path() == b"a@xn--bcher-kva.de"
    assert envelope.recipients[0].smtp_path() == b"b@xn--mnchen-3ya.example"


def test_idna_failure_is_refused() -> None:
    with pytest.raises(AddressError, match="not a valid IDNA name"):
        envelope_from_bytes("a@example.com", ["b@☃.example"], CRLF_MESSAGE)


@pytest.mark.parametrize(
    ("data", "message_id"),
    [
        (b"Message-ID: <first@x>\r\n\r\nb\r\n", "<first@x>"),
        (b"Subject: s\r\nmessage-id:   <lower@x>  \r\n\r\nb\r\n", "<lower@x>"),
        (b"Subject: s\r\nMESSAGE-ID:\r\n <folded@x>\r\nTo: t@x\r\n\r\nb\r\n", "<folded@x>"),
        (b"Subject: s\nMessage-Id: <lf@x>\n\nb\n", "<lf@x>"),
        (b"Subject: only headers\r\nMessage-ID: <nobody@x>", "<nobody@x>"),
        (b"Subject: s\r\n\r\nMessage-ID: <in-body@x>\r\n", None),
        (b"X-Not-Message-ID: <no@x>\r\n\r\nb\r\n", None),
        (b"Subject: s\r\n\r\n", None),
    ],
)
def test_message_id_extraction(data: bytes, message_id: str | None) -> None:
    envelope = envelope_from_bytes("a@example.com", ["b@example.org"], data)
    assert envelope.message_id == message_id


# -- envelope_from_message -------------------------------------------------------------------


def make_message(**headers: str) -> EmailMessage:
    msg = EmailMessage()
    for name, value in headers.items():
        msg[name.replace("_", "-")] = value
    msg.set_content("Hello.\n.leading dot\n")
    return msg


def test_envelope_from_message_derives_addresses_from_headers() -> None:
    msg = make_message(
        From="Alice <alice@example.com>, other@example.com",
        To="Bob <bob@example.org>, Team: carol@example.net, bob@EXAMPLE.org;",
        Cc="dave@example.com",
        Bcc="eve@example.com",
        Date="Mon, 02 Nov 2026 10:00:00 +0000",
        Message_ID="<m1@example.com>",
    )
    envelope = envelope_from_message(msg)
    assert envelope.sender == Address("alice", "example.com")
    assert envelope.recipients == (
        Address("bob", "example.org"),
        Address("carol", "example.net"),
        Address("dave", "example.com"),
        Address("eve", "example.com"),
    )
    assert envelope.source is msg
    assert envelope.payload.endswith(b"\r\n..leading dot\r\n.\r\n")
    assert unstuff(envelope.payload) == msg.as_bytes(policy=policy.SMTP).replace(
        b"Bcc: eve@example.com\r\n", b""
    )


def test_bcc_is_stripped_and_callers_message_untouched() -> None:
    msg = make_message(From="a@example.com", To="b@example.org", Bcc="secret@example.com")
    before = msg.as_bytes()
    envelope = envelope_from_message(msg)
    assert b"secret" not in envelope.payload
    assert b"Bcc" not in envelope.payload
    assert Address("secret", "example.com") in envelope.recipients
    assert msg["Bcc"] == "secret@example.com"
    assert msg.as_bytes() == before


def test_explicit_envelope_overrides_headers() -> None:
    msg = make_message(From="a@example.com", To="b@example.org", Bcc="c@example.com")
    envelope = envelope_from_message(
        msg, sender="<>", recipients=["x@example.net", Address("y", "example.net")]
    )
    assert envelope.sender == Address("", "")
    assert envelope.recipients == (Address("x", "example.net"), Address("y", "example.net"))
    assert b"Bcc" not in envelope.payload
    with pytest.raises(AddressError, match="no recipients"):
        envelope_from_message(msg, recipients=[])


def test_message_without_from_or_recipients_is_refused() -> None:
    with pytest.raises(AddressError, match="no sender") as info:
        envelope_from_message(make_message(To="b@example.org"))
    assert info.value.field == "From"
    with pytest.raises(AddressError, match="no recipients"):
        envelope_from_message(make_message(From="a@example.com"))
    assert envelope_from_message(make_message(To="b@example.org"), sender="s@example.com")


def test_invalid_address_header_is_refused_with_field() -> None:
    msg = make_message(From="a@example.com", To="b@example.org", Reply_To="not-an-address")
    with pytest.raises(AddressError, match="in field Reply-To") as info:
        envelope_from_message(msg)
    assert info.value.field == "Reply-To"


def test_only_a_missing_date_and_message_id_are_added() -> None:
    msg = make_message(From="a@example.com", To="b@example.org")
    envelope = envelope_from_message(msg)
    names = [line.split(b":")[0] for line in header_block(envelope.payload).split(b"\r\n")]
    assert names == [
        b"From",
        b"To",
        b"Content-Type",
        b"Content-Transfer-Encoding",
        b"MIME-Version",
        b"Date",
        b"Message-ID",
    ]
    assert envelope.message_id is not None


def test_message_id_from_message() -> None:
    msg = make_message(From="a@example.com", To="b@example.org", Message_ID="<m1@example.com>")
    assert envelope_from_message(msg).message_id == "<m1@example.com>"


def test_crlf_injection_via_set_raw_is_refused_naming_the_header() -> None:
    msg = make_message(From="a@example.com", To="b@example.org")
    msg.set_raw("Subject", "hi\r\nBcc: evil@example.com")
    # the parsed view hides the line break, but the generator would write it out
    assert "\n" not in str(msg["Subject"])
    assert b"\r\nBcc: evil" in msg.as_bytes(policy=policy.SMTP)
    with pytest.raises(HeaderInjectionError, match="'Subject'") as info:
        envelope_from_message(msg)
    assert info.value.field == "Subject"


def test_unicode_line_separator_injection_is_refused() -> None:
    msg = make_message(From="a@example.com", To="b@example.org")
    msg.set_raw("X-Campaign", "spring\u2028Bcc: evil@example.com")
    assert b"\r\nBcc: evil" in msg.as_bytes(policy=policy.SMTP)
    with pytest.raises(HeaderInjectionError) as info:
        envelope_from_message(msg)
    assert info.value.field == "X-Campaign"


def test_crlf_injection_via_compat32_message_is_refused() -> None:
    msg: EmailMessage = email.message_from_bytes(
        b"From: a@example.com\r\nTo: b@example.org\r\n\r\nbody\r\n", _class=EmailMessage
    )
    msg["X-Tracking"] = "1\r\nBcc: evil@example.com"  # compat32 stores this unchecked
    with pytest.raises(HeaderInjectionError, match="'X-Tracking'") as info:
        envelope_from_message(msg)
    assert info.value.field == "X-Tracking"


def test_header_name_injection_is_refused() -> None:
    msg = make_message(From="a@example.com", To="b@example.org")
    msg.set_raw("X-A: 1\r\nBcc", "evil@example.com")
    with pytest.raises(HeaderInjectionError, match="header name"):
        envelope_from_message(msg)


def test_folded_headers_of_a_parsed_message_are_accepted() -> None:
    raw = (
        b"From: a@example.com\r\nTo: b@example.org,\r\n c@example.org\r\n"
        b"Subject: a long\r\n\tfolded subject\r\nDate: Mon, 02 Nov 2026 10:00:00 +0000\r\n"
        b"Message-ID: <m1@example.com>\r\n\r\nbody\r\n"
    )
    msg = email.message_from_bytes(raw, _class=EmailMessage, policy=policy.default)
    envelope = envelope_from_message(msg)
    assert envelope.recipients == (Address("b", "example.org"), Address("c", "example.org"))
    assert unstuff(envelope.payload) == raw


def test_non_ascii_local_part_flattens_with_smtputf8() -> None:
    msg = make_message(From="a@example.com", To="Jürgen <jürgen@bücher.de>", Subject="grüße")
    envelope = envelope_from_message(msg)
    assert envelope.smtputf8
    assert "To: Jürgen <jürgen@bücher.de>\r\n".encode() in envelope.payload
    assert "Subject: grüße\r\n".encode() in envelope.payload
    assert b"=?utf-8?" not in header_block(envelope.payload)
    assert reflatten_7bit(envelope) is None


def test_non_ascii_domain_in_headers_is_written_as_a_label() -> None:
    msg = make_message(From="Jörg <a@bücher.de>", To="b@example.org, Grp: c@münchen.example;")
    msg["Subject"] = "s"
    envelope = envelope_from_message(msg)
    headers = header_block(envelope.payload)
    assert not envelope.smtputf8
    assert headers.isascii()
    assert b"From: =?utf-8?q?J=C3=B6rg?= <a@xn--bcher-kva.de>\r\n" in headers
    assert b"To: b@example.org, Grp: c@xn--mnchen-3ya.example;\r\n" in headers
    names = [line.split(b":")[0] for line in headers.split(b"\r\n")]
    assert names[:3] == [b"From", b"To", b"Content-Type"]  # order kept
    assert msg["From"] == "Jörg <a@bücher.de>"


def test_eight_bit_message_content() -> None:
    msg = make_message(From="a@example.com", To="b@example.org")
    assert not envelope_from_message(msg).eight_bit
    msg.set_content("naïve café\n")
    envelope = envelope_from_message(msg)
    assert envelope.eight_bit
    assert not envelope.smtputf8


# -- reflatten_7bit --------------------------------------------------------------------------


def test_reflatten_7bit_gives_ascii_payload_with_same_text() -> None:
    text = "naïve café\n.dot line\n"
    msg = make_message(From="a@example.com", To="b@example.org", Bcc="c@example.com")
    msg.set_content(text)
    before = msg.as_bytes()
    envelope = envelope_from_message(msg)
    assert envelope.eight_bit
    seven = reflatten_7bit(envelope)
    assert seven is not None
    assert seven.payload.isascii()
    assert not seven.eight_bit
    assert seven.size == len(unstuff(seven.payload))
    assert b"Bcc" not in seven.payload
    assert seven.recipients == envelope.recipients
    decoded = email.message_from_bytes(unstuff(seven.payload), policy=policy.default)
    assert isinstance(decoded, EmailMessage)
    assert decoded.get_content() == text
    assert msg.as_bytes() == before


def test_reflatten_7bit_of_raw_bytes_is_impossible() -> None:
    envelope = envelope_from_bytes("a@example.com", ["b@example.org"], b"S: x\r\n\r\n\xff\r\n")
    assert reflatten_7bit(envelope) is None


def test_reflatten_7bit_of_7bit_envelope_is_the_envelope() -> None:
    envelope = envelope_from_bytes("a@example.com", ["b@example.org"], CRLF_MESSAGE)
    assert reflatten_7bit(envelope) is envelope


def test_a_message_without_date_or_message_id_gets_both_and_the_callers_is_unchanged() -> None:
    msg = EmailMessage()
    msg["From"] = "Ann <ann@example.com>"
    msg["To"] = "bob@example.org"
    msg["Subject"] = "hi"
    msg.set_content("hello\n")
    env = envelope_from_message(msg)
    sent = email.message_from_bytes(unstuff(env.payload), policy=policy.SMTP)
    assert sent["Date"] is not None
    assert env.message_id is not None
    assert env.message_id.endswith("@example.com>")
    assert sent["Message-ID"] == env.message_id
    assert msg["Date"] is None
    assert msg["Message-ID"] is None


def test_a_message_with_date_and_message_id_keeps_them_exactly() -> None:
    msg = EmailMessage()
    msg["From"] = "ann@example.com"
    msg["To"] = "bob@example.org"
    msg["Date"] = "Mon, 02 Nov 2026 10:00:00 +0000"
    msg["Message-ID"] = "<fixed@example.com>"
    msg.set_content("hello\n")
    env = envelope_from_message(msg)
    assert env.message_id == "<fixed@example.com>"
    assert b"\r\nDate: Mon, 02 Nov 2026 10:00:00 +0000\r\n" in env.payload
    assert env.payload.count(b"Message-ID:") == 1
