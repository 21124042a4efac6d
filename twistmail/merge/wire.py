"""The direct renderer: a template row straight to wire bytes, for the common simple message.

Building an ``EmailMessage`` and flattening it costs about a millisecond a row, mostly in the
email package's header parsing and folding. For a single-part message whose header values are
ASCII and need no encoding or folding, and whose body lines are at most 78 octets, the bytes
that path produces are known in advance:

    the template's headers in order (Bcc left out), ``Date``, ``Message-ID``,
    ``Content-Type: text/<kind>; charset="utf-8"``, ``Content-Transfer-Encoding: 7bit``
    (``8bit`` for a non-ASCII body), ``MIME-Version: 1.0``, a blank line, then the body's
    lines, each ending CRLF.

:func:`render_direct` writes exactly those bytes and returns None for anything else (a
non-ASCII header value, a long body line, a value that would be folded or encoded, a display
name needing quotes, an attachment, Markdown), which then takes the email package path. Tests
render both ways and compare the bytes.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from datetime import datetime
from email import _encoded_words, contentmanager  # type: ignore[attr-defined]
from email.generator import BytesGenerator
from email.policy import Policy
from email.utils import format_datetime

from twistmail.address import (
    Address,
    parse_address_list,
    parse_plain_address_list,
    parse_sender,
)
from twistmail.errors import MessageError
from twistmail.message import Envelope, envelope_from_stuffed

from .attachments import dot_stuffed
from .headers import ADDRESS_HEADERS, POLICY, is_clean, parse_addresses
from .template import MessageTemplate

__all__ = ["render_direct"]

# Unstructured values written back unchanged: printable ASCII words separated by one space.
_PLAIN_TEXT = re.compile(r"[\x21-\x7e]+(?: [\x21-\x7e]+)*")
# policy.SMTP folds header lines longer than this, and re-encodes body lines longer than it.
_MAX_LINE = 78
# Headers the email package parses as something other than unstructured text.
_STRUCTURED_KEYS = frozenset(
    {
        "resent-date",
        "orig-date",
        "resent-sender",
        "resent-to",
        "resent-cc",
        "resent-bcc",
        "resent-from",
        "content-disposition",
    }
)

MessageIdFor = Callable[[int, str], str]


def render_direct(
    template: MessageTemplate,
    values: dict[str, str],
    *,
    row: int,
    message_id_for: MessageIdFor,
    envelope_from: str | None,
    date: datetime,
) -> tuple[Envelope, str, str] | None:
    """``(envelope, report address, Message-ID)`` for one row, or None to take the full path.

    Errors of the row itself (an undefined variable, a line break in a value) are raised as the
    full path raises them, as :class:`~.template.RowError`.
    """
    lines: list[bytes] = []
    first: dict[str, Address] = {}
    # Literals, not comprehensions: each of those is a function call per row.
    recipients: dict[str, list[Address]] = {"to": [], "cc": [], "bcc": []}
    context = template.context(values)
    header_values, body = template.render_row(context)
    for header, value in header_values:
        key = header.key
        addresses = header.addresses
        if header.template is None and header.wire is not None:
            line = header.wire
        elif (
            len(header.name) + 2 + len(value) <= _MAX_LINE
            and value.isascii()
            and "=?" not in value
            and (
                # Written back unchanged by the email package only in this plainest form,
                # without an encoded-word lookalike (which it decodes).
                (plain := parse_plain_address_list(value)) is not None
                if key in ADDRESS_HEADERS
                else key not in _STRUCTURED_KEYS and _PLAIN_TEXT.fullmatch(value) is not None
            )
        ):
            line = f"{header.name}: {value}\r\n".encode("ascii")
            if key in ADDRESS_HEADERS:
                addresses = plain
        else:
            encoded = _folded(header.name, key, value)
            if encoded is None:
                return None
            line, addresses = encoded
        if key in ADDRESS_HEADERS:
            assert addresses is not None
            if addresses:
                first.setdefault(key, addresses[0])
            if key in recipients:
                recipients[key].extend(addresses)
        if key != "bcc":
            lines.append(line)
    sender = first.get("from")
    # The first of RECIPIENT_HEADERS ("to", "cc", "bcc") that has an address.
    report_address = first.get("to")
    if report_address is None:
        report_address = first.get("cc")
        if report_address is None:
            report_address = first.get("bcc")
    if sender is None or report_address is None:
        return None  # the full path raises the row's error
    # In the full path's order, so a row with several faults reports the same one first.
    attachments = template.attachments(context) if template.has_attachments else []
    if body is None:
        body = template.render_body(context)
    html = template.render_markdown_html(context) if template.kind == "markdown" else None
    message_id = message_id_for(row, sender.ascii_domain)
    if not message_id.startswith("<"):
        message_id = f"<{message_id}>"
    if not message_id.isascii() or len(message_id) + 12 > _MAX_LINE:
        return None
    lines.append(_date_line(date))
    lines.append(f"Message-ID: {message_id}\r\n".encode("ascii"))
    stuffed: dict[int, bytes] = {}
    text_kind = "html" if template.kind == "html" else "plain"
    content, text = text_part(text_kind, body)
    if html is None and not attachments:
        lines += (content, b"MIME-Version: 1.0\r\n\r\n")
        tail = [text]
    else:
        if html is not None:
            html_content, html_text = text_part("html", html)
            # The HTML part was made by add_alternative: a message of its own, with MIME-Version.
            content, tail = multipart(
                "alternative",
                [
                    content + b"\r\n" + text,
                    html_content + b"MIME-Version: 1.0\r\n\r\n" + html_text,
                ],
            )
        else:
            tail = [text]
        if attachments:
            parts = [template.attachment_part(a) for a in attachments]
            content, tail = multipart(
                "mixed",
                [b"".join([content, b"\r\n", *tail]), *(part for part, _ in parts)],
                cached=len(attachments),
            )
            stuffed = {id(part): wire for part, wire in parts}
        lines += (b"MIME-Version: 1.0\r\n", content, b"\r\n")
    head = b"".join(lines)
    envelope_sender = parse_sender(envelope_from, field="--from") if envelope_from else sender
    forward_paths = recipients["to"] + recipients["cc"] + recipients["bcc"]
    # Every line above ends in CRLF (values with a line break were refused, literal headers
    # are folded by policy.SMTP, body lines are re-joined with CRLF), and every piece starts
    # a line: each is dot-stuffed on its own, an attachment part once per campaign.
    if len(tail) == 1 and not stuffed:  # one text part: the common message, no generator
        size = len(head) + len(tail[0])
        payload = b"".join((head, dot_stuffed(tail[0]), b".\r\n"))
    else:
        size = len(head) + sum(map(len, tail))
        payload = b"".join(
            [head, *(stuffed.get(id(piece)) or dot_stuffed(piece) for piece in tail), b".\r\n"]
        )
    envelope = envelope_from_stuffed(
        envelope_sender, forward_paths, payload, size, len(head) - 2, message_id
    )
    if envelope.eight_bit:
        # An 8-bit body: for a server without 8BITMIME, rebuilt as 7-bit from these bytes.
        envelope = dataclasses.replace(envelope, rendered=True)
    return envelope, str(report_address), message_id


def _folded(name: str, key: str, value: str) -> tuple[bytes, tuple[Address, ...] | None] | None:
    """A header value that needs folding or RFC 2047 encoded words, as policy.SMTP writes it
    (the email package's own header object, folded), with its addresses; None when the full
    path could write or read it otherwise.

    Stepped aside: structured headers other than addresses, encoded-word lookalikes (the email
    package decodes them), a long address header with quotes (which the full path checks for
    Python 3.11's folding bug), values the email package rejects, addresses that need
    SMTPUTF8 or A-labels, and any address list that does not read back the same.
    """
    if key in _STRUCTURED_KEYS or "=?" in value:
        return None
    addresses: tuple[Address, ...] | None = None
    fast = fold_encoded(name, key, value)
    if fast is not None:
        if key not in ADDRESS_HEADERS:
            return fast.encode("ascii"), None
        # One mailbox: its address in the plainest form is the one the full path reads.
        mailbox = _MAILBOX.fullmatch(value)
        assert mailbox is not None
        addresses = parse_plain_address_list(mailbox.group(3))
        if addresses is not None and len(addresses) == 1:
            return fast.encode("ascii"), addresses
    if key in ADDRESS_HEADERS:
        if len(name) + 2 + len(value) > _MAX_LINE and '"' in value:
            return None
        # Raises the RowError the full path raises for an invalid address.
        addresses = tuple(parse_addresses(name, value))
        if not all(a.local.isascii() and a.domain.isascii() for a in addresses):
            return None
    try:
        parsed = POLICY.header_factory(name, value)
        folded = parsed.fold(policy=POLICY)
        # What envelope_from_message reads back from the parsed header.
        if (
            addresses is not None
            and tuple(parse_address_list(str(parsed), field=name)) != addresses
        ):
            return None
    # What the email package's parser raises on some values (see MessageTemplate.render).
    except (ValueError, TypeError, IndexError, AttributeError, MessageError):
        return None
    if not folded.isascii() or not is_clean(name, str(parsed)):
        return None
    return folded.encode("ascii"), addresses


# Words the email package's folder writes as they are (unstructured text: any printable ASCII;
# a display name: letters and digits only, so no special needs quoting), and words of
# non-ASCII letters and digits it puts in an RFC 2047 encoded word.
_PRINTABLE_WORD = re.compile(r"[\x21-\x7e]+")
_NAME_WORD = re.compile(r"[A-Za-z0-9]+")
_MAILBOX = re.compile(r'(?:"([^"\\]+)"|([^"<>]+)) <([\x21-\x3b\x3d\x3f-\x7e]+)>')
_encode_word: Callable[..., str] = _encoded_words.encode


def fold_encoded(name: str, key: str, value: str) -> str | None:
    """The header line policy.SMTP writes for a short value with non-ASCII words, built
    directly; None for anything else.

    Handled: an unstructured value (a Subject) or a single mailbox with a display name
    (``"Zoë Müller" <zoe@example.org>``), its words separated by single spaces, the line
    fitting in 78 characters once encoded. The email package then writes the ASCII words
    before the first non-ASCII word and after the last one as they are, and everything from
    the first non-ASCII word to the last as one encoded word (it combines each new encoded
    word with the previous one), Q or B as :func:`email._encoded_words.encode` chooses. Tests
    compare this with the email package's folding.
    """
    if key in ADDRESS_HEADERS:
        match = _MAILBOX.fullmatch(value)
        if match is None:
            return None
        phrase = match.group(1) or match.group(2)
        tail = f" <{match.group(3)}>"
        plain_word = _NAME_WORD
    elif key in _STRUCTURED_KEYS:
        return None
    else:
        phrase, tail, plain_word = value, "", _PRINTABLE_WORD
    if "\t" in phrase:
        return None
    words = phrase.split(" ")
    encoded = [i for i, word in enumerate(words) if not word.isascii()]
    if not encoded:
        return None
    for word in words:
        if word.isascii():
            if plain_word.fullmatch(word) is None:
                return None
        elif plain_word is _NAME_WORD and not word.isalnum():
            return None
    first, last = encoded[0], encoded[-1]
    line = f"{name}: " + "".join(word + " " for word in words[:first])
    room = _MAX_LINE - len(line)
    # Each combined encoded word (and the plain words after it, up to the next) must fit on
    # the line as it grows, or the email package would have folded.
    for index, end in enumerate(encoded):
        text = " ".join(words[first : end + 1])
        if len(text) > room - _EW_CHROME:
            return None
        word = _encode_word(text, charset="utf-8")
        following = encoded[index + 1] if index + 1 < len(encoded) else len(words)
        between = sum(len(w) + 1 for w in words[end + 1 : following])
        if len(word) + between + (len(tail) if following == len(words) else 1) > room:
            return None
    line += word + "".join(" " + w for w in words[last + 1 :]) + tail
    return line + "\r\n" if len(line) <= _MAX_LINE else None


# "=?utf-8?q?" and "?=": the room an encoded word takes besides its text.
_EW_CHROME = 12


_CONTENT_HEADERS = {
    (kind, cte): (
        f'Content-Type: text/{kind}; charset="utf-8"\r\nContent-Transfer-Encoding: {cte}\r\n'
    ).encode("ascii")
    for kind in ("plain", "html")
    for cte in ("7bit", "8bit", "quoted-printable", "base64")
}

# The email package's own choice of transfer encoding for a text body and its encoded lines
# (email.contentmanager, used by set_content): calling it is what makes the bytes the same.
_encode_text: Callable[[str, str, None, Policy], tuple[str, str]] = contentmanager._encode_text  # type: ignore[attr-defined]


_BODY_LINE = POLICY.max_line_length or 0
_EIGHT_BIT = POLICY.cte_type == "8bit"


def text_part(kind: str, body: str) -> tuple[bytes, bytes]:
    """A text part as ``set_content(body, subtype=kind)`` makes it and policy.SMTP writes it:
    its Content-Type and Content-Transfer-Encoding lines, and the encoded body (CRLF)."""
    lines = body.encode("utf-8").splitlines()
    if max(map(len, lines), default=0) <= _BODY_LINE and _EIGHT_BIT:
        # What _encode_text chooses for short lines (7bit, else 8bit), without its Python-level
        # line scan: the common template's path, row after row.
        encoded = b"\r\n".join(lines) + b"\r\n"
        return _CONTENT_HEADERS[kind, "7bit" if encoded.isascii() else "8bit"], encoded
    cte, data = _encode_text(body, "utf-8", None, POLICY)
    # The generator writes the payload's lines with CRLF; an 8bit payload holds the UTF-8
    # bytes as surrogate escapes.
    encoded = data.encode("ascii", "surrogateescape").replace(b"\n", b"\r\n")
    return _CONTENT_HEADERS[kind, cte], encoded


def multipart(subtype: str, parts: list[bytes], *, cached: int = 0) -> tuple[bytes, list[bytes]]:
    """A ``multipart/<subtype>`` of the flattened ``parts`` as the generator writes it: its
    Content-Type line (with the boundary) and the body's pieces.

    The boundary comes from the generator's own ``_make_boundary``, so it consumes the same
    random number. The generator searches every part for a line ``--boundary`` before it
    takes it; the last ``cached`` parts are attachments, whose base64 lines hold no ``-``, so
    only their header blocks are searched.
    """
    searched = parts[: len(parts) - cached] + [
        part[: part.index(b"\r\n\r\n") + 4] for part in parts[len(parts) - cached :]
    ]
    text = b"\r\n".join(searched)
    # The generator's search (a regex compiled per boundary, "^--boundary(--)?$" in MULTILINE
    # mode) cannot match text whose lines all end in CRLF ("$" matches only before "\n" or at
    # the end): for such text the boundary is its first random pick, made by the same call.
    crlf_only = text.endswith(b"\r\n") and text.count(b"\n") == text.count(b"\r\n")
    boundary = _make_boundary(None if crlf_only else text)
    delimiter = b"\r\n--" + boundary.encode("ascii") + b"\r\n"
    body: list[bytes] = [delimiter[2:]]
    for index, part in enumerate(parts):
        if index:
            body.append(delimiter)
        body.append(part)
    body.append(b"\r\n--" + boundary.encode("ascii") + b"--\r\n")
    return _content_type(subtype, boundary), body


_make_boundary: Callable[[bytes | None], str] = BytesGenerator._make_boundary  # type: ignore[attr-defined]
_folded_types: dict[tuple[str, int], tuple[str, bytes]] = {}


def _content_type(subtype: str, boundary: str) -> bytes:
    """The ``Content-Type: multipart/...; boundary=...`` line policy.SMTP writes (folded).

    Folding depends on the boundary's length, not on its characters (always ``=``, digits and
    ``.``): the line is folded once per length and the boundary put in.
    """
    key = (subtype, len(boundary))
    known = _folded_types.get(key)
    if known is None:
        value = f'multipart/{subtype}; boundary="{boundary}"'
        folded = POLICY.header_factory("Content-Type", value).fold(policy=POLICY)
        known = _folded_types[key] = (boundary, folded.encode("ascii"))
    return known[1].replace(known[0].encode("ascii"), boundary.encode("ascii"))


_dates: dict[datetime, bytes] = {}


def _date_line(date: datetime) -> bytes:
    """The Date header line; rows rendered within the same second share one."""
    line = _dates.get(date)
    if line is None:
        _dates.clear()
        line = _dates[date] = f"Date: {format_datetime(date)}\r\n".encode("ascii")
    return line
