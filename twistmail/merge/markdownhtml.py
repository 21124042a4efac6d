"""The HTML part of a Markdown template, where a cell is text, converted once per template.

A Markdown body's HTML alternative is made by python-markdown (its ``extra`` and ``sane_lists``
extensions). Markdown never sees a cell: each value a ``{{ ... }}`` writes stands in the
Markdown as a placeholder word, which Markdown passes through as text, and the value, HTML-escaped
(``|safe`` opts out), takes the placeholder's place in the HTML. So ``*``, ``_``, ``#`` or
``[a](b)`` in a cell stay as written, and a cell cannot change the message's structure.

Converting each row costs more than everything else a row needs, so a body without statements
(``{% ... %}``) is converted once: its ``{{ ... }}`` tags are the placeholders, put back as
tags into the HTML, which is then the template rendered for each row. Its HTML equals the one
made row by row for any cells (property-tested). A body with statements is rendered for each
row, its values replaced by numbered placeholders, then converted. Either way, for cells of plain
words, the HTML is the one made before issue 13 by converting each rendered row.

:func:`html_template_source` returns None when converting once could change the result: a
statement, whitespace control (``{{ x -}}``) or ``{% raw %}``, or a tag Markdown drops or
encodes (a link definition nothing uses, an e-mail autolink). Where Markdown encodes a
placeholder in a row (an e-mail autolink), that row's HTML is converted from its rendered
body, as before.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable
from typing import Any

import jinja2
import jinja2.nodes
import markupsafe

__all__ = ["RowPlaceholders", "html_template_source", "markdown_converter"]

EXTENSIONS = ("extra", "sane_lists")
_TAG_BEGIN = {"variable_begin": "}}", "block_begin": "%}", "comment_begin": "#}"}
_TAG_END = {"variable_end", "block_end", "comment_end"}


def markdown_converter() -> Any:
    """A python-markdown converter with the extensions templates get (imported on first use:
    only Markdown templates load the package)."""
    import markdown  # type: ignore[import-untyped]

    return markdown.Markdown(extensions=list(EXTENSIONS))


def placeholder_prefix(source: str) -> str:
    """A word absent from ``source`` whose first letter appears nowhere else in it: a
    placeholder (the word, digits, ``x``) cannot begin inside the text before it, nor run on
    into the text after it."""
    prefix = "zqxv"
    while prefix in source:
        prefix += "q"
    return prefix


def html_template_source(env: jinja2.Environment, source: str) -> str | None:
    """The Jinja2 source of the HTML made from the Markdown body ``source``, converted once;
    None when it must be converted row by row (see the module's text)."""
    try:
        tokens = list(env.lexer.tokeniter(source, None))
    except jinja2.TemplateSyntaxError:
        return None
    if "".join(value for _, _, value in tokens) != source:
        return None  # whitespace control took some of the text
    prefix = placeholder_prefix(source)
    markdown: list[str] = []
    tags: list[str] = []
    tag: list[str] | None = None
    for _, kind, value in tokens:
        if tag is not None:
            tag.append(value)
            if kind in _TAG_END:
                if value not in _TAG_BEGIN.values():
                    return None  # "-}}"
                text, tag = "".join(tag), None
                if kind == "variable_end":  # a comment renders as nothing either way
                    markdown.append(f"{prefix}{len(tags)}x")
                    tags.append(text)
        elif kind in ("variable_begin", "comment_begin") and len(value) == 2:
            tag = [value]
        elif kind == "data":
            markdown.append(value)
        else:
            return None  # a statement, "{{-", a raw block, a line statement
    converted: str = markdown_converter().convert("".join(markdown))
    if any(f"{prefix}{n}x" not in converted for n in range(len(tags))):
        return None
    return _put_back(converted, prefix, tags)


class RowPlaceholders:
    """Per row, for a body converted row by row: each value the body writes becomes a
    placeholder (use :meth:`finalize` as the Jinja2 environment's ``finalize``), and
    :meth:`html` puts the values, escaped, into the converted Markdown."""

    def __init__(self, source: str) -> None:
        self._prefix = placeholder_prefix(source)
        self._values: list[str] = []
        self._converter = markdown_converter()

    @jinja2.pass_eval_context  # so Jinja2 never calls it at compile time, on a constant
    def finalize(self, eval_ctx: jinja2.nodes.EvalContext, value: object) -> str:
        """A placeholder for ``value``, written instead of it."""
        self._values.append(markupsafe.escape(value))
        return f"{self._prefix}{len(self._values) - 1}x"

    def convert(self, markdown: str) -> str:
        """``markdown`` converted as it is (cells and all)."""
        return str(self._converter.reset().convert(markdown))

    def html(self, render: Callable[[], str]) -> str | None:
        """The HTML of the body ``render`` writes, or None when Markdown encoded a placeholder."""
        self._values = []
        markdown = render()
        return _put_back(self.convert(markdown), self._prefix, self._values)


def _put_back(converted: str, prefix: str, texts: list[str]) -> str | None:
    """``converted`` with each placeholder replaced by its text; None when Markdown wrote a
    placeholder otherwise (an e-mail autolink's text is written as character references)."""
    placeholder = re.compile(rf"{prefix}(\d+)x")
    count = len(placeholder.findall(converted))
    if converted.count(prefix) != count or html.unescape(converted).count(prefix) != count:
        return None
    return placeholder.sub(lambda m: texts[int(m.group(1))], converted)
