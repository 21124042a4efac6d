"""The message template of a mail merge: a whole message as Jinja2 text, rendered once per row.

A template file is UTF-8 text: header lines (``Name: value``; a line starting with a space or a
tab continues the previous header), one blank line, then the body. Every header value and the
body are Jinja2 templates (``StrictUndefined``, no autoescaping) whose variables are the CSV
row's columns. A column whose name is not an identifier (``First Name``) is reachable as
``row["First Name"]`` and by its identifier form: lower case, each run of other characters
turned into ``_`` (``first_name``, ``e_mail_address``, ``company_legal``); ``row`` maps every
column name to its cell (unless a column is itself named ``row``). Each header value and the
body are compiled separately, so a Jinja2 block cannot span several headers, and a value that
renders empty leaves its header out (``Cc: {{ cc }}`` with an empty ``cc`` cell sends no Cc).

Every rendered header value is checked before the message is built: a line break (CR, LF or
any other) or NUL in it is a :class:`RowError` naming the header, so CSV cells cannot inject
headers. Address headers (From, Sender, Reply-To, To, Cc, Bcc) are parsed and validated. Bcc stays
on the message; :func:`twistmail.message.envelope_from_message` sends to it and strips it.
A display name from a cell goes through the ``mailbox`` filter (``To: {{ name|mailbox(email) }}``
gives ``"Doe, Jane" <jane@example.org>``) or ``display_name`` (the quoted name alone), which
quote and escape whatever the cell holds. A NUL in the body is a :class:`RowError` too.

Cells are HTML-escaped wherever they become HTML: in a ``text/html`` body, and in the HTML part
made from a Markdown body (its ``text/plain`` part keeps them as they are); ``|safe`` opts out.
In that HTML part a cell is text, not Markdown.

Pseudo-headers, never sent as written:

``Content-Type``
    Chooses the body kind; the value is literal text, not a template.

    - absent or ``text/plain``: a plain text body;
    - ``text/html``: an HTML body, with no text part;
    - ``text/markdown``: the rendered body is Markdown; the message is ``multipart/alternative``
      with that Markdown as its ``text/plain`` part and the HTML made from the template's
      Markdown (by the ``markdown`` package, with its ``extra`` and ``sane_lists`` extensions,
      once per template: see :mod:`.markdownhtml`) as ``text/html``, where cells are text.

``Attachment``
    A file to attach (may repeat). The path is relative to the template file's directory; its
    MIME type is guessed from the name (``application/octet-stream`` when unknown). A templated
    path must stay inside the template's directory, so a CSV cell cannot attach arbitrary files;
    a path rendering empty attaches nothing.

Message-ID and Date are set per message by :meth:`MessageTemplate.render`; MIME-Version and
Content-Transfer-Encoding follow from the body. None of them may appear in a template.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy
from email.headerregistry import BaseHeader
from email.message import EmailMessage
from pathlib import Path
from typing import Literal

import jinja2
import jinja2.meta
import jinja2.nodes
from jinja2.sandbox import SandboxedEnvironment

from twistmail.address import (
    Address,
    check_header_value,
    find_header_break,
    format_display_name,
    format_mailbox,
)
from twistmail.errors import HeaderInjectionError, RowError, TemplateError

from .attachments import Attachment, AttachmentFiles, AttachmentSource
from .columns import column_aliases, columns_read, unknown_columns_error
from .headers import (
    ADDRESS_HEADERS,
    POLICY,
    RECIPIENT_HEADERS,
    CompiledHeader,
    check_folding,
    check_value,
    parse_addresses,
)
from .markdownhtml import RowPlaceholders, html_template_source

__all__ = [
    "BodyKind",
    "MessageTemplate",
    "Rendered",
    "RowError",
    "TemplateError",
]

BodyKind = Literal["plain", "html", "markdown"]

_BODY_KINDS: dict[str, BodyKind] = {
    "text/plain": "plain",
    "text/html": "html",
    "text/markdown": "markdown",
}
_RESERVED_HEADERS = {
    "message-id": "Message-ID",
    "date": "Date",
    "mime-version": "MIME-Version",
    "content-transfer-encoding": "Content-Transfer-Encoding",
}
_HEADER_LINE = re.compile(r"([\x21-\x39\x3b-\x7e]+):(.*)")
_JINJA_MARKUP = re.compile(r"\{[{%#]")
_UNDEFINED_NAME = re.compile(r"'([^']+)' is undefined")
# The header line length beyond which the email package refolds a value (policy.SMTP).
_FOLD_AT = 78
# Between the parts of a row rendered at once (see MessageTemplate.render_row).
_SEPARATOR = "\x00"
# What a value from a CSV cell may break when rendered: template code may do anything a
# str can, so its ordinary failures are failures of the row, not of the campaign.
_RENDER_ERRORS = (jinja2.TemplateError, TypeError, ValueError, ArithmeticError, LookupError)


@dataclass(frozen=True, slots=True)
class Rendered:
    """One row's message, and the address it is reported under (the first To, else Cc, Bcc)."""

    message: EmailMessage
    email: str


@dataclass(frozen=True, slots=True)
class _Part:
    """A compiled piece of the template, and where it starts in the file, for messages."""

    first_line: int
    ast: jinja2.nodes.Template


class MessageTemplate:
    """A parsed message template, ready to render rows. Build one with :meth:`load`."""

    def __init__(
        self,
        source: str,
        *,
        name: str = "<template>",
        base_dir: str | os.PathLike[str] = ".",
        sandboxed: bool = False,
        attachments: AttachmentSource | None = None,
    ) -> None:
        """Parse ``source``; ``name`` labels error messages, ``base_dir`` roots attachments.

        ``sandboxed`` renders in Jinja2's ``SandboxedEnvironment`` (for a template that came
        from someone else: a database, an upload), and ``attachments`` replaces the files
        under ``base_dir`` as the source of ``Attachment`` lines (see
        :class:`.attachments.StoredAttachments`).

        Raises :class:`TemplateError` on a Jinja2 syntax error or an unusable header.
        """
        self.name = name
        self.source = source
        """The template's text, as given."""
        self.base_dir = Path(base_dir)
        self._files: AttachmentSource = (
            attachments if attachments is not None else AttachmentFiles(base_dir)
        )
        environment = SandboxedEnvironment if sandboxed else jinja2.Environment
        self._env = environment(
            undefined=jinja2.StrictUndefined,
            # Headers and text bodies are not HTML; escaping would corrupt "&" and "<" in them.
            autoescape=False,
            keep_trailing_newline=True,
        )
        self._env.filters["display_name"] = format_display_name
        self._env.filters["mailbox"] = format_mailbox
        self._aliases: tuple[tuple[str, str], ...] | None = None  # set by check_columns
        source = source.replace("\r\n", "\n").replace("\r", "\n")
        # The whole text first, so a syntax error is reported at its line in the file.
        self._parse(source, 1)
        lines = source.split("\n")
        blank = next((i for i, line in enumerate(lines) if not line.strip()), len(lines))
        self._parts: list[_Part] = []
        self._headers: list[CompiledHeader] = []
        self._attachments: list[CompiledHeader] = []
        self.kind: BodyKind = self._read_headers(lines[:blank])
        body_line = blank + 2
        body_source = "\n".join(lines[blank + 1 :])
        body_ast = self._parse(body_source, body_line)
        self._parts.append(_Part(body_line, body_ast))
        # An HTML body escapes CSV cells ("<", "&"), so a cell cannot inject markup; so does the
        # HTML made from a Markdown body.
        html_env = self._env.overlay(autoescape=True)
        self._body = self._compile(
            html_env if self.kind == "html" else self._env, body_ast, body_line
        )
        # A Markdown body's HTML: converted once, else row by row (see .markdownhtml).
        self._markdown_html: jinja2.Template | None = None
        self._placeholders: RowPlaceholders | None = None
        self._html_body: jinja2.Template | None = None  # a row whose placeholders Markdown took
        if self.kind == "markdown":
            self._markdown_html = _markdown_html(html_env, body_source)
            if self._markdown_html is None:
                self._placeholders = RowPlaceholders(body_source)
                self._markdown_html = self._compile(
                    html_env.overlay(finalize=self._placeholders.finalize), body_ast, body_line
                )
                self._html_body = self._compile(html_env, body_ast, body_line)
        self._joined, self._joined_body = self._join(body_source)
        self.variables: frozenset[str] = frozenset(
            name
            for part in self._parts
            for name in jinja2.meta.find_undeclared_variables(part.ast)
            if name not in self._env.globals
        )

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        sandboxed: bool = False,
        attachments: AttachmentSource | None = None,
    ) -> MessageTemplate:
        """The template in the UTF-8 file at ``path``; attachments are relative to its directory
        (``sandboxed`` and ``attachments`` as for the constructor).

        Raises :class:`TemplateError` when the file cannot be read or used.
        """
        name = os.fspath(path)
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise TemplateError(f"{name}: cannot read the template: {exc.strerror}") from None
        try:
            source = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise TemplateError(
                f"{name}: not valid UTF-8 at byte {exc.start}; save the file as UTF-8"
            ) from None
        return cls(
            source,
            name=name,
            base_dir=Path(path).parent,
            sandboxed=sandboxed,
            attachments=attachments,
        )

    @property
    def header_names(self) -> tuple[str, ...]:
        """The headers the template sets, as written (pseudo-headers left out)."""
        return tuple(header.name for header in self._headers)

    def check_columns(self, columns: Iterable[str]) -> None:
        """Check that ``columns`` provide every variable, and render rows with these columns.

        Raises :class:`TemplateError` naming each variable (and each ``row["..."]``) no column
        provides, with the closest column and the list of columns.
        """
        columns = tuple(columns)
        self._aliases = column_aliases(columns)
        provided = {*columns, *(alias for alias, _ in self._aliases), "row"}
        missing = sorted(self.variables - provided)
        keys = sorted(self._row_keys(columns) - set(columns))
        if missing or keys:
            raise unknown_columns_error(
                self.name,
                [(name, self._first_use(name)) for name in missing],
                keys,
                columns,
                self._aliases,
            )

    def columns_read(
        self, columns: tuple[str, ...], *, recipients: bool = False
    ) -> tuple[str, ...] | None:
        """The columns whose cells the template reads, in order of first use; None when it
        reads the whole ``row`` mapping. With ``recipients``: only the To, Cc and Bcc headers,
        in that order (the columns a row's recipient comes from)."""
        if not recipients:
            return columns_read((part.ast for part in self._parts), columns)
        sources = [
            header.source
            for key in RECIPIENT_HEADERS
            for header in self._headers
            if header.key == key and header.template is not None
        ]
        return columns_read((self._env.parse(source) for source in sources), columns)

    def _row_keys(self, columns: tuple[str, ...]) -> set[str]:
        """The constant keys the template looks up in ``row`` (``row["First Name"]``)."""
        if "row" in columns:
            return set()
        return {
            node.arg.value
            for part in self._parts
            for node in part.ast.find_all(jinja2.nodes.Getitem)
            if isinstance(node.node, jinja2.nodes.Name)
            and node.node.name == "row"
            and isinstance(node.arg, jinja2.nodes.Const)
            and isinstance(node.arg.value, str)
        }

    def render(
        self,
        row_values: Mapping[str, str],
        *,
        message_id: str,
        date: datetime | None = None,
    ) -> Rendered:
        """The message for one row, with the given Message-ID and a Date (default: now).

        Raises :class:`RowError` when the row leaves a variable undefined, gives an invalid
        address, a header value with a line break, no From or no recipient, or names an
        attachment that cannot be read.
        """
        values = self.context(row_values)
        headers: list[tuple[str, str | BaseHeader]] = []
        first: dict[str, Address] = {}
        for header, text in self.header_values(values):
            value: str | BaseHeader = header.parsed or text
            addresses = header.addresses
            if header.parsed is None and header.key in ADDRESS_HEADERS:
                addresses = tuple(parse_addresses(header.name, text))
            if addresses:
                first.setdefault(header.key, addresses[0])
            headers.append((header.name, value))
        if "from" not in first:
            raise RowError("From", "no From address")
        recipient = next((first[key] for key in RECIPIENT_HEADERS if key in first), None)
        if recipient is None:
            raise RowError("To", "no recipient: To, Cc and Bcc are all empty")
        attachments = self.attachments(values)
        if not message_id.startswith("<"):
            message_id = f"<{message_id}>"
        check_value("Message-ID", message_id)
        body = self.render_body(values)

        msg = EmailMessage(policy=POLICY)
        for name, value in headers:
            if isinstance(value, BaseHeader):
                msg.set_raw(name, value)
                continue
            try:
                msg[name] = value
            # The email package's header parser raises AttributeError on some phrases (". <a@b>").
            except (ValueError, TypeError, IndexError, AttributeError) as exc:
                raise RowError(name, f"invalid header value {value!r}: {exc}") from None
            if (
                len(name) + 2 + len(value) > _FOLD_AT
                and '"' in value
                and name.lower() in ADDRESS_HEADERS
            ):
                check_folding(msg, name)
        msg["Date"] = date if date is not None else datetime.now(UTC)
        msg["Message-ID"] = message_id
        if self.kind == "markdown":
            html = self.render_markdown_html(values)
            msg.set_content(body)
            msg.add_alternative(html, subtype="html")
        else:
            msg.set_content(body, subtype=self.kind)
        for attachment in attachments:
            msg.add_attachment(
                attachment.data,
                maintype=attachment.maintype,
                subtype=attachment.subtype,
                filename=attachment.filename,
            )
        return Rendered(msg, str(recipient))

    def attachments(self, context: dict[str, object]) -> list[Attachment]:
        """The files a row attaches (``context`` from :meth:`context`), read through the cache.

        Raises :class:`RowError` when a path is undefined, leaves the template's directory or
        cannot be read.
        """
        return [
            self._files.get(path, templated=header.template is not None)
            for header in self._attachments
            if (path := self._render_header(header, context))
        ]

    def attachment_part(self, attachment: Attachment) -> tuple[bytes, bytes]:
        """``attachment`` as the email package writes it inside a multipart message (CRLF),
        and the same dot-stuffed; encoded once per campaign."""
        return self._files.part(attachment)

    def render_markdown_html(self, context: dict[str, object]) -> str:
        """The HTML alternative of a Markdown body (cells HTML-escaped), for one row."""
        template = self._markdown_html
        assert template is not None
        placeholders = self._placeholders
        if placeholders is None:
            return self._render(template, context, None)
        html = placeholders.html(lambda: self._render(template, context, None))
        if html is None:
            assert self._html_body is not None
            html = placeholders.convert(self._render(self._html_body, context, None))
        return html

    @property
    def literal_attachments(self) -> tuple[str, ...]:
        """The paths of the ``Attachment`` lines that are not templated."""
        return tuple(h.literal or "" for h in self._attachments if h.template is None)

    @property
    def has_attachments(self) -> bool:
        """Whether the template has Attachment lines."""
        return bool(self._attachments)

    def context(self, values: Mapping[str, str]) -> dict[str, object]:
        """What a row's templates see: Jinja2's globals, ``row`` and the row's cells by column
        name and identifier form (cells win)."""
        context: dict[str, object] = dict(self._env.globals)
        context["row"] = values
        context.update(values)
        aliases = self._aliases
        if aliases is None:  # rendering without check_columns: the row's own names
            aliases = column_aliases(tuple(values))
        for alias, column in aliases:
            value = values.get(column)
            if value is not None:  # else StrictUndefined names the variable, as for any
                context[alias] = value
        return context

    def render_row(
        self, context: dict[str, object]
    ) -> tuple[Iterable[tuple[CompiledHeader, str]], str | None]:
        """:meth:`header_values` and, if it came with them, the body (else None).

        The templated values (and the body, when it can be) are rendered as one Jinja2
        template, their texts separated by NUL, which no accepted header value contains. A
        row whose pieces do not all come out right gets the lazy :meth:`header_values` and no
        body, so its errors are raised exactly as rendering piece by piece raises them.
        """
        joined = self._joined
        if joined is not None:
            try:
                pieces = self._render(joined, context, None).split(_SEPARATOR)
            except RowError:
                pieces = []
            if len(pieces) == self._joined_count:
                body = pieces.pop() if self._joined_body else None
                values: list[tuple[CompiledHeader, str]] = []
                taken = iter(pieces)
                for header in self._headers:
                    if header.template is None:
                        value = header.literal or ""
                    else:
                        value = next(taken)
                        if find_header_break(value) is not None:  # is_clean, inline
                            return self.header_values(context), None
                        value = value.strip()
                    if value:
                        values.append((header, value))
                return values, body
        return self.header_values(context), None

    def header_values(self, context: dict[str, object]) -> Iterator[tuple[CompiledHeader, str]]:
        """Each header to send for a row and its value, checked; empty values are left out.

        ``context`` comes from :meth:`context`.

        Raises :class:`RowError` naming the header when a value has a line break or a variable
        is undefined.
        """
        for header in self._headers:
            value = self._render_header(header, context)
            if value:
                yield header, value

    def render_body(self, context: dict[str, object]) -> str:
        """The body text for a row (``context`` from :meth:`context`).

        Raises :class:`RowError` when a variable is undefined or a cell puts a NUL in the body.
        """
        body = self._render(self._body, context, None)
        if "\x00" in body:
            raise RowError("body", _nul_reason(context))
        return body

    # -- loading ---------------------------------------------------------------------------------

    def _parse(self, source: str, first_line: int) -> jinja2.nodes.Template:
        try:
            return self._env.parse(source)
        except jinja2.TemplateSyntaxError as exc:
            line = first_line + (exc.lineno or 1) - 1
            raise TemplateError(f"{self.name}, line {line}: {exc.message}") from None

    def _fail(self, line: int, reason: str) -> TemplateError:
        return TemplateError(f"{self.name}, line {line}: {reason}")

    def _read_headers(self, lines: list[str]) -> BodyKind:
        pending: list[tuple[int, str, str]] = []  # line, name, value (unfolded)
        for number, line in enumerate(lines, 1):
            if line[:1] in (" ", "\t"):
                if not pending:
                    raise self._fail(number, "a continuation line needs a header before it")
                start, name, value = pending[-1]
                pending[-1] = (start, name, f"{value} {line.strip()}")
                continue
            match = _HEADER_LINE.fullmatch(line)
            if match is None:
                raise self._fail(
                    number,
                    f"expected a header line 'Name: value', got {line!r} "
                    "(the headers end at the first blank line)",
                )
            pending.append((number, match.group(1), match.group(2).strip()))
        counts: dict[str, int] = {}
        kind: BodyKind | None = None
        for number, name, value in pending:
            key = name.lower()
            if key in _RESERVED_HEADERS:
                raise self._fail(number, f"{_RESERVED_HEADERS[key]} is set by twistmail; remove it")
            if key == "content-type":
                if kind is not None:
                    raise self._fail(number, "Content-Type appears twice")
                kind = self._body_kind(number, value)
                continue
            if not value:  # an empty literal header is not sent
                continue
            header = self._compile_header(number, name, value)
            if key == "attachment":
                self._attachments.append(header)
                continue
            counts[key] = counts.get(key, 0) + 1
            limit = policy.SMTP.header_max_count(key)
            if limit is not None and counts[key] > limit:
                raise self._fail(number, f"{name} may appear only once")
            self._headers.append(header)
        if "from" not in counts:
            raise TemplateError(f"{self.name}: the template has no From header")
        if not any(key in counts for key in RECIPIENT_HEADERS):
            raise TemplateError(f"{self.name}: the template has no To, Cc or Bcc header")
        return kind or "plain"

    def _body_kind(self, number: int, value: str) -> BodyKind:
        media_type = value.split(";", 1)[0].strip().lower()
        if media_type not in _BODY_KINDS:
            raise self._fail(
                number,
                f"Content-Type {value!r} is not one of " + ", ".join(_BODY_KINDS),
            )
        return _BODY_KINDS[media_type]

    def _compile_header(self, number: int, name: str, value: str) -> CompiledHeader:
        key = name.lower()
        if _JINJA_MARKUP.search(value) is None:
            try:
                check_header_value(name, value)
            except HeaderInjectionError as exc:
                raise self._fail(number, str(exc)) from None
            addresses = None
            if key in ADDRESS_HEADERS and value:
                try:
                    addresses = tuple(parse_addresses(name, value))
                except RowError as exc:
                    raise self._fail(number, exc.reason) from None
            parsed = POLICY.header_factory(name, value)
            folded = parsed.fold(policy=POLICY)
            wire = folded.encode("ascii") if folded.isascii() else None
            return CompiledHeader(name, key, number, value, None, addresses, parsed, wire)
        ast = self._parse(value, number)
        self._parts.append(_Part(number, ast))
        template = self._compile(self._env, ast, number)
        return CompiledHeader(name, key, number, None, template, None, None, None, value)

    def _compile(
        self, env: jinja2.Environment, ast: jinja2.nodes.Template, first_line: int
    ) -> jinja2.Template:
        """``ast`` compiled; an unknown filter or test is a TemplateError naming its line."""
        # Jinja2 leaves the check of those inside a condition to rendering: every row would fail.
        for node in ast.find_all((jinja2.nodes.Filter, jinja2.nodes.Test)):
            what, known = (
                ("filter", env.filters)
                if isinstance(node, jinja2.nodes.Filter)
                else ("test", env.tests)
            )
            if node.name not in known:
                raise self._fail(first_line + node.lineno - 1, f"No {what} named {node.name!r}.")
        try:
            return env.from_string(ast)
        except jinja2.TemplateSyntaxError as exc:  # TemplateAssertionError among them
            line = first_line + (exc.lineno or 1) - 1
            raise self._fail(line, exc.message or str(exc)) from None

    def _join(self, body_source: str) -> tuple[jinja2.Template | None, bool]:
        """The template for :meth:`render_row`, and whether it includes the body.

        Parts with statements are left out (a ``{% set %}`` would leak into the next part), and
        an HTML body, which escapes its values, is rendered on its own.
        """
        self._joined_count = 0
        sources = [h.source for h in self._headers if h.template is not None]
        with_body = self.kind != "html" and "{%" not in body_source
        if with_body:
            sources.append(body_source)
        if len(sources) < 2 or any("{%" in source or _SEPARATOR in source for source in sources):
            return None, False
        self._joined_count = len(sources)
        return self._env.from_string(_SEPARATOR.join(sources)), with_body

    def _first_use(self, variable: str) -> int | None:
        lines = [
            part.first_line + node.lineno - 1
            for part in self._parts
            for node in part.ast.find_all(jinja2.nodes.Name)
            if node.name == variable and node.ctx == "load"
        ]
        return min(lines) if lines else None

    # -- rendering -------------------------------------------------------------------------------

    def _render(
        self, template: jinja2.Template, context: dict[str, object], field: str | None
    ) -> str:
        try:
            # Template.render would copy the globals into a new dict, and new_context would
            # list them, for every call; the row's context already holds them (see `context`),
            # so the Context is made directly (`globals` only matters for template modules).
            env = self._env
            ctx = env.context_class(env, context, template.name, template.blocks)
            return "".join(template.root_render_func(ctx))
        except _RENDER_ERRORS as exc:
            reason = str(exc)
            undefined = _UNDEFINED_NAME.search(reason)
            if undefined is not None:
                line = self._first_use(undefined.group(1))
                where = f" (template line {line})" if line else ""
                reason = f"no value for {undefined.group(1)!r}{where}"
            raise RowError(field, reason) from None

    def _render_header(self, header: CompiledHeader, values: dict[str, object]) -> str:
        if header.template is None:
            return header.literal or ""
        value = self._render(header.template, values, header.name)
        check_value(header.name, value)  # before stripping: a trailing line break is refused too
        return value.strip()


def _markdown_html(env: jinja2.Environment, body_source: str) -> jinja2.Template | None:
    """The HTML part of a Markdown body as a template converted once, or None when the body
    must be converted row by row (see :func:`.markdownhtml.html_template_source`)."""
    source = html_template_source(env, body_source)
    if source is None:
        return None
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError:  # a tag Markdown put where it no longer parses
        return None


def _nul_reason(context: Mapping[str, object]) -> str:
    """Why a body holding NUL is refused, naming the columns that put it there."""
    columns = sorted(
        name
        for name, value in context.items()
        if isinstance(value, str) and "\x00" in value and name != "row"
    )
    where = f"the cell in column {columns[0]!r}" if columns else "the rendered body"
    return f"{where} contains a NUL byte, refused"
