"""The direct renderer writes exactly the bytes the email package path writes, or steps aside."""

from __future__ import annotations

import email
import random
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from email import contentmanager, policy
from email.message import EmailMessage
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from twistmail.errors import MessageError
from twistmail.merge import attachments
from twistmail.merge.csvsource import Row
from twistmail.merge.headers import POLICY
from twistmail.merge.prepare import Prepared, prepare_row, render_full
from twistmail.merge.template import MessageTemplate, RowError
from twistmail.merge.wire import render_direct
from twistmail.message import reflatten_7bit, unstuff
from twistmail.mime import fold_encoded, quoted_printable, text_part

DATE = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)
_ATTACHMENT_DIR = Path(tempfile.mkdtemp(prefix="twistmail-test-wire-"))
(_ATTACHMENT_DIR / "a.bin").write_bytes(bytes(range(256)) * 40)


def message_id_for(row: int, domain: str) -> str:
    return f"<campaign.{row}@{domain}>"


def both(
    source: str, values: dict[str, str], envelope_from: str | None = None, seed: int = 0
) -> tuple[Prepared | None, Prepared]:
    """Both renderings of one row; the random state (a multipart boundary) is the same."""
    template = MessageTemplate(source)
    row = Row(7, values)
    random.seed(seed)
    direct = render_direct(
        template,
        values,
        row_key=7,
        message_id_for=message_id_for,
        envelope_from=envelope_from,
        date=DATE,
    )
    random.seed(seed)
    full = render_full(template, row, message_id_for, envelope_from, DATE, 7)
    if direct is None:
        return None, full
    envelope, email, message_id = direct
    return Prepared(7, email, envelope, message_id), full


def assert_same(direct: Prepared | None, full: Prepared) -> None:
    assert direct is not None, "the direct renderer stepped aside"
    assert direct.envelope.payload == full.envelope.payload
    assert direct.envelope.sender == full.envelope.sender
    assert direct.envelope.recipients == full.envelope.recipients
    assert direct.envelope.message_id == full.envelope.message_id
    assert direct.envelope.size == full.envelope.size
    assert direct.envelope.eight_bit == full.envelope.eight_bit
    assert (direct.envelope.smtputf8, full.envelope.smtputf8) == (False, False)
    # A direct 8-bit envelope can still be rebuilt as 7-bit (from its bytes, not a message).
    assert direct.envelope.rendered == direct.envelope.eight_bit
    assert direct.email == full.email
    assert direct.message_id == full.message_id


PLAIN = (
    "From: Bench Sender <bench@sender.example>\n"
    "To: {{ name }} <{{ email }}>\n"
    "Subject: Your code {{ code }}\n"
    "\n"
    "Hello {{ name }},\n\n.a line that needs dot-stuffing\n.\nYour code is {{ code }}.\n"
)


@pytest.mark.parametrize(
    ("source", "values"),
    [
        (PLAIN, {"name": "Ann Lee", "email": "ann@example.org", "code": "X1"}),
        # Bcc is sent to but not shown; Cc before To keeps the To, Cc, Bcc recipient order.
        (
            "From: news@example.com\nCc: {{ cc }}\nTo: {{ email }}\nBcc: audit@example.com\n"
            "Reply-To: Help Desk <help@example.com>\nX-Campaign: spring-2026\n"
            "Subject: {{ subject }}\n\n{{ text }}\n",
            {
                "email": "a@example.org",
                "cc": "b@example.org, Bee Two <c@example.org>",
                "subject": "Hello (again) & welcome!",
                "text": "",
            },
        ),
        # An HTML body (escaped cells) and an empty Cc, which leaves the header out.
        (
            "From: news@example.com\nTo: {{ email }}\nCc: {{ cc }}\nContent-Type: text/html\n"
            "Subject: Hi\n\n<p>Hello {{ name }}</p>\n",
            {"email": "a@example.org", "cc": "", "name": "<Ann & Co>"},
        ),
        # A long literal header: folded once at load, and the same bytes as the full path.
        (
            "From: news@example.com\nTo: {{ email }}\n"
            "X-Long: " + "word " * 30 + "\nSubject: Hi\n\nBody\n",
            {"email": "a@example.org"},
        ),
    ],
)
def test_direct_bytes_equal_the_email_package_bytes(source: str, values: dict[str, str]) -> None:
    direct, full = both(source, values)
    assert_same(direct, full)


MARKDOWN = (
    "From: Sender <news@example.com>\nTo: {{ name|mailbox(email) }}\n"
    "Subject: Grüße, {{ name }}\nContent-Type: text/markdown\n\n"
    "# Hello {{ name }}\n\n* one & {{ code }}\n* two\n\n"
    "A line long enough to need quoted-printable, because it goes well past 78 characters.\n"
)
ATTACHED = (
    "From: news@example.com\nTo: {{ email }}\nSubject: Your file\nAttachment: a.pdf\n"
    "{{ extra }}\n\nHello {{ name }}, your file is attached.\n"
)


@pytest.mark.parametrize(
    ("source", "values"),
    [
        (PLAIN, {"name": "Jörg", "email": "j@example.org", "code": "1"}),  # RFC 2047 name
        (PLAIN, {"name": "Zoë Müller", "email": "z@example.org", "code": "1"}),
        (PLAIN, {"name": "J. Doe", "email": "j@example.org", "code": "1"}),  # quoted phrase
        (PLAIN, {"name": "Ann", "email": "a@example.org", "code": "x" * 80}),  # folded
        (PLAIN, {"name": "Ann", "email": "a@example.org", "code": "Grüße " * 20}),  # folded
        (
            "From: a@example.com\nTo: {{ name|mailbox(e) }}\nSubject: Hallo {{ name }}\n\nhi\n",
            {"e": "b@example.org", "name": "Müller, Zoë"},
        ),
        # Long lines: quoted-printable; long non-ASCII lines too; mostly non-Latin: base64.
        ("From: a@example.com\nTo: {{ e }}\n\n" + "y" * 79 + "\n", {"e": "b@example.org"}),
        ("From: a@example.com\nTo: {{ e }}\n\n" + "ü=y " * 40 + "\n", {"e": "b@example.org"}),
        ("From: a@example.com\nTo: {{ e }}\n\n" + "Привет " * 20 + "\n", {"e": "b@example.org"}),
        (
            "From: a@example.com\nTo: {{ e }}\n\n" + ("w" * 90 + " \n") * 12,
            {"e": "b@example.org"},
        ),
        (
            "From: a@example.com\nTo: {{ e }}\nContent-Type: text/html\n\n<p>"
            + "{{ name }} " * 20
            + "</p>\n",
            {"e": "b@example.org", "name": "<Zoë & Co>"},
        ),
        (
            "From: a@example.com\nTo: {{ e }}\nContent-Type: text/markdown\n\n*hi*\n",
            {"e": "b@example.org"},
        ),
        (MARKDOWN, {"email": "z@example.org", "name": "Zoë <Müller>", "code": "*x*"}),
    ],
)
def test_encoded_shapes_go_direct_with_the_email_package_bytes(
    source: str, values: dict[str, str]
) -> None:
    direct, full = both(source, values, seed=13)
    assert_same(direct, full)


@pytest.mark.parametrize(
    ("kind", "extra"),
    [
        ("plain", ""),
        ("html", "Content-Type: text/html"),
        ("markdown", "Content-Type: text/markdown"),
    ],
)
@pytest.mark.parametrize("name", ["Zoë", "Ann"])  # an 8-bit text part, a 7-bit one
def test_attachments_go_direct_with_the_email_package_bytes(
    tmp_path: Path, kind: str, extra: str, name: str
) -> None:
    (tmp_path / "a.pdf").write_bytes(b"%PDF-1.4\n" + bytes(range(256)) * 300)
    (tmp_path / "b.txt").write_bytes(b"notes\n-- \n--===============\n")
    (tmp_path / "Broschüre.pdf").write_bytes(b"%PDF-1.4\n\xff")
    more = ["Attachment: b.txt", "Attachment: Broschüre.pdf"] if kind == "plain" else []
    source = ATTACHED.replace("{{ extra }}", "\n".join(line for line in [extra, *more] if line))
    template = MessageTemplate(source, base_dir=tmp_path)
    values = {"email": "b@example.org", "name": name}
    for _ in range(2):  # the second row reuses the encoded part
        random.seed(3)
        direct = render_direct(
            template,
            values,
            row_key=7,
            message_id_for=message_id_for,
            envelope_from=None,
            date=DATE,
        )
        random.seed(3)
        full = render_full(template, Row(7, values), message_id_for, None, DATE, 7)
        assert direct is not None
        assert_same(Prepared(7, direct[1], direct[0], direct[2]), full)
        assert direct[0].eight_bit == (name != "Ann")
        assert direct[0].payload.count(b"Content-Disposition: attachment") == len(more) + 1


def test_an_attachment_is_encoded_once_per_campaign(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a.pdf").write_bytes(b"%PDF" * 1000)
    template = MessageTemplate(ATTACHED.replace("{{ extra }}", ""), base_dir=tmp_path)
    calls: list[object] = []
    real = attachments.encode_part
    monkeypatch.setattr(attachments, "encode_part", lambda a: calls.append(a) or real(a))
    for n in range(5):
        prepared = prepare_row(
            template, Row(n + 2, {"email": f"u{n}@example.org", "name": "Ann"}), message_id_for
        )
        assert isinstance(prepared, Prepared)
        assert prepared.envelope.source is None  # the direct path
    assert len(calls) == 1


def test_an_8bit_body_goes_direct_and_can_still_be_sent_as_7bit() -> None:
    source = "From: a@example.com\nTo: {{ e }}\nSubject: Hi\n\nGrüße, {{ name }} ☃\n.dot\n"
    values = {"e": "b@example.org", "name": "Jörg"}
    direct, full = both(source, values)
    assert_same(direct, full)
    assert direct is not None
    assert b"Content-Transfer-Encoding: 8bit\r\n" in direct.envelope.payload
    seven = reflatten_7bit(direct.envelope)
    assert seven is not None
    assert seven.payload.isascii()
    assert not seven.eight_bit
    parsed = email.message_from_bytes(unstuff(seven.payload), policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    # Base64 of text carries its canonical CRLF line breaks (RFC 2045, 6.8).
    assert parsed.get_content().replace("\r\n", "\n") == "Grüße, Jörg ☃\n.dot\n"
    assert parsed["Message-ID"] == direct.message_id


def test_an_8bit_multipart_goes_direct_and_can_still_be_sent_as_7bit(tmp_path: Path) -> None:
    (tmp_path / "a.pdf").write_bytes(bytes(range(256)) * 10)
    source = (
        "From: a@example.com\nTo: {{ e }}\nContent-Type: text/markdown\nAttachment: a.pdf\n\n"
        "# Grüße, {{ name }}\n"
    )
    template = MessageTemplate(source, base_dir=tmp_path)
    values = {"e": "b@example.org", "name": "Jörg"}
    direct = render_direct(
        template, values, row_key=7, message_id_for=message_id_for, envelope_from=None, date=DATE
    )
    assert direct is not None
    envelope = direct[0]
    assert envelope.eight_bit
    seven = reflatten_7bit(envelope)
    assert seven is not None
    assert seven.payload.isascii()
    parsed = email.message_from_bytes(unstuff(seven.payload), policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    text, html, attached = (part.get_content() for part in parsed.walk() if not part.is_multipart())
    assert text.replace("\r\n", "\n") == "# Grüße, Jörg\n"
    assert "<h1>Grüße, Jörg</h1>" in html
    assert attached == bytes(range(256)) * 10


def test_envelope_from_overrides_the_sender_in_both_paths() -> None:
    direct, full = both(
        PLAIN, {"name": "Ann", "email": "ann@example.org", "code": "1"}, "bounces@example.com"
    )
    assert_same(direct, full)
    assert direct is not None
    assert str(direct.envelope.sender) == "bounces@example.com"


@pytest.mark.parametrize(
    ("source", "values"),
    [
        (PLAIN, {"name": "Ann", "email": "ann@bücher.example", "code": "1"}),  # IDN domain
        (PLAIN, {"name": "Ann", "email": "a@example.org", "code": "=?utf-8?q?hi?="}),
        # An encoded-word lookalike as a display name: the email package decodes it.
        ("From: a@example.com\nTo: {{ to }}\n\nhi\n", {"to": "=?utf-8?q?x?= <a@example.org>"}),
        # A long address header with quotes: the full path checks Python 3.11's folding bug.
        (
            "From: a@example.com\nTo: {{ name|mailbox(e) }}\n\nhi\n",
            {"e": "b@example.org", "name": "J. Doe" + " Smith" * 12},
        ),
        # A non-ASCII local part needs SMTPUTF8.
        (PLAIN, {"name": "Ann", "email": "jörg@example.org", "code": "1"}),
    ],
)
def test_anything_unusual_takes_the_full_path(source: str, values: dict[str, str]) -> None:
    direct, full = both(source, values)
    assert direct is None
    assert full.envelope.payload  # and the full path still sends it


def test_row_errors_are_the_same_as_the_full_path() -> None:
    template = MessageTemplate(PLAIN)
    values = {"name": "Ann\r\nBcc: victim@example.org", "email": "a@example.org", "code": "1"}
    with pytest.raises(RowError) as direct_error:
        render_direct(
            template,
            values,
            row_key=3,
            message_id_for=message_id_for,
            envelope_from=None,
            date=DATE,
        )
    with pytest.raises(RowError) as full_error:
        render_full(template, Row(3, values), message_id_for, None, DATE, 3)
    assert str(direct_error.value) == str(full_error.value)
    assert direct_error.value.field == "To"


def test_prepare_row_takes_the_direct_path_for_a_plain_row() -> None:
    template = MessageTemplate(PLAIN)
    prepared = prepare_row(
        template, Row(1, {"name": "Ann", "email": "a@example.org", "code": "1"}), message_id_for
    )
    assert isinstance(prepared, Prepared)
    # Only the email package path keeps the EmailMessage (for a 7-bit re-rendering).
    assert prepared.envelope.source is None


_CELL = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=90
) | st.sampled_from(["Ann Lee", "O'Brien", "x" * 70, "a  b", " lead", "trail ", "=?x?=", "é"])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=_CELL,
    subject=_CELL,
    text=_CELL,
    code=_CELL,
    kind=st.sampled_from(["text/plain", "text/html", "text/markdown"]),
    attach=st.booleans(),
    seed=st.integers(0, 2**32),
)
def test_whenever_the_direct_path_answers_any_shape_matches_the_full_path(
    name: str, subject: str, text: str, code: str, kind: str, attach: bool, seed: int
) -> None:
    source = (
        "From: Sender <sender@example.com>\nTo: {{ name|mailbox('r@example.org') }}\n"
        f"Subject: {{{{ subject }}}}\nContent-Type: {kind}\n"
        + ("Attachment: a.bin\n" if attach else "")
        + "\n{{ text }}\n"
        + "Your code: {{ code }} "
        + "and some words to make this line long " * 3
        + "\nBye\n"
    )
    values = {"name": name, "subject": subject, "text": text, "code": code}
    template = MessageTemplate(source, base_dir=_ATTACHMENT_DIR)
    full_error = _error_of(
        lambda: render_full(template, Row(7, values), message_id_for, None, DATE, 7)
    )
    if full_error is not None:
        answer: list[object] = []
        direct_error = _error_of(
            lambda: answer.append(
                render_direct(
                    template,
                    values,
                    row_key=7,
                    message_id_for=message_id_for,
                    envelope_from=None,
                    date=DATE,
                )
            )
        )
        if direct_error is None:
            assert answer == [None]
        else:
            assert str(direct_error) == full_error
        return
    random.seed(seed)
    direct = render_direct(
        template, values, row_key=7, message_id_for=message_id_for, envelope_from=None, date=DATE
    )
    random.seed(seed)
    full = render_full(template, Row(7, values), message_id_for, None, DATE, 7)
    if direct is not None:
        assert_same(Prepared(7, direct[1], direct[0], direct[2]), full)
    else:
        assert full.envelope.payload


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=_CELL,
    subject=_CELL,
    text=_CELL,
    local=st.from_regex(r"[a-z0-9.+_-]{1,20}", fullmatch=True),
)
def test_whenever_the_direct_path_answers_it_matches_the_full_path(
    name: str, subject: str, text: str, local: str
) -> None:
    source = (
        "From: Sender <sender@example.com>\nTo: {{ name }} <{{ email }}>\n"
        "Subject: {{ subject }}\n\n{{ text }}\nBye\n"
    )
    values = {"name": name, "email": f"{local}@example.org", "subject": subject, "text": text}
    template = MessageTemplate(source)
    full_error = _error_of(
        lambda: render_full(template, Row(7, values), message_id_for, None, DATE, 7)
    )
    if full_error is not None:
        # A row the full path refuses is refused the same way (or handed back) by the direct one.
        answer: list[object] = []
        direct_error = _error_of(
            lambda: answer.append(
                render_direct(
                    template,
                    values,
                    row_key=7,
                    message_id_for=message_id_for,
                    envelope_from=None,
                    date=DATE,
                )
            )
        )
        if direct_error is None:
            assert answer == [None]
        else:
            assert str(direct_error) == full_error
        return
    direct, full = both(source, values)
    if direct is not None:
        assert_same(direct, full)


def _error_of(call: Callable[[], object]) -> str | None:
    """The message of the RowError or MessageError ``call`` raises, else None."""
    try:
        call()
    except (RowError, MessageError) as error:
        return str(error)
    return None


def piece_by_piece(template: MessageTemplate, values: dict[str, str]) -> object:
    context = template.context(values)
    try:
        return list(template.header_values(context)), template.render_body(context)
    except RowError as e:
        return str(e)


def at_once(template: MessageTemplate, values: dict[str, str]) -> object:
    context = template.context(values)
    try:
        header_values, body = template.render_row(context)
        return list(header_values), body if body is not None else template.render_body(context)
    except RowError as e:
        return str(e)


@pytest.mark.parametrize(
    "values",
    [
        {"name": "Ann", "email": "a@example.org", "code": "1"},
        {"name": "Ann", "email": "a@example.org", "code": "1\x002"},  # NUL in the body
        {"name": "A\x00nn", "email": "a@example.org", "code": "1"},  # NUL in a header
        {"name": "Ann", "email": "a@example.org"},  # no code: undefined in the body
        {"name": "Ann\nBcc: x@example.org", "email": "a@example.org", "code": "1"},
    ],
)
def test_a_row_rendered_at_once_equals_the_row_rendered_piece_by_piece(
    values: dict[str, str],
) -> None:
    template = MessageTemplate(PLAIN)
    assert template._joined is not None  # the case under test: headers and body in one render
    assert at_once(template, values) == piece_by_piece(template, values)


def test_a_set_statement_in_one_header_does_not_reach_another() -> None:
    template = MessageTemplate(
        "From: a@example.com\nTo: {{ email }}\nSubject: {% set x = 'leaked' %}hi\n"
        "X-Note: {{ x | default('none') }}\n\nbody\n"
    )
    values, _ = template.render_row(template.context({"email": "b@example.org"}))
    assert [(h.name, v) for h, v in list(values)][-2:] == [("Subject", "hi"), ("X-Note", "none")]


_WORD = st.sampled_from(
    ["Zoë", "Müller", "Ann", "0", "Grüße,", "Иван", "Łukasz", "日本", "a:b", "ß"]
) | (
    st.text(
        alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Zs", "Cc")), max_size=12
    )
)


@settings(max_examples=1000, deadline=None)
@given(
    words=st.lists(_WORD, min_size=1, max_size=8),
    name=st.sampled_from(["Subject", "To", "From", "Reply-To", "X-Note"]),
    quoted=st.booleans(),
    spaces=st.sampled_from([" ", "  ", "\t"]),
)
def test_encoded_words_built_directly_are_the_email_package_fold(
    words: list[str], name: str, quoted: bool, spaces: str
) -> None:
    phrase = (" " if spaces == " " else spaces).join(words)
    if name in ("To", "From", "Reply-To"):
        value = (f'"{phrase}"' if quoted else phrase) + " <zoe@example.org>"
    else:
        value = phrase
    fast = fold_encoded(name, name.lower(), value)
    if fast is None:
        return
    assert fast == POLICY.header_factory(name, value).fold(policy=POLICY)


@settings(max_examples=1000, deadline=None)
@given(
    head=st.lists(st.sampled_from(["Re:", "Ihr", "Code", "a" * 20]), max_size=3),
    encoded=st.lists(
        st.sampled_from(["Grüße,", "Zoë", "Иван Петров", "日本", "Ødegård"]), min_size=1, max_size=3
    ),
    tail=st.lists(st.text(st.sampled_from("abc0:,.-"), min_size=1, max_size=30), max_size=12),
)
def test_plain_words_after_the_encoded_ones_fold_as_the_email_package_folds_them(
    head: list[str], encoded: list[str], tail: list[str]
) -> None:
    value = " ".join([*head, *encoded, *tail])
    fast = fold_encoded("Subject", "subject", value)
    if fast is None:
        return
    assert fast == POLICY.header_factory("Subject", value).fold(policy=POLICY)


def test_the_direct_fold_answers_the_common_names() -> None:
    for value, name in [
        ("Grüße, Zoë Müller 12: Ihr Code C000000012", "Subject"),
        ("Grüße, Иван Петров 12: Ihr Code C000000012", "Subject"),  # folded after the word
        ('"Zoë Müller 12" <user12@example.org>', "To"),
        ("José Núñez <jose@example.org>", "To"),
    ]:
        fast = fold_encoded(name, name.lower(), value)
        assert fast is not None
        assert fast == POLICY.header_factory(name, value).fold(policy=POLICY)


# Lines around the 76-character soft breaks of quoted-printable, with "=", spaces and tabs at
# the ends, non-ASCII, and line separators that are not line ends in bytes (a lone CR is).
_QP_LINE = st.one_of(
    st.text(st.sampled_from(["a", "b", " ", "\t", "="]), max_size=170),
    st.text(
        st.sampled_from(["a"] * 30 + [" ", "\t", "=", "é", "\x0b", "\x85", "\r"]), max_size=170
    ),
    st.text(
        st.sampled_from(["a", " ", "\t", "=", "é", "€", "\x0b", "\x85", "\u2028", "\r"]),
        max_size=170,
    ),
)


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(lines=st.lists(_QP_LINE, min_size=1, max_size=14), kind=st.sampled_from(["plain", "html"]))
@example(lines=["a" * 100] * 12, kind="plain")  # more than the ten lines sniffed
@example(lines=["a" * 74 + "é" + "a" * 20] + [f"{'b' * n} " for n in range(72, 80)], kind="html")
# Where the choice turns: base64 by one octet, a tie (quoted-printable), and by one octet.
@example(lines=["é" * 7 + "a" * 65], kind="plain")
@example(lines=["é" * 7 + "a" * 68], kind="plain")
@example(lines=["é" * 7 + "a" * 71], kind="plain")
def test_long_lines_are_encoded_as_the_email_package_encodes_them(
    lines: list[str], kind: str
) -> None:
    body = "\n".join(lines) + "\n"
    cte, data = contentmanager._encode_text(body, "utf-8", None, POLICY)  # type: ignore[attr-defined]
    headers, encoded = text_part(kind, body)
    assert headers.endswith(f"Content-Transfer-Encoding: {cte}\r\n".encode())
    assert encoded == data.encode("ascii", "surrogateescape").replace(b"\n", b"\r\n")
    # Every quoted-printable body is written without the email package's encoder call.
    fast = quoted_printable(body.encode().splitlines())
    assert (fast is not None) == (cte == "quoted-printable") or cte in ("7bit", "8bit")
