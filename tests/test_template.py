"""Tests for twistmail.merge.template: rendering one message per CSV row, safely."""

from __future__ import annotations

import email
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twistmail.errors import TwistmailError
from twistmail.merge.template import MessageTemplate, Rendered, RowError, TemplateError
from twistmail.message import envelope_from_message

PLAIN = """\
From: Sender <sender@example.com>
To: {{ name }} <{{ email }}>
Subject: Hello {{ name }}

Dear {{ name }},
your code is {{ code }}.
"""

ROW = {"name": "Ann", "email": "ann@example.org", "code": "42"}

# Every character str.splitlines() breaks on, plus NUL.
LINE_BREAKS = "\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029\x00"


def load(tmp_path: Path, text: str, name: str = "message.tpl") -> MessageTemplate:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return MessageTemplate.load(path)


def render(template: MessageTemplate, row: dict[str, str], message_id: str = "<m1@ex>") -> Rendered:
    return template.render(row, message_id=message_id)


def sent_bytes(msg: EmailMessage) -> bytes:
    return envelope_from_message(msg).payload


def header_block(payload: bytes) -> bytes:
    return payload.split(b"\r\n\r\n", 1)[0]


def header_names(payload: bytes) -> list[bytes]:
    return [
        line.split(b":", 1)[0]
        for line in header_block(payload).split(b"\r\n")
        if line and line[:1] not in (b" ", b"\t")
    ]


# -- loading ---------------------------------------------------------------------------------


def test_variables_and_header_names(tmp_path: Path) -> None:
    template = load(tmp_path, PLAIN)
    assert template.variables == frozenset({"name", "email", "code"})
    assert template.header_names == ("From", "To", "Subject")
    assert template.kind == "plain"


def test_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    text = "From: a@example.com\nTo: {{ email }}\n\nline 4\nline 5 {% endfor %}\nline 6\n"
    with pytest.raises(TemplateError) as info:
        load(tmp_path, text)
    message = str(info.value)
    assert str(tmp_path / "message.tpl") in message
    assert "line 5" in message
    assert isinstance(info.value, TwistmailError)


def test_syntax_error_in_header_names_its_line(tmp_path: Path) -> None:
    text = "From: a@example.com\nTo: b@example.com\nSubject: {% if x %}\n\nbody\n"
    with pytest.raises(TemplateError, match=r"line 3"):
        load(tmp_path, text)


def test_block_spanning_headers_is_refused_with_its_line(tmp_path: Path) -> None:
    text = "From: a@example.com\nTo: {% if x %}b@example.com\nCc: {% endif %}\n\nbody\n"
    with pytest.raises(TemplateError, match=r"line 2"):
        load(tmp_path, text)


def test_malformed_header_line_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match=r"line 2: expected a header line"):
        load(tmp_path, "From: a@example.com\nnot a header\nTo: b@example.com\n\nbody\n")


def test_template_needs_from_and_a_recipient(tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match="no From header"):
        load(tmp_path, "To: b@example.com\n\nbody\n")
    with pytest.raises(TemplateError, match="no To, Cc or Bcc"):
        load(tmp_path, "From: a@example.com\nSubject: x\n\nbody\n")


def test_reserved_and_repeated_headers_are_refused(tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match=r"line 3: Message-ID is set by twistmail"):
        load(tmp_path, "From: a@example.com\nTo: b@example.com\nMessage-ID: <x@y>\n\nbody\n")
    with pytest.raises(TemplateError, match=r"line 3: Subject may appear only once"):
        load(tmp_path, "From: a@example.com\nSubject: a\nSubject: b\nTo: b@example.com\n\nb\n")


def test_literal_bad_address_is_a_template_error(tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match=r"line 1: .*From"):
        load(tmp_path, "From: not an address\nTo: {{ email }}\n\nbody\n")


def test_unknown_content_type_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match=r"line 3: Content-Type 'image/png'"):
        load(tmp_path, "From: a@example.com\nTo: b@example.com\nContent-Type: image/png\n\nx\n")


def test_check_columns_names_missing_variables_and_lines(tmp_path: Path) -> None:
    template = load(tmp_path, PLAIN)
    template.check_columns(["name", "email", "code", "extra"])  # no error
    with pytest.raises(TemplateError) as info:
        template.check_columns(["name"])
    missing, columns = str(info.value).split("The columns are: ")
    assert "'code' (line 6)" in missing
    assert "'email' (line 2)" in missing
    assert "'name'" not in missing
    assert columns == "'name'"


def test_loop_and_set_variables_are_not_columns(tmp_path: Path) -> None:
    text = (
        "From: a@example.com\nTo: {{ email }}\n\n"
        "{% set greeting = 'Hi' %}{{ greeting }}{% for i in range(2) %}{{ i }}{% endfor %}\n"
    )
    assert load(tmp_path, text).variables == frozenset({"email"})


def test_bom_and_crlf_template_file(tmp_path: Path) -> None:
    path = tmp_path / "crlf.tpl"
    path.write_bytes(b"\xef\xbb\xbfFrom: a@example.com\r\nTo: {{ email }}\r\n\r\nHi\r\n")
    template = MessageTemplate.load(path)
    assert template.header_names == ("From", "To")
    msg = render(template, {"email": "b@example.com"}).message
    assert msg.get_content() == "Hi\n"


# -- rendering -------------------------------------------------------------------------------


def test_plain_render(tmp_path: Path) -> None:
    rendered = render(load(tmp_path, PLAIN), ROW)
    msg = rendered.message
    assert rendered.email == "ann@example.org"
    assert msg["To"] == "Ann <ann@example.org>"
    assert msg["Subject"] == "Hello Ann"
    assert msg.get_content_type() == "text/plain"
    assert msg.get_content() == "Dear Ann,\nyour code is 42.\n"
    assert msg["Date"] is not None
    # policy.SMTP's settings: rendering with it changes nothing.
    assert msg.as_bytes() == msg.as_bytes(policy=policy.SMTP)
    assert msg.policy.linesep == "\r\n"
    assert not msg.policy.utf8


def test_stable_message_id_and_date_are_honoured(tmp_path: Path) -> None:
    template = load(tmp_path, PLAIN)
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    first = template.render(ROW, message_id="<row-1.abc@example.com>", date=when)
    again = template.render(ROW, message_id="<row-1.abc@example.com>", date=when)
    payload = sent_bytes(first.message)
    assert envelope_from_message(first.message).message_id == "<row-1.abc@example.com>"
    assert b"Date: Fri, 02 Jan 2026 03:04:05 +0000\r\n" in payload
    assert sent_bytes(again.message) == payload
    bare = template.render(ROW, message_id="row-2@example.com")
    assert bare.message["Message-ID"] == "<row-2@example.com>"


def test_missing_variable_in_row_is_a_row_error(tmp_path: Path) -> None:
    template = load(tmp_path, PLAIN)
    with pytest.raises(RowError) as info:
        render(template, {"name": "Ann", "email": "ann@example.org"})
    assert info.value.field is None  # the body
    assert "'code'" in info.value.reason
    assert "line 6" in info.value.reason
    with pytest.raises(RowError) as info:
        render(template, {"email": "ann@example.org", "code": "1"})
    assert info.value.field == "To"


def test_bad_address_names_the_field(tmp_path: Path) -> None:
    template = load(tmp_path, PLAIN + "")
    with pytest.raises(RowError) as info:
        render(template, {**ROW, "email": "not-an-address"})
    assert info.value.field == "To"
    assert "not-an-address" in str(info.value)

    cc = load(tmp_path, "From: a@example.com\nTo: b@example.com\nCc: {{ cc }}\n\nx\n", "cc.tpl")
    with pytest.raises(RowError) as info:
        render(cc, {"cc": "c@example.com, broken@"})
    assert info.value.field == "Cc"


def test_no_from_and_no_recipient_are_row_errors(tmp_path: Path) -> None:
    template = load(tmp_path, "From: {{ sender }}\nTo: {{ to }}\nCc: {{ cc }}\n\nbody\n")
    with pytest.raises(RowError) as info:
        render(template, {"sender": "", "to": "b@example.com", "cc": ""})
    assert info.value.field == "From"
    with pytest.raises(RowError) as info:
        render(template, {"sender": "a@example.com", "to": " ", "cc": ""})
    assert info.value.field == "To"
    assert "no recipient" in info.value.reason


def test_empty_optional_header_is_left_out(tmp_path: Path) -> None:
    template = load(tmp_path, "From: a@example.com\nTo: {{ to }}\nCc: {{ cc }}\n\nbody\n")
    without = render(template, {"to": "", "cc": "c@example.com"})
    assert "To" not in without.message
    assert without.email == "c@example.com"  # reported under the first recipient there is
    with_cc = render(template, {"to": "b@example.com", "cc": "c@example.com"})
    assert with_cc.message["Cc"] == "c@example.com"


@pytest.mark.parametrize("breaker", list(LINE_BREAKS))
@pytest.mark.parametrize("header", ["To", "Subject", "X-Campaign", "Reply-To"])
def test_line_break_in_a_cell_is_refused(tmp_path: Path, header: str, breaker: str) -> None:
    text = f"From: a@example.com\nTo: b@example.com\n{header}: {{{{ cell }}}}\n\nbody\n"
    if header == "To":
        text = "From: a@example.com\nTo: {{ cell }}\n\nbody\n"
    template = load(tmp_path, text)
    with pytest.raises(RowError) as info:
        render(template, {"cell": f"x@example.com{breaker}Bcc: evil@example.net"})
    assert info.value.field == header


def test_crlf_injection_example_from_the_brief(tmp_path: Path) -> None:
    template = load(tmp_path, PLAIN)
    with pytest.raises(RowError) as info:
        render(template, {**ROW, "name": "x\r\nBcc: evil@x"})
    assert info.value.field == "To"  # the first header that uses it


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    cell=st.text(st.sampled_from(list(LINE_BREAKS) + list("ab :;,<>@\"'\t=?é")), max_size=30)
    | st.text(max_size=30),
    header=st.sampled_from(["Subject", "X-Tag", "Reply-To", "To"]),
)
def test_header_cells_never_add_header_lines(cell: str, header: str) -> None:
    text = f"From: a@example.com\nTo: b@example.com\n{header}: {{{{ cell }}}}\n\nbody\n"
    if header == "To":
        text = "From: a@example.com\nTo: b@example.com, {{ cell }}\n\nbody\n"
    template = MessageTemplate(text)
    if any(char in cell for char in LINE_BREAKS):
        with pytest.raises(RowError) as info:
            template.render({"cell": cell}, message_id="<p@example.com>")
        assert info.value.field == header
        return
    refused: RowError | None = None
    try:
        rendered = template.render({"cell": cell}, message_id="<p@example.com>")
    except RowError as exc:
        refused = exc
    if refused is not None:  # without a line break, only an address header may refuse a cell
        assert header in ("To", "Reply-To")
        assert refused.field == header
        return
    payload = sent_bytes(rendered.message)
    expected = {b"From", b"To", b"Date", b"Message-ID", b"MIME-Version", b"Content-Type"}
    expected |= {b"Content-Transfer-Encoding"}
    if header != "To" and cell.strip():
        expected.add(header.encode())
    names = header_names(payload)
    assert set(names) == expected
    assert len(names) == len(set(names))
    reparsed = email.message_from_bytes(payload, policy=policy.SMTP)
    assert reparsed["Bcc"] is None


def test_body_cells_with_line_breaks_stay_in_the_body(tmp_path: Path) -> None:
    template = load(tmp_path, PLAIN)
    rendered = render(template, {**ROW, "code": "1\r\n\r\nBcc: evil@example.net\n"})
    payload = sent_bytes(rendered.message)
    assert b"Bcc" not in header_block(payload)
    assert envelope_from_message(rendered.message).recipients[0].local == "ann"
    assert len(envelope_from_message(rendered.message).recipients) == 1


def test_non_ascii_subject_and_name_are_rfc2047_encoded(tmp_path: Path) -> None:
    template = load(tmp_path, PLAIN)
    rendered = render(template, {**ROW, "name": "Zoë Ärger"})
    payload = sent_bytes(rendered.message)
    headers = header_block(payload)
    assert headers.isascii()
    assert b"=?utf-8?" in headers
    lines = {
        line.split(b":", 1)[0]: line for line in headers.replace(b"\r\n ", b" ").split(b"\r\n")
    }
    assert b"=?utf-8?" in lines[b"Subject"]
    assert b"=?utf-8?" in lines[b"To"]
    assert b"<ann@example.org>" in lines[b"To"]
    reparsed = email.message_from_bytes(payload, policy=policy.SMTP)
    assert reparsed["Subject"] == "Hello Zoë Ärger"
    assert reparsed["To"].addresses[0].display_name == "Zoë Ärger"


def test_non_ascii_local_part_needs_smtputf8(tmp_path: Path) -> None:
    rendered = render(load(tmp_path, PLAIN), {**ROW, "email": "zoë@example.org"})
    envelope = envelope_from_message(rendered.message)
    assert envelope.smtputf8
    assert rendered.email == "zoë@example.org"


def test_bcc_is_kept_for_the_envelope_and_stripped_from_the_payload(tmp_path: Path) -> None:
    template = load(tmp_path, "From: a@example.com\nTo: {{ email }}\nBcc: {{ audit }}\n\nbody\n")
    rendered = render(template, {"email": "b@example.com", "audit": "audit@example.net"})
    assert rendered.message["Bcc"] == "audit@example.net"
    envelope = envelope_from_message(rendered.message)
    assert [str(address) for address in envelope.recipients] == [
        "b@example.com",
        "audit@example.net",
    ]
    assert b"Bcc" not in header_block(envelope.payload)
    assert b"audit@example.net" not in envelope.payload


def test_html_body(tmp_path: Path) -> None:
    text = (
        "From: a@example.com\nTo: {{ email }}\nContent-Type: text/html; charset=utf-8\n\n"
        "<p>Hi {{ name }}</p>\n"
    )
    template = load(tmp_path, text)
    assert template.kind == "html"
    msg = render(template, {"email": "b@example.com", "name": "Bo"}).message
    assert msg.get_content_type() == "text/html"
    assert not msg.is_multipart()
    assert msg.get_content() == "<p>Hi Bo</p>\n"
    assert "text/markdown" not in str(msg)


def test_html_body_escapes_cells_but_not_the_template(tmp_path: Path) -> None:
    text = "From: a@example.com\nTo: {{ email }}\nContent-Type: text/html\n\n<b>{{ name }}</b>\n"
    template = load(tmp_path, text)
    row = {"email": "b@example.com", "name": "<script>x()</script> & Co"}
    msg = render(template, row).message
    assert msg.get_content() == "<b>&lt;script&gt;x()&lt;/script&gt; &amp; Co</b>\n"


def test_markdown_body_is_multipart_alternative(tmp_path: Path) -> None:
    text = (
        "From: a@example.com\nTo: {{ email }}\nContent-Type: text/markdown\n\n"
        "# Hello {{ name }}\n\n* one\n* **two**\n"
    )
    template = load(tmp_path, text)
    assert template.kind == "markdown"
    msg = render(template, {"email": "b@example.com", "name": "Bo"}).message
    assert msg.get_content_type() == "multipart/alternative"
    plain, html = msg.iter_parts()
    assert isinstance(plain, EmailMessage)
    assert isinstance(html, EmailMessage)
    assert plain.get_content_type() == "text/plain"
    assert plain.get_content() == "# Hello Bo\n\n* one\n* **two**\n"
    assert html.get_content_type() == "text/html"
    assert "<h1>Hello Bo</h1>" in html.get_content()
    assert "<strong>two</strong>" in html.get_content()
    payload = sent_bytes(msg)
    assert b"text/markdown" not in payload


def test_markdown_state_does_not_leak_between_rows(tmp_path: Path) -> None:
    # A statement makes the body converted row by row (see twistmail.merge.markdownhtml).
    text = (
        "From: a@example.com\nTo: {{ email }}\nContent-Type: text/markdown\n\n"
        "Hello\n\n{% if note %}x[^1]\n\n[^1]: {{ note }}{% endif %}\n"
    )
    template = load(tmp_path, text)
    first = render(template, {"email": "b@example.com", "note": "footnote one"})
    second = render(template, {"email": "c@example.com", "note": ""})
    html = list(second.message.iter_parts())[1]
    assert isinstance(html, EmailMessage)
    assert "footnote one" not in html.get_content()
    assert "footnote one" in list(first.message.iter_parts())[1].get_payload(decode=True).decode()


def test_attachments_are_attached_and_the_pseudo_header_is_not_sent(tmp_path: Path) -> None:
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "Ann.pdf").write_bytes(b"%PDF-1.4 ann")
    (tmp_path / "terms.txt").write_bytes(b"terms")
    (tmp_path / "blob.zzz-unknown").write_bytes(b"\x00\x01")
    text = (
        "From: a@example.com\nTo: {{ email }}\nAttachment: files/{{ name }}.pdf\n"
        "Attachment: terms.txt\nAttachment: blob.zzz-unknown\nSubject: s\n\nbody\n"
    )
    template = load(tmp_path, text)
    assert "Attachment" not in template.header_names
    msg = render(template, ROW).message
    assert msg.get_content_type() == "multipart/mixed"
    attachments = list(msg.iter_attachments())
    assert [part.get_filename() for part in attachments] == [
        "Ann.pdf",
        "terms.txt",
        "blob.zzz-unknown",
    ]
    assert [part.get_content_type() for part in attachments] == [
        "application/pdf",
        "text/plain",
        "application/octet-stream",
    ]
    assert attachments[0].get_payload(decode=True) == b"%PDF-1.4 ann"
    assert b"Attachment:" not in sent_bytes(msg)


def test_attachment_bytes_are_read_once(tmp_path: Path) -> None:
    (tmp_path / "terms.txt").write_bytes(b"first")
    template = load(
        tmp_path, "From: a@example.com\nTo: b@example.com\nAttachment: terms.txt\n\nx\n"
    )
    render(template, {})
    (tmp_path / "terms.txt").write_bytes(b"changed")
    part = next(render(template, {}).message.iter_attachments())
    assert part.get_payload(decode=True) == b"first"


def test_missing_attachment_names_the_path(tmp_path: Path) -> None:
    template = load(
        tmp_path, "From: a@example.com\nTo: {{ email }}\nAttachment: files/{{ name }}.pdf\n\nx\n"
    )
    with pytest.raises(RowError) as info:
        render(template, ROW)
    assert info.value.field == "Attachment"
    assert str(tmp_path / "files" / "Ann.pdf") in info.value.reason


def test_templated_attachment_cannot_leave_the_template_directory(tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_bytes(b"secret")
    inner = tmp_path / "campaign"
    inner.mkdir()
    template = load(inner, "From: a@example.com\nTo: b@example.com\nAttachment: {{ file }}\n\nx\n")
    for path in ("../secret.txt", str(tmp_path / "secret.txt")):
        with pytest.raises(RowError, match="outside the template's directory"):
            render(template, {"file": path})
    literal = load(
        inner, "From: a@example.com\nTo: b@example.com\nAttachment: ../secret.txt\n\nx\n"
    )
    assert next(render(literal, {}).message.iter_attachments()).get_filename() == "secret.txt"


def test_empty_attachment_value_attaches_nothing(tmp_path: Path) -> None:
    template = load(tmp_path, "From: a@example.com\nTo: b@example.com\nAttachment: {{ f }}\n\nx\n")
    msg = render(template, {"f": ""}).message
    assert not msg.is_multipart()


def test_folded_header_in_template(tmp_path: Path) -> None:
    template = load(
        tmp_path, "From: a@example.com\nTo: b@example.com\nSubject: part one\n  {{ rest }}\n\nx\n"
    )
    assert render(template, {"rest": "two"}).message["Subject"] == "part one two"


def test_filter_misuse_is_a_row_error(tmp_path: Path) -> None:
    template = load(tmp_path, "From: a@example.com\nTo: b@example.com\n\n{{ n + 1 }}\n")
    with pytest.raises(RowError) as info:
        render(template, {"n": "1"})
    assert info.value.field is None


def test_unreadable_or_non_utf8_template_file(tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match="cannot read the template"):
        MessageTemplate.load(tmp_path / "missing.tpl")
    path = tmp_path / "latin1.tpl"
    path.write_bytes(b"From: a@example.com\nTo: b@example.com\n\nGr\xfc\xdfe\n")
    with pytest.raises(TemplateError, match=r"not valid UTF-8 at byte 41"):
        MessageTemplate.load(path)


def test_a_phrase_the_email_package_cannot_parse_is_a_row_error_naming_the_header() -> None:
    # ". <a@b>" passes our address parser but makes the email package raise AttributeError.
    template = MessageTemplate("From: a@example.com\nTo: {{ name }} <{{ email }}>\n\nHi\n")
    with pytest.raises(RowError) as info:
        render(template, {"name": ".", "email": "x@example.org"})
    assert info.value.field == "To"
    assert "invalid header value" in str(info.value)
