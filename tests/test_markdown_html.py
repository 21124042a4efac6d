"""The HTML part of a Markdown template, converted once per template (issue 13): the same HTML
as converting each rendered row where cells are plain words, cells never read as Markdown,
statements, and the templates that are converted row by row instead."""

from __future__ import annotations

from html import unescape

import jinja2
import markdown  # type: ignore[import-untyped]
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twistmail.merge.markdownhtml import EXTENSIONS, html_template_source
from twistmail.merge.template import MessageTemplate

HEAD = "From: a@example.com\nTo: {{ email }}\nSubject: s\nContent-Type: text/markdown\n\n"


def converted_per_row(body: str, row: dict[str, str]) -> str:
    """What the HTML part was before issue 13: the row rendered (cells escaped), then converted."""
    env = jinja2.Environment(
        autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True
    )
    rendered = env.from_string(body).render(**row)
    return str(markdown.Markdown(extensions=list(EXTENSIONS)).convert(rendered))


def html_part(body: str, row: dict[str, str]) -> str:
    template = MessageTemplate(HEAD + body)
    return template.render_markdown_html(template.context({"email": "b@example.org", **row}))


def converted_once(body: str) -> bool:
    env = jinja2.Environment(autoescape=True, keep_trailing_newline=True)
    return html_template_source(env, body) is not None


# Markdown with cells in the places people put them: headings, emphasis, lists, links, tables,
# quotes, code, raw HTML and its attributes, footnotes, definition lists, several per line.
BODIES = [
    "# Hello {{ a }}\n\nYour code is **{{ b }}**.\n",
    "Dear {{ a }} {{ b }},\n\n- item {{ a }}\n- item *{{ b }}*\n  continued {{ c }}\n",
    "1. first {{ a }}\n2. second\n\n> quoted {{ b }}\n> more\n",
    "[Unsubscribe](https://example.org/u/{{ c }}) or [{{ a }}](https://example.org/{{ b }})\n",
    "| name | code |\n|------|------|\n| {{ a }} | `{{ b }}` |\n",
    "```\ncode {{ a }}\n```\n\nInline `{{ b }}` and {{ c }}{{ a }}.\n",
    '<div class="x" title="{{ a }}">\n<p>{{ b }}</p>\n</div>\n\nAfter {{ c }}.\n',
    "Text with a note[^1] for {{ a }}.\n\n[^1]: The note, {{ b }}.\n",
    "Term {{ a }}\n:   Definition {{ b }}\n\n***\n\n## {{ c }} ##\n",
    "{{ a }}\n\n{{ b }}\n{{ c }}\n",
    "Line one {{ a }}  \nLine two {{ b }}\n\n    indented code {{ c }}\n",
    "Set in _{{ a }}_ and __{{ b }}__ and ***{{ c }}***.\n",
]
plain_words = st.from_regex(r"[A-Za-z][A-Za-z0-9]{0,8}( [A-Za-z0-9]{1,8}){0,3}", fullmatch=True)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=st.sampled_from(BODIES), a=plain_words, b=plain_words, c=plain_words)
def test_converted_once_equals_converted_per_row_for_plain_cells(
    body: str, a: str, b: str, c: str
) -> None:
    assert converted_once(body)
    row = {"a": a, "b": b, "c": c}
    assert html_part(body, row) == converted_per_row(body, row)


def test_a_cell_is_text_in_the_html_part_never_markdown() -> None:
    row = {"a": "**bold** _it_ [x](javascript:alert(1)) `c` <b>&", "b": "# not a heading"}
    html = html_part("Hello {{ a }}\n\n{{ b }}\n", row)
    assert html == (
        "<p>Hello **bold** _it_ [x](javascript:alert(1)) `c` &lt;b&gt;&amp;</p>\n"
        "<p># not a heading</p>"
    )
    # Before, each row was converted after rendering: the cell's Markdown made HTML.
    assert "<strong>bold</strong>" in converted_per_row("Hello {{ a }}\n\n{{ b }}\n", row)


def test_the_plain_text_part_keeps_the_cells_as_written() -> None:
    template = MessageTemplate(HEAD + "Hello **{{ a }}**\n")
    message = template.render(
        {"email": "b@example.org", "a": "*x* & <y>"}, message_id="m@example.org"
    ).message
    plain, html = message.iter_parts()
    assert plain.get_content() == "Hello ***x* & <y>**\n"
    assert html.get_content() == ("<p>Hello <strong>*x* &amp; &lt;y&gt;</strong></p>\n")


def test_cells_in_urls_and_attributes_are_escaped() -> None:
    row = {"a": 'x" onclick="evil()', "b": "q&r"}
    html = html_part(
        '[link](https://example.org/{{ a }}?{{ b }})\n\n<p title="{{ a }}"></p>\n', row
    )
    assert 'onclick="evil()"' not in html
    assert "https://example.org/x&#34; onclick=&#34;evil()?q&amp;r" in html


# Forces the row-by-row conversion without changing what the body writes.
ROW_BY_ROW = "{% if true %}{% endif %}"
cell_text = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"))


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=st.sampled_from(BODIES), a=cell_text, b=cell_text, c=cell_text)
def test_converted_once_equals_converted_row_by_row_for_any_cells(
    body: str, a: str, b: str, c: str
) -> None:
    assert not converted_once(body + ROW_BY_ROW)
    row = {"a": a, "b": b, "c": c}
    assert html_part(body, row) == html_part(body + ROW_BY_ROW, row)


@pytest.mark.parametrize("vip", ["yes", ""])
def test_statements_are_rendered_before_markdown_sees_the_body(vip: str) -> None:
    body = (
        "Dear {{ a }},\n\n{% if vip %}\n**Thank you** for being a member.\n{% endif %}\n"
        "{% for word in b.split() %}\n- {{ word }}\n{% endfor %}\n"
    )
    assert not converted_once(body)
    row = {"a": "Ann", "vip": vip, "b": "one two"}
    html = html_part(body, row)
    assert html == converted_per_row(body, row)
    assert ("<strong>Thank you</strong>" in html) == bool(vip)
    assert html.count("<li>") == 2
    # Cells are still text, in a body rendered row by row.
    html = html_part(body, {"a": "*Ann*", "vip": "", "b": "**one** two"})
    assert "*Ann*" in html
    assert "<p>**one**</p>" in html


@pytest.mark.parametrize(
    "body",
    [
        # Whitespace control takes text Markdown would see.
        "Hi {{ a -}}\n\n*there*\n",
        "{% raw %}{{ a }}{% endraw %} *x* {{ a }}\n",
        # A link definition nothing uses: Markdown drops the tag.
        "Hi {{ a }}\n\n[x]: https://example.org/{{ a }}\n",
        # An e-mail autolink: Markdown writes its text as character references.
        "Write to <{{ a }}@example.org>\n",
    ],
)
def test_templates_markdown_would_change_are_converted_row_by_row(body: str) -> None:
    assert not converted_once(body)
    row = {"a": "ann"}
    assert html_part(body, row) == converted_per_row(body, row)


def test_a_row_whose_placeholder_markdown_encodes_is_converted_from_its_rendered_body() -> None:
    html = html_part("Write to <{{ a }}@example.org>\n", {"a": "ann"})
    assert 'href="mailto:ann@example.org"' in unescape(html)
    assert "zqxv" not in unescape(html)


def test_the_placeholder_word_is_not_confused_with_the_templates_own_text() -> None:
    body = "zqxv zqxvq zqxv0x {{ a }} zqxvqq1x\n"
    assert converted_once(body)
    assert html_part(body, {"a": "Ann"}) == "<p>zqxv zqxvq zqxv0x Ann zqxvqq1x</p>"
