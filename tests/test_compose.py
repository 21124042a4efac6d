"""compose() writes exactly the bytes the email package writes for the same EmailMessage."""

from __future__ import annotations

import copy
import email
import random
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta, timezone
from email import policy
from email.message import EmailMessage

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twistmail import (
    Address,
    AddressError,
    Attachment,
    Envelope,
    HeaderInjectionError,
    MessageError,
    compose,
    composer,
    envelope_from_message,
    mime,
)
from twistmail.address import format_mailbox, parse_address_list
from twistmail.message import reflatten_7bit, to_wire, unstuff

DATE = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)
MSGID = "<c.1@example.com>"
PDF = Attachment(b"%PDF-1.4\n" + bytes(range(256)) * 40, "application", "pdf", "report.pdf")
NOTES = Attachment(b"notes\n-- \n--===============\n.dot\n", "text", "plain", "notes.txt")


def ordinary(
    from_addr: str,
    to: str | Sequence[str] = (),
    *,
    cc: Sequence[str] = (),
    bcc: Sequence[str] = (),
    reply_to: Sequence[str] = (),
    subject: str = "",
    text: str | None = None,
    html: str | None = None,
    headers: Sequence[tuple[str, str]] = (),
    attachments: Sequence[Attachment] = (),
    date: datetime = DATE,
    message_id: str = MSGID,
) -> EmailMessage:
    """The message built the ordinary way, as compose's docstring says it is."""
    msg = EmailMessage(policy=policy.SMTP)
    msg["From"] = from_addr
    for name, value in (("To", to), ("Cc", cc), ("Bcc", bcc), ("Reply-To", reply_to)):
        if value:
            msg[name] = value if isinstance(value, str) else ", ".join(value)
    if subject:
        msg["Subject"] = subject
    for name, header in headers:
        msg[name] = header
    msg["Date"] = date
    msg["Message-ID"] = message_id
    if text is not None:
        msg.set_content(text)
        if html is not None:
            msg.add_alternative(html, subtype="html")
    else:
        msg.set_content(html, subtype="html")
    for a in attachments:
        msg.add_attachment(a.data, maintype=a.maintype, subtype=a.subtype, filename=a.filename)
    return msg


def email_package_payload(msg: EmailMessage) -> bytes:
    """What the email package writes for ``msg`` (Bcc left out), as a DATA payload."""
    shown = copy.deepcopy(msg)
    del shown["Bcc"]
    return to_wire(shown.as_bytes(policy=policy.SMTP))


def both(seed: int = 0, **parts: object) -> tuple[Envelope, EmailMessage]:
    """compose()'s envelope and the ordinary message for the same parts, ``seed`` the random
    state compose() started from (its multipart boundaries)."""
    random.seed(seed)
    composed = compose(date=DATE, message_id=MSGID, **parts)  # type: ignore[arg-type]
    random.seed(seed)
    return composed, ordinary(**parts)  # type: ignore[arg-type]


def assert_same(composed: Envelope, msg: EmailMessage, seed: int = 0) -> None:
    """``composed`` is what the email package writes for ``msg`` from the same random state."""
    pristine = copy.deepcopy(msg)  # flattening a multipart sets its boundaries
    random.seed(seed)
    assert composed.payload == email_package_payload(msg)
    random.seed(seed)
    expected = envelope_from_message(pristine)
    assert composed.payload == expected.payload
    assert composed.sender == expected.sender
    assert composed.recipients == expected.recipients
    assert composed.size == expected.size
    assert composed.eight_bit == expected.eight_bit
    assert composed.smtputf8 == expected.smtputf8
    assert composed.message_id == expected.message_id


COMMON: list[dict[str, object]] = [
    {"from_addr": "news@example.com", "to": ["ann@example.org"], "subject": "Hi", "text": "Hello"},
    {
        "from_addr": "Bench Sender <bench@sender.example>",
        "to": ["User 1 <user1@rcpt.example>"],
        "subject": "Benchmark message 1",
        "text": "Lorem ipsum dolor sit amet.\n" * 80,
    },
    {
        "from_addr": "Zoë Müller <zoe@example.com>",
        "to": ["José Núñez <jose@example.org>"],
        "cc": ["b@example.org", "Bee Two <c@example.org>"],
        "bcc": ["audit@example.com"],
        "reply_to": ["Help Desk <help@example.com>"],
        "subject": "Grüße aus Köln",
        "text": "Grüße,\n.a line that needs dot-stuffing\n" + "long " * 30 + "\n",
        "headers": [("X-Campaign", "spring-2026"), ("List-Unsubscribe", "<mailto:u@example.com>")],
    },
    {
        "from_addr": "news@example.com",
        "to": "a@example.org, b@example.org",
        "subject": "A subject long enough that the email package folds it onto a second line here",
        "text": "Hi\n",
        "html": "<p>Hi &amp; welcome</p>\n",
    },
    {"from_addr": "news@example.com", "to": ["a@example.org"], "html": "<p>Only HTML</p>"},
    {
        "from_addr": "news@example.com",
        "to": ["a@example.org"],
        "subject": "Your files",
        "text": "Attached.\n",
        "html": "<p>Attached.</p>\n",
        "attachments": [PDF, NOTES],
    },
    {
        "from_addr": "news@example.com",
        "to": ["a@example.org"],
        "html": "<p>Привет</p>\n" * 30,
        "attachments": [NOTES],
    },
]


@pytest.mark.parametrize("parts", COMMON)
def test_common_messages_are_written_directly_with_the_email_package_bytes(
    parts: dict[str, object],
) -> None:
    composed, msg = both(seed=5, **parts)
    assert_same(composed, msg, seed=5)
    # Written directly: nothing went through an EmailMessage.
    assert composed.source is None
    assert composed.rendered == composed.eight_bit


@pytest.mark.parametrize(
    "parts",
    [
        # A quoted display name, a long address list, an IDN domain, a non-ASCII local part,
        # a structured extra header, an encoded-word lookalike: the email package's path.
        {"from_addr": '"Doe, Jane" <jane@example.com>', "to": ["a@example.org"], "text": "x"},
        {"from_addr": "a@example.com", "to": [f"u{n}@example.org" for n in range(9)], "text": "x"},
        {"from_addr": "a@example.com", "to": ["ann@bücher.example"], "text": "x"},
        {"from_addr": "a@example.com", "to": ["Jörg <jörg@example.org>"], "text": "x"},
        {
            "from_addr": "a@example.com",
            "to": ["b@example.org"],
            "headers": [("Resent-Date", "Mon, 23 Nov 2026 10:00:00 +0000")],
            "text": "x",
        },
        {"from_addr": "a@example.com", "to": ["=?utf-8?q?x?= <b@example.org>"], "text": "x"},
    ],
)
def test_unusual_messages_take_the_email_package_path_with_the_same_result(
    parts: dict[str, object],
) -> None:
    composed, msg = both(**parts)  # type: ignore[arg-type]
    expected = envelope_from_message(msg)
    assert composed.payload == expected.payload
    assert (composed.sender, composed.recipients) == (expected.sender, expected.recipients)
    assert composed.smtputf8 == expected.smtputf8
    assert composed.source is not None


def test_bcc_is_sent_to_but_never_written() -> None:
    composed, _ = both(
        from_addr="a@example.com", to="b@example.org", bcc=["c@example.org"], text="x"
    )
    assert [str(r) for r in composed.recipients] == ["b@example.org", "c@example.org"]
    assert b"c@example.org" not in composed.payload


def test_date_and_message_id_are_made_when_not_given() -> None:
    before = datetime.now().astimezone().replace(microsecond=0)
    composed = compose("Ann <ann@example.com>", ["b@example.org"], text="x")
    parsed = email.message_from_bytes(unstuff(composed.payload), policy=policy.default)
    assert composed.message_id is not None
    assert composed.message_id.endswith("@example.com>")
    assert parsed["Message-ID"] == composed.message_id
    sent = parsed["Date"].datetime
    assert before <= sent <= before + timedelta(seconds=5)
    assert sent.utcoffset() == before.utcoffset()
    # Without Date and Message-ID given, both paths write them in the same place.
    quoted = compose('"Doe, Jane" <jane@example.com>', ["b@example.org"], text="x")
    assert quoted.source is not None
    fields = email.message_from_bytes(unstuff(quoted.payload), policy=policy.default).keys()
    assert fields == parsed.keys()


def test_an_8bit_message_can_still_be_sent_as_7bit() -> None:
    composed = compose("a@example.com", ["b@example.org"], text="Grüße ☃\n", date=DATE)
    assert composed.eight_bit
    seven = reflatten_7bit(composed)
    assert seven is not None
    assert seven.payload.isascii()
    parsed = email.message_from_bytes(unstuff(seven.payload), policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    assert parsed.get_content().replace("\r\n", "\n") == "Grüße ☃\n"


@pytest.mark.parametrize(
    ("parts", "field"),
    [
        ({"subject": "Hi\r\nBcc: victim@example.org"}, "Subject"),
        ({"to": ["ann@example.org\nBcc: victim@example.org"]}, "To"),
        ({"headers": [("X-Note", "a\rb")]}, "X-Note"),
        ({"headers": [("X Bad", "a")]}, "X Bad"),
    ],
)
def test_a_line_break_or_a_bad_header_name_is_refused(parts: dict[str, object], field: str) -> None:
    arguments: dict[str, object] = {"from_addr": "a@example.com", "to": ["b@example.org"]}
    with pytest.raises(HeaderInjectionError) as caught:
        compose(**{**arguments, "text": "x", **parts})  # type: ignore[arg-type]
    assert caught.value.field == field


@pytest.mark.parametrize(
    ("parts", "field", "named"),
    [
        ({"to": ["Ann <ann@@example.org>"]}, "To", "ann@@example.org"),
        ({"cc": ["ok@example.org", "bad address"]}, "Cc", "bad address"),
        ({"from_addr": "nobody"}, "From", "nobody"),
        ({"reply_to": ["x@"]}, "Reply-To", "x@"),
    ],
)
def test_an_invalid_address_is_named_with_its_header(
    parts: dict[str, object], field: str, named: str
) -> None:
    arguments: dict[str, object] = {"from_addr": "a@example.com", "to": ["b@example.org"]}
    with pytest.raises(AddressError) as caught:
        compose(**{**arguments, "text": "x", **parts})  # type: ignore[arg-type]
    assert caught.value.field == field
    assert named in str(caught.value)


@pytest.mark.parametrize(
    "parts",
    [
        {"text": None},  # no body
        {"headers": [("To", "c@example.org")]},  # given twice
        {"headers": [("Content-Type", "text/html")]},
        {"to": [], "text": "x"},  # no recipient
        {"to": [Address("b", "example.org")]},  # not a str
        {"from_addr": Address("a", "example.com")},
        {"from_addr": ["a@example.com"]},
    ],
)
def test_what_cannot_be_sent_is_a_message_error(parts: dict[str, object]) -> None:
    arguments: dict[str, object] = {"from_addr": "a@example.com", "to": ["b@example.org"]}
    with pytest.raises(MessageError):
        compose(**{"text": "x", **arguments, **parts})  # type: ignore[arg-type]


_TEXT = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=90
) | st.sampled_from(["Ann Lee", "O'Brien", "x" * 70, "a  b", " lead", "=?x?=", "é", "J. Doe"])
_LOCAL = st.from_regex(r"[a-z0-9.+_-]{1,20}", fullmatch=True)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=_TEXT,
    local=_LOCAL,
    subject=_TEXT,
    text=st.none() | _TEXT,
    html=st.none() | _TEXT,
    note=_TEXT,
    cc=st.lists(_LOCAL, max_size=3),
    attach=st.booleans(),
    quoted=st.booleans(),
    seed=st.integers(0, 2**32),
)
def test_whatever_the_parts_compose_equals_the_email_package(
    name: str,
    local: str,
    subject: str,
    text: str | None,
    html: str | None,
    note: str,
    cc: list[str],
    attach: bool,
    quoted: bool,
    seed: int,
) -> None:
    if text is None and html is None:
        text = ""
    to = format_mailbox(name, f"{local}@example.org") if quoted else f"{name} <{local}@example.org>"
    parts: dict[str, object] = {
        "from_addr": "Sender <sender@example.com>",
        "to": [to],
        "cc": [f"{c}@example.net" for c in cc],
        "subject": subject,
        "text": text,
        "html": html,
        "headers": [("X-Note", note)] if note.strip() else [],
        "attachments": [NOTES, PDF] if attach else [],
    }
    expected_error = _error_of(lambda: envelope_from_message(ordinary(**parts)))  # type: ignore[arg-type]
    random.seed(seed)
    composed_error = _error_of(lambda: compose(date=DATE, message_id=MSGID, **parts))  # type: ignore[arg-type]
    if composed_error is not None:
        assert isinstance(composed_error, MessageError)
        # Refused only when the email package refuses it too, or an address is invalid as
        # written (the email package reads some invalid ones as something else).
        assert expected_error is not None or _error_of(lambda: parse_address_list(to)) is not None
        return
    assert expected_error is None
    composed, msg = both(seed=seed, **parts)
    assert_same(composed, msg, seed=seed)


def _error_of(call: Callable[[], object]) -> Exception | None:
    """What building or converting the ordinary message raises, else None."""
    try:
        call()
    except (MessageError, ValueError, TypeError, IndexError, AttributeError) as error:
        return error
    return None


def test_an_attachment_sent_again_is_encoded_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Attachment] = []
    real = mime.encode_part

    def counted(attachment: Attachment) -> bytes:
        calls.append(attachment)
        return real(attachment)

    monkeypatch.setattr(composer, "encode_part", counted)
    monkeypatch.setattr(composer, "_parts", {})
    fresh = Attachment(b"fresh" * 100, "application", "octet-stream", "f.bin")
    for n in range(3):
        compose("a@example.com", [f"u{n}@example.org"], text="x", attachments=[fresh])
    assert calls == [fresh]


def test_a_non_utc_date_is_written_with_its_offset() -> None:
    date = datetime(2026, 11, 23, 12, 0, 0, tzinfo=timezone(timedelta(hours=-5)))
    parts: dict[str, object] = {"from_addr": "a@example.com", "to": ["b@example.org"], "text": "x"}
    composed = compose(date=date, message_id=MSGID, **parts)  # type: ignore[arg-type]
    assert_same(composed, ordinary(date=date, **parts))  # type: ignore[arg-type]
    assert b"Date: Mon, 23 Nov 2026 12:00:00 -0500\r\n" in composed.payload


@pytest.mark.parametrize(
    ("filename", "expected"),
    [
        ("report.pdf", ("application", "pdf", "report.pdf")),
        ("dir/notes.txt", ("text", "plain", "notes.txt")),
        ("archive.tar.gz", ("application", "octet-stream", "archive.tar.gz")),
        ("README", ("application", "octet-stream", "README")),
    ],
)
def test_an_attachment_named_gets_its_type_from_the_name(
    filename: str, expected: tuple[str, str, str]
) -> None:
    attachment = Attachment.named(filename, b"data")
    assert (attachment.maintype, attachment.subtype, attachment.filename) == expected
    assert attachment.data == b"data"
