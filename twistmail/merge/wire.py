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
from email.utils import format_datetime

from twistmail.address import Address, parse_plain_address_list, parse_sender
from twistmail.message import Envelope, _envelope_from_crlf

from .headers import ADDRESS_HEADERS, RECIPIENT_HEADERS
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
    if template.kind == "markdown" or template.has_attachments:
        return None
    lines: list[bytes] = []
    first: dict[str, Address] = {}
    recipients: dict[str, list[Address]] = {key: [] for key in RECIPIENT_HEADERS}
    context = template.context(values)
    header_values, body = template.render_row(context)
    for header, value in header_values:
        key = header.key
        addresses = header.addresses
        if header.template is None and header.wire is not None:
            line = header.wire
        elif len(header.name) + 2 + len(value) > _MAX_LINE or not value.isascii():
            return None
        elif key in ADDRESS_HEADERS:
            # Written back unchanged by the email package only in this plainest form, without an
            # encoded-word lookalike (which it decodes); an invalid address steps aside too: the
            # full path reports it, naming the field.
            addresses = None if "=?" in value else parse_plain_address_list(value)
            if addresses is None:
                return None
            line = f"{header.name}: {value}\r\n".encode("ascii")
        elif key in _STRUCTURED_KEYS or "=?" in value or _PLAIN_TEXT.fullmatch(value) is None:
            return None
        else:
            line = f"{header.name}: {value}\r\n".encode("ascii")
        if key in ADDRESS_HEADERS:
            assert addresses is not None
            if addresses:
                first.setdefault(key, addresses[0])
            if key in recipients:
                recipients[key].extend(addresses)
        if key != "bcc":
            lines.append(line)
    sender = first.get("from")
    report_address = next((first[key] for key in RECIPIENT_HEADERS if key in first), None)
    if sender is None or report_address is None:
        return None  # the full path raises the row's error
    if body is None:
        body = template.render_body(context)
    ascii_body = body.isascii()
    body_lines = body.encode("utf-8").splitlines()
    if body_lines and max(map(len, body_lines)) > _MAX_LINE:
        return None  # the email package would choose quoted-printable or base64
    message_id = message_id_for(row, sender.ascii_domain)
    if not message_id.startswith("<"):
        message_id = f"<{message_id}>"
    if not message_id.isascii() or len(message_id) + 12 > _MAX_LINE:
        return None
    lines.append(_date_line(date))
    lines.append(f"Message-ID: {message_id}\r\n".encode("ascii"))
    lines.append(_CONTENT_HEADERS[template.kind, ascii_body])
    head = b"".join(lines)
    envelope_sender = parse_sender(envelope_from, field="--from") if envelope_from else sender
    forward_paths = [address for key in RECIPIENT_HEADERS for address in recipients[key]]
    # Every line above ends in CRLF (values with a line break were refused, literal headers
    # are folded by policy.SMTP, body lines are re-joined with CRLF).
    envelope = _envelope_from_crlf(
        envelope_sender,
        forward_paths,
        head + b"\r\n".join(body_lines) + b"\r\n",
        len(head) - 2,
        message_id,
    )
    if not ascii_body:
        # An 8-bit body: for a server without 8BITMIME, rebuilt as 7-bit from these bytes.
        envelope = dataclasses.replace(envelope, rendered=True)
    return envelope, str(report_address), message_id


_CONTENT_HEADERS = {
    (kind, ascii_body): (
        f'Content-Type: text/{kind}; charset="utf-8"\r\n'
        f"Content-Transfer-Encoding: {'7bit' if ascii_body else '8bit'}\r\n"
        "MIME-Version: 1.0\r\n"
        "\r\n"
    ).encode("ascii")
    for kind in ("plain", "html")
    for ascii_body in (True, False)
}


_dates: dict[datetime, bytes] = {}


def _date_line(date: datetime) -> bytes:
    """The Date header line; rows rendered within the same second share one."""
    line = _dates.get(date)
    if line is None:
        _dates.clear()
        line = _dates[date] = f"Date: {format_datetime(date)}\r\n".encode("ascii")
    return line
