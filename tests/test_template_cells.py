"""Cells as people write them: markup, NUL, display names with commas and quotes, spreadsheet
column headers (issue 12, sections 3 and 4)."""

from __future__ import annotations

import email
from email import policy
from email.message import EmailMessage

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from twistmail.address import format_display_name, format_mailbox, mailbox_key
from twistmail.errors import AddressError
from twistmail.merge.csvsource import Row
from twistmail.merge.prepare import Prepared, Problem, prepare_row, preview_message_id
from twistmail.merge.template import MessageTemplate, RowError, TemplateError
from twistmail.message import envelope_from_message, unstuff


def reparsed(msg: EmailMessage) -> EmailMessage:
    """The message as a receiver reads it from the bytes sent."""
    data = unstuff(envelope_from_message(msg).payload)
    parsed = email.message_from_bytes(data, policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


# -- Markdown: cells are escaped in the HTML part --------------------------------------------

MARKDOWN = """\
From: a@example.com
To: {{ email }}
Subject: hi
Content-Type: text/markdown

Hello **{{ name }}**, see <b>this</b> & {{ note }}.
"""


def test_markdown_cells_are_html_escaped_in_the_html_part_only() -> None:
    template = MessageTemplate(MARKDOWN)
    row = {"email": "a@example.org", "name": "<script>alert(1)</script>", "note": "a & b < c"}
    msg = reparsed(template.render(row, message_id="m@x").message)
    plain = msg.get_body(("plain",))
    html = msg.get_body(("html",))
    assert plain is not None
    assert html is not None
    html_text = html.get_content()
    assert "<script>" not in html_text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html_text
    assert "a &amp; b &lt; c" in html_text
    # The template's own markup and Markdown still make HTML.
    assert "<strong>" in html_text
    assert "<b>this</b>" in html_text
    assert "<script>alert(1)</script>" in plain.get_content()
    assert "a & b < c" in plain.get_content()


def test_markdown_safe_filter_opts_out_of_escaping() -> None:
    template = MessageTemplate(MARKDOWN.replace("{{ note }}", "{{ note|safe }}"))
    row = {"email": "a@example.org", "name": "x", "note": "<i>trusted</i>"}
    html = reparsed(template.render(row, message_id="m@x").message).get_body(("html",))
    assert html is not None
    assert "<i>trusted</i>" in html.get_content()


# -- NUL in the body -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["text/plain", "text/html", "text/markdown"])
def test_a_nul_in_a_body_cell_is_a_row_error_naming_row_and_column(kind: str) -> None:
    template = MessageTemplate(
        f"From: a@example.com\nTo: {{{{ email }}}}\nContent-Type: {kind}\n\nHi {{{{ note }}}}\n"
    )
    template.check_columns(["email", "note"])
    result = prepare_row(
        template, Row(4, {"email": "b@example.org", "note": "x\x00y"}), preview_message_id
    )
    assert isinstance(result, Problem)
    assert result.reason == "row 4: body: the cell in column 'note' contains a NUL byte, refused"
    with pytest.raises(RowError) as info:
        template.render({"email": "b@example.org", "note": "\x00"}, message_id="m@x")
    assert info.value.field == "body"


# -- template errors in the body -------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    ["{{ name|no_such_filter }}", "{% if name is no_such_test %}x{% endif %}"],
)
def test_an_unknown_filter_or_test_in_the_body_is_a_template_error_with_its_line(
    body: str,
) -> None:
    for kind in ("text/plain", "text/html", "text/markdown"):
        # Line 5 of the file is the first of the body.
        source = f"From: a@example.com\nTo: {{{{ email }}}}\nContent-Type: {kind}\n\nhi\n{body}\n"
        with pytest.raises(TemplateError, match=r"<template>, line 6: No (filter|test) named"):
            MessageTemplate(source)


# -- display names ---------------------------------------------------------------------------

DISPLAY = (
    "From: a@example.com\n"
    "To: {{ name|mailbox(email) }}\n"
    "Cc: {{ name|display_name }} <c@example.org>\n"
    "\n"
    "hi\n"
)


@pytest.mark.parametrize(
    ("name", "header"),
    [
        ("Doe, Jane", '"Doe, Jane" <jane@example.org>'),
        ("Ada Lovelace", "Ada Lovelace <jane@example.org>"),
        ('Max "The Axe" Müller', None),
        ("back\\slash", '"back\\\\slash" <jane@example.org>'),
        ("", "jane@example.org"),
    ],
)
def test_mailbox_filter_quotes_whatever_the_cell_holds(name: str, header: str | None) -> None:
    template = MessageTemplate(DISPLAY)
    msg = template.render({"name": name, "email": "jane@example.org"}, message_id="m@x").message
    if header is not None:
        assert str(msg["To"]) == header
    got = reparsed(msg)
    (to,) = got["To"].addresses
    assert (to.display_name, to.addr_spec) == (name, "jane@example.org")
    assert got["Cc"].addresses[0].display_name == name


def test_plain_names_through_the_filter_keep_the_direct_path() -> None:
    template = MessageTemplate(DISPLAY.replace("Cc: {{ name|display_name }} <c@example.org>\n", ""))
    result = prepare_row(
        template, Row(1, {"name": "Ada Lovelace", "email": "ada@example.org"}), preview_message_id
    )
    assert isinstance(result, Prepared)
    assert result.envelope.rendered is False  # not built through the email package
    assert b"To: Ada Lovelace <ada@example.org>\r\n" in result.envelope.payload


# Display names the email package can write on one line: longer ones are folded, and the
# email package (3.11) then drops the quotes of an ASCII name (refused, see below) or reads the
# RFC 2047 words of a non-ASCII one back with spaces between them.
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=30))
def test_the_email_package_reads_back_exactly_the_cells_text(cell: str) -> None:
    name = " ".join(cell.split())  # whitespace runs become one space (documented)
    assume("=?" not in name)  # the email package decodes encoded-word lookalikes anywhere
    assume(len(name.encode("utf-8")) <= 40)
    template = MessageTemplate(DISPLAY)
    msg = template.render({"name": cell, "email": "jane@example.org"}, message_id="m@x").message
    got = reparsed(msg)
    (to,) = got["To"].addresses
    assert to.display_name == name
    assert to.addr_spec == "jane@example.org"
    assert got["Cc"].addresses[0].display_name == name


@given(st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=80))
def test_format_display_name_is_one_mailbox_for_our_parser(cell: str) -> None:
    from twistmail.address import parse_address_list

    (address,) = parse_address_list(format_mailbox(cell, "jane@example.org"))
    assert str(address) == "jane@example.org"


_NAME_CHARS = st.one_of(
    st.sampled_from(' ,"\\<>@;:.()'), st.characters(blacklist_categories=("Cc", "Cs"))
)
# Long names made of words and ", " (as "Doe, Jane"), where folding goes wrong, and anything else.
_ANY_NAME = st.one_of(
    st.lists(
        st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=15),
        max_size=15,
    ).map(", ".join),
    st.text(_NAME_CHARS, max_size=200),
)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(_ANY_NAME)
def test_any_cell_makes_one_recipient_or_a_row_error(cell: str) -> None:
    """Whatever its length, a name never turns the header into several addresses."""
    template = MessageTemplate(DISPLAY)
    refused: str | None = None
    try:
        msg = template.render({"name": cell, "email": "jane@example.org"}, message_id="m").message
    except RowError as error:
        refused = error.field
    if refused is not None:
        assert refused in ("To", "Cc")
        return
    got = reparsed(msg)
    assert [a.addr_spec for a in got["To"].addresses] == ["jane@example.org"]
    assert [str(r) for r in envelope_from_message(msg).recipients] == [
        "jane@example.org",
        "c@example.org",
    ]


def test_a_long_quoted_name_the_email_package_would_break_is_refused() -> None:
    template = MessageTemplate(DISPLAY)
    with pytest.raises(RowError) as info:
        template.render({"name": "Doe, Jane " * 9, "email": "jane@example.org"}, message_id="m")
    assert info.value.field == "To"
    assert "cannot be folded safely" in info.value.reason


def test_display_name_whitespace_and_controls() -> None:
    assert format_display_name("  Jane\t Doe \n") == "Jane Doe"
    with pytest.raises(RowError, match="To"):  # NUL is not whitespace: refused as in any header
        MessageTemplate(DISPLAY).render(
            {"name": "a\x00b", "email": "j@example.org"}, message_id="m"
        )


# -- spreadsheet column names ----------------------------------------------------------------

SHEET = """\
From: a@example.com
To: {{ row["E-mail Address"] }}
Subject: {{ first_name }} of {{ company_legal }}

{{ e_mail_address }} / {{ row["First Name"] }} / {{ row["Company (legal)"] }}
"""
COLUMNS = ["First Name", "E-mail Address", "Company (legal)"]


def test_every_spreadsheet_column_is_reachable() -> None:
    template = MessageTemplate(SHEET)
    template.check_columns(COLUMNS)
    values = dict(zip(COLUMNS, ["Ann", "ann@example.org", "ACME"], strict=True))
    for rendered in (
        template.render(values, message_id="m@x").message,
        MessageTemplate(SHEET).render(values, message_id="m@x").message,  # no check_columns
    ):
        assert rendered["To"] == "ann@example.org"
        assert rendered["Subject"] == "Ann of ACME"
        assert rendered.get_content() == "ann@example.org / Ann / ACME\n"
    prepared = prepare_row(template, Row(1, values), preview_message_id)
    assert isinstance(prepared, Prepared)


def test_unknown_variable_lists_the_columns_and_the_closest_match() -> None:
    template = MessageTemplate(SHEET.replace("first_name", "frist_name"))
    with pytest.raises(TemplateError) as info:
        template.check_columns(COLUMNS)
    message = str(info.value)
    assert "'frist_name' (line 3), did you mean 'first_name' (column 'First Name')?" in message
    assert (
        "The columns are: 'First Name' (first_name), 'E-mail Address' (e_mail_address), "
        "'Company (legal)' (company_legal)"
    ) in message


def test_a_missing_row_key_is_named_with_the_closest_column() -> None:
    template = MessageTemplate(SHEET.replace('row["First Name"]', 'row["First name"]'))
    with pytest.raises(TemplateError, match=r"row\['First name'\], did you mean 'First Name'\?"):
        template.check_columns(COLUMNS)


def test_identifier_forms_never_hide_a_column_or_pick_between_two() -> None:
    template = MessageTemplate("From: a@example.com\nTo: {{ email }}\n\n{{ a_b }} {{ row }}\n")
    # "a b" and "a-b" both become a_b: ambiguous, so neither is offered.
    with pytest.raises(TemplateError, match="'a_b'"):
        template.check_columns(["email", "a b", "a-b"])
    # A column named "row" wins over the mapping.
    template.check_columns(["email", "a_b", "row"])
    msg = template.render({"email": "e@example.org", "a_b": "1", "row": "2"}, message_id="m")
    assert msg.message.get_content() == "1 2\n"


# -- duplicates ------------------------------------------------------------------------------


def test_mailbox_key_ignores_case_display_name_and_idna_form() -> None:
    assert mailbox_key("Ann <ANN@Example.ORG>") == mailbox_key("ann@example.org")
    assert mailbox_key("x@bücher.example") == mailbox_key("X@XN--BCHER-KVA.example")
    assert mailbox_key("ann@example.org") != mailbox_key("ann2@example.org")
    with pytest.raises(AddressError):
        mailbox_key("not an address")


def test_reports_find_the_address_in_a_spreadsheet_column() -> None:
    from twistmail.merge.prepare import guess_email

    row = Row(1, {"First Name": "Ann", "E-mail Address": "ann@example.org"})
    assert guess_email(row) == "ann@example.org"
    assert guess_email(Row(2, {"Name": "Ann", "Mail notes": "none"})) == ""


def test_a_row_without_an_aliased_column_is_a_row_error_naming_the_variable() -> None:
    template = MessageTemplate(SHEET)
    template.check_columns(COLUMNS)
    with pytest.raises(RowError, match="no value for 'first_name'"):
        template.render(
            {"E-mail Address": "ann@example.org", "Company (legal)": "ACME"}, message_id="m"
        )
