"""An ``EmailMessage`` written directly, byte for byte as ``as_bytes(policy=SMTP)`` writes it.

The email package's generator folds every header again from its parse tree (most of the cost
of flattening a simple message). A header value that fits on its line, in ASCII, is written
by it as the text of its parse tree, which for most header classes is the header's own string
value: :func:`flatten_simple` writes those lines directly, folds the others with the email
package itself (``policy.fold_binary``, the generator's own call), and reads the addresses
once. A message it does not cover (multipart, an address needing SMTPUTF8 or an A-label, a
value the checks refuse) gives None, and :func:`twistmail.message.envelope_from_message` takes
its full path. ``tests/test_flatten.py`` compares both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.headerregistry import (
    BaseHeader,
    ContentTransferEncodingHeader,
    DateHeader,
    MessageIDHeader,
    MIMEVersionHeader,
    ParameterizedMIMEHeader,
    UnstructuredHeader,
)
from email.message import EmailMessage

from twistmail.address import (
    Address,
    check_header_value,
    parse_address_list,
    parse_plain_address_list,
)
from twistmail.errors import HeaderInjectionError, MessageError
from twistmail.mime import ADDRESS_HEADERS, HEADER_NAME, MAX_LINE, POLICY

__all__ = ["Flat", "check_headers", "flatten_simple", "id_line", "unfold"]

# A line break followed by whitespace and then content: header folding, not a new header line.
_FOLD = re.compile(r"(?:\r\n|[\r\n])(?=[ \t]+[^ \t\r\n])")
_NEWLINES = re.compile(r"\r\n|\r|\n")  # the generator's NLCRE
# Header classes whose string value is the text of their parse tree (see the module doc);
# an address header's string is its addresses rewritten, so it is compared with the tree.
_AS_PARSED = (
    UnstructuredHeader,
    MessageIDHeader,
    MIMEVersionHeader,
    ParameterizedMIMEHeader,
    ContentTransferEncodingHeader,
)
# Senders repeat across a bulk send: their headers' addresses, read once.
_REPEATED = frozenset({"from", "sender", "reply-to"})
_KNOWN: dict[str, tuple[Address, ...]] = {}
_MAX_KNOWN = 1024


def unfold(value: str) -> str:
    """``value`` with header folding (a line break followed by whitespace) undone."""
    return _FOLD.sub("", value) if ("\n" in value or "\r" in value) else value


def check_headers(msg: EmailMessage) -> None:
    """Refuse header names and stored values that would break the header block when written.

    The stored (raw) values are checked: the parsed view of a header hides line breaks that
    the generator would still write out.
    """
    for name, value in msg.raw_items():
        if HEADER_NAME.fullmatch(name) is None:
            raise HeaderInjectionError(f"header name {name!r} is not valid", field=name)
        check_header_value(name, unfold(str(value)))


@dataclass(slots=True)
class Flat:
    """A single-part message's header lines (Bcc left out), its body and its addresses."""

    lines: list[bytes]
    """Each header line as policy.SMTP writes it, CRLF included."""
    body: bytes
    """The body as written, CRLF line ends (no blank line before it)."""
    addresses: dict[str, list[Address]]
    """The addresses of each address header, by lower-case name (Bcc included)."""
    dated: bool
    """Whether the message has a Date header."""
    identified: bool
    """Whether the message has a Message-ID header."""


def flatten_simple(msg: EmailMessage) -> Flat | None:
    """``msg`` as policy.SMTP writes it, or None when the full path must write (or refuse) it.

    Never raises for a bad value: the full path names the problem.
    """
    payload = getattr(msg, "_payload", None)
    if type(payload) is not str:
        return None  # multipart, or no body
    try:
        # The generator writes the payload's lines with CRLF; an 8bit payload holds its bytes
        # as surrogate escapes. (Without a CR, a replace does what the regex does, faster.)
        if "\r" in payload:
            lines_crlf = _NEWLINES.sub("\r\n", payload)
        else:
            lines_crlf = payload.replace("\n", "\r\n")
        body = lines_crlf.encode("ascii", "surrogateescape")
        lines: list[bytes] = []
        addresses: dict[str, list[Address]] = {}
        dated = identified = False
        for name, value in msg.raw_items():
            if HEADER_NAME.fullmatch(name) is None:
                return None
            key = name.lower()
            if key == "date":
                dated = True
            elif key == "message-id":
                identified = True
            text = str(value)
            check_header_value(name, unfold(text))
            line: bytes | None = None
            found: tuple[Address, ...] | list[Address] | None = None
            if (
                isinstance(value, BaseHeader)
                and value.name == name  # what the generator writes as the label
                and text
                and len(name) + 2 + len(text) <= MAX_LINE
                and text.isascii()
            ):
                if key in ADDRESS_HEADERS:
                    found = _plain_addresses(key, value, text)
                    if found is not None:
                        line = f"{name}: {text}\r\n".encode("ascii")
                elif isinstance(value, _AS_PARSED) or (
                    isinstance(value, DateHeader) and value.datetime is not None
                ):
                    line = f"{name}: {text}\r\n".encode("ascii")
            if key in ADDRESS_HEADERS:
                if found is None:
                    # Read as msg.get_all() reads it (a parsed message stores source text).
                    parsed = str(msg.policy.header_fetch_parse(name, value))
                    found = parse_address_list(unfold(parsed), field=name)
                if key != "bcc" and not all(
                    a.local.isascii() and a.domain.isascii() for a in found
                ):
                    return None  # SMTPUTF8 or A-labels: the full path
                addresses.setdefault(key, []).extend(found)
                if key == "bcc":
                    continue
            if line is None:
                line = POLICY.fold_binary(name, value)
                if not line.isascii():
                    return None
            lines.append(line)
    except (MessageError, ValueError, TypeError, AttributeError, IndexError, LookupError):
        return None
    return Flat(lines, body, addresses, dated, identified)


def id_line(message_id: str) -> bytes:
    """The Message-ID line policy.SMTP writes for ``message_id`` (``<left@right>``, ASCII)."""
    if len(message_id) + 12 <= MAX_LINE:
        return f"Message-ID: {message_id}\r\n".encode("ascii")
    folded: str = POLICY.header_factory("Message-ID", message_id).fold(policy=POLICY)
    return folded.encode("ascii")


def _plain_addresses(key: str, value: BaseHeader, text: str) -> tuple[Address, ...] | None:
    """The addresses of an address header written back as its string value, else None."""
    tree = getattr(value, "_parse_tree", None)
    if tree is None or str(tree) != text:
        return None  # written from a source that reads differently (quotes, comments ...)
    if key not in _REPEATED:
        return parse_plain_address_list(text)
    known = _KNOWN.get(text)
    if known is None:
        known = parse_plain_address_list(text)
        if known is None:
            return None
        if len(_KNOWN) >= _MAX_KNOWN:
            _KNOWN.clear()
        _KNOWN[text] = known
    return known
