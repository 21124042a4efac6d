"""MIME pieces written directly, byte for byte as the email package writes them with policy.SMTP.

Building an ``EmailMessage`` and flattening it costs most of a millisecond, mostly in the email
package's header parsing and folding. For the common shapes the bytes it writes are known in
advance; the functions here write them directly and answer None (or are not called) for
anything else, which then takes the email package's own path. Shared by
:func:`twistmail.compose` and the mail merge's direct renderer (``twistmail.merge.wire``);
``tests/test_compose.py`` and ``tests/test_wire.py`` compare their bytes with the email
package's.
"""

from __future__ import annotations

import mimetypes
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from email import _encoded_words, contentmanager, policy, quoprimime  # type: ignore[attr-defined]
from email.generator import BytesGenerator
from email.headerregistry import BaseHeader, HeaderRegistry
from email.message import EmailMessage
from email.policy import Policy
from email.utils import format_datetime

__all__ = [
    "ADDRESS_HEADERS",
    "HEADER_NAME",
    "MAX_LINE",
    "POLICY",
    "Attachment",
    "date_line",
    "dot_stuffed",
    "encode_part",
    "fold_encoded",
    "local_now",
    "message_payload",
    "multipart",
    "quoted_printable",
    "text_part",
]

HEADER_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+")
"""A valid header field name (RFC 5322: printable ASCII but the colon)."""
ADDRESS_HEADERS = frozenset({"from", "sender", "reply-to", "to", "cc", "bcc"})
"""The headers (lower-case) whose values are address lists."""

# Unstructured values written back unchanged: printable ASCII words separated by one space.
PLAIN_TEXT = re.compile(r"[\x21-\x7e]+(?: [\x21-\x7e]+)*")
# policy.SMTP folds header lines longer than this, and re-encodes body lines longer than it.
MAX_LINE = 78
# Headers the email package parses as something other than unstructured text, besides the
# address headers and those its callers write themselves (Date, Message-ID, the MIME ones).
STRUCTURED_KEYS = frozenset(
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


class _CachingHeaderRegistry(HeaderRegistry):
    """The standard header registry, building each header class once instead of on every use.

    HeaderRegistry makes a new class per header set, read or counted, which was about a fifth
    of the cost of rendering a message.
    """

    def __init__(self) -> None:
        super().__init__()
        self._classes: dict[str, type[BaseHeader]] = {}

    def __getitem__(self, name: str) -> type[BaseHeader]:
        key = name.lower()
        cls = self._classes.get(key)
        if cls is None:
            cls = self._classes[key] = super().__getitem__(key)
        return cls


POLICY = policy.SMTP.clone(header_factory=_CachingHeaderRegistry())
"""policy.SMTP itself, with a faster header factory: messages render byte for byte the same."""


@dataclass(frozen=True, slots=True)
class Attachment:
    """One attachment: its bytes, its MIME type and the file name the recipient sees."""

    data: bytes
    maintype: str
    subtype: str
    filename: str

    @classmethod
    def named(cls, filename: str, data: bytes) -> Attachment:
        """``data`` as ``filename``, its MIME type guessed from the name
        (``application/octet-stream`` when unknown or compressed)."""
        mime, encoding = mimetypes.guess_type(filename, strict=False)
        if mime is None or encoding is not None:
            mime = "application/octet-stream"
        maintype, subtype = mime.split("/", 1)
        return cls(data, maintype, subtype, os.path.basename(filename))


def dot_stuffed(lines: bytes) -> bytes:
    """``lines`` (whole CRLF lines) with a "." added before every line that starts with one."""
    if lines.startswith(b"."):
        lines = b"." + lines
    return lines.replace(b"\r\n.", b"\r\n..")


def encode_part(attachment: Attachment) -> bytes:
    """The MIME part the email package makes of ``attachment`` in ``add_attachment``, flattened
    with :data:`email.policy.SMTP` as the generator writes a subpart: ASCII (base64 data, a
    non-ASCII file name encoded), which :func:`message_payload` counts on."""
    part = EmailMessage(policy=policy.SMTP)
    # What EmailMessage._add_multipart does for add_attachment.
    part.set_content(
        attachment.data,
        maintype=attachment.maintype,
        subtype=attachment.subtype,
        filename=attachment.filename,
    )
    if "content-disposition" not in part:
        part["Content-Disposition"] = "attachment"
    return part.as_bytes(policy=policy.SMTP)


# Words the email package's folder writes as they are (unstructured text: any printable ASCII;
# a display name: letters and digits only, so no special needs quoting), and words of
# non-ASCII letters and digits it puts in an RFC 2047 encoded word.
_PRINTABLE_WORD = re.compile(r"[\x21-\x7e]+")
_NAME_WORD = re.compile(r"[A-Za-z0-9]+")
MAILBOX = re.compile(r'(?:"([^"\\]+)"|([^"<>]+)) <([\x21-\x3b\x3d\x3f-\x7e]+)>')
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
        match = MAILBOX.fullmatch(value)
        if match is None:
            return None
        phrase = match.group(1) or match.group(2)
        tail = f" <{match.group(3)}>"
        plain_word = _NAME_WORD
    elif key in STRUCTURED_KEYS:
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
    room = MAX_LINE - len(line)
    # Each combined encoded word (and the plain words after it, up to the next) must fit on
    # the line as it grows, or the email package would have folded.
    for index, end in enumerate(encoded):
        text = " ".join(words[first : end + 1])
        if len(text) > room - _EW_CHROME:
            return None
        word = _encode_word(text, charset="utf-8")
        following = encoded[index + 1] if index + 1 < len(encoded) else len(words)
        if following == len(words) and not tail:
            # After the last encoded word: plain words fill the line, then fold (below).
            if len(word) > room:
                return None
            break
        between = sum(len(w) + 1 for w in words[end + 1 : following])
        if len(word) + between + (len(tail) if following == len(words) else 1) > room:
            return None
    line += word
    if tail:
        line += "".join(" " + w for w in words[last + 1 :]) + tail
        return line + "\r\n" if len(line) <= MAX_LINE else None
    # Unstructured text: the words after the last encoded word go on the line while they fit;
    # a word that does not starts a continuation line, its space the folding white space.
    lines = []
    for plain in words[last + 1 :]:
        if len(line) + 1 + len(plain) > MAX_LINE:
            lines.append(line)
            line = ""
            if 1 + len(plain) > MAX_LINE:
                return None
        line += " " + plain
    lines.append(line)
    return "\r\n".join(lines) + "\r\n"


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
    quoted = quoted_printable(lines) if _EIGHT_BIT else None
    if quoted is not None:
        return _CONTENT_HEADERS[kind, "quoted-printable"], quoted
    cte, data = _encode_text(body, "utf-8", None, POLICY)
    # The generator writes the payload's lines with CRLF; an 8bit payload holds the UTF-8
    # bytes as surrogate escapes.
    encoded = data.encode("ascii", "surrogateescape").replace(b"\n", b"\r\n")
    return _CONTENT_HEADERS[kind, cte], encoded


_quoted_lines: dict[bytes, bytes] = {}


def quoted_printable(lines: list[bytes]) -> bytes | None:
    """The body ``_encode_text`` writes (with CRLF) for ``lines``, some over 78 octets, when it
    chooses quoted-printable; None when it chooses base64.

    The email package's encoder (``quoprimime.body_encode``) encodes each line on its own, so
    each distinct line is encoded once and kept: a template's lines recur row after row. Its
    choice is the same: quoted-printable unless the first ten lines' encoding is longer than
    their base64. Tests compare this with ``_encode_text``.
    """
    kept = _quoted_lines.get
    encoded = [kept(line) or _quoted_line(line) for line in lines]
    sniffed = b"\r\n".join(encoded[:10])
    size = sum(map(len, lines[:10])) + 2 * len(lines[:10])  # the ten lines, CRLF after each
    # Its sniff's quoted-printable text has "\n" line ends (soft breaks too), one after each.
    if len(sniffed) - sniffed.count(b"\r") + 1 > (size + 2) // 3 * 4 + 1:
        return None
    return b"\r\n".join(encoded) + b"\r\n"


def _quoted_line(line: bytes) -> bytes:
    """``line`` encoded (soft breaks with CRLF), kept for the next row."""
    if len(_quoted_lines) >= _QUOTED_LINES_KEPT:
        _quoted_lines.clear()
    text = _body_encode(line.decode("latin-1"), _BODY_LINE, "\r\n")
    quoted = _quoted_lines[line] = text.encode("ascii")
    return quoted


_QUOTED_LINES_KEPT = 4096
_body_encode: Callable[[str, int, str], str] = quoprimime.body_encode


def message_payload(
    lines: list[bytes],
    kind: str,
    text: str,
    html: str | None = None,
    attachments: list[tuple[bytes, bytes]] | None = None,
) -> tuple[bytes, int, int, bool | None]:
    """The DATA payload of a message as ``set_content``, ``add_alternative`` and
    ``add_attachment`` make it and policy.SMTP writes it; its size before dot-stuffing; where
    its header block ends (just past the last header line's CRLF); and whether it has a byte
    over 127 when that is known without scanning it (None: the caller scans).

    ``lines`` are the header lines before the MIME ones (Date and Message-ID included), each
    ending CRLF; the MIME lines and the blank line are appended to it. ``text`` is the body, a
    ``text/<kind>`` part (``plain`` or ``html``); ``html`` an HTML alternative to it;
    ``attachments`` each attachment's part (:func:`encode_part`) and the same dot-stuffed
    (:func:`dot_stuffed`), so a caller sending one file many times encodes it once.
    """
    stuffed: dict[int, bytes] = {}
    content, body = text_part(kind, text)
    if html is None and not attachments:
        lines += (content, b"MIME-Version: 1.0\r\n\r\n")
        tail = [body]
    else:
        if html is not None:
            html_content, html_text = text_part("html", html)
            # The HTML part was made by add_alternative: a message of its own, with MIME-Version.
            content, tail = multipart(
                "alternative",
                [
                    content + b"\r\n" + body,
                    html_content + b"MIME-Version: 1.0\r\n\r\n" + html_text,
                ],
            )
        else:
            tail = [body]
        if attachments:
            content, tail = multipart(
                "mixed",
                [b"".join([content, b"\r\n", *tail]), *(part for part, _ in attachments)],
                cached=len(attachments),
            )
            stuffed = {id(part): wire for part, wire in attachments}
        lines += (b"MIME-Version: 1.0\r\n", content, b"\r\n")
    head = b"".join(lines)
    # Every header line ends in CRLF (values with a line break are refused, long ones folded
    # as policy.SMTP folds them, body lines are re-joined with CRLF), and every piece starts a
    # line: each is dot-stuffed on its own, an attachment part once by its caller.
    if len(tail) == 1 and not stuffed:  # one text part: the common message, no generator
        size = len(head) + len(tail[0])
        payload = b"".join((head, dot_stuffed(tail[0]), b".\r\n"))
    else:
        size = len(head) + sum(map(len, tail))
        payload = b"".join(
            [head, *(stuffed.get(id(piece)) or dot_stuffed(piece) for piece in tail), b".\r\n"]
        )
    eight_bit = None
    if stuffed:  # attachment parts are ASCII (encode_part's are): not scanned every message
        eight_bit = not (
            head.isascii() and all(piece.isascii() for piece in tail if id(piece) not in stuffed)
        )
    return payload, size, len(head) - 2, eight_bit


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


def local_now() -> datetime:
    """This second in local time: what ``email.utils.formatdate(localtime=True)`` writes."""
    return datetime.now().astimezone().replace(microsecond=0)


def date_line(date: datetime) -> bytes:
    """The Date header line; rows rendered within the same second share one."""
    line = _dates.get(date)
    if line is None:
        _dates.clear()
        line = _dates[date] = f"Date: {format_datetime(date)}\r\n".encode("ascii")
    return line
