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
from collections.abc import Callable
from datetime import datetime

from twistmail.address import (
    Address,
    parse_address_list,
    parse_plain_address_list,
    parse_sender,
)
from twistmail.errors import MessageError
from twistmail.message import Envelope, envelope_from_stuffed
from twistmail.mime import MAILBOX as _MAILBOX
from twistmail.mime import MAX_LINE as _MAX_LINE
from twistmail.mime import PLAIN_TEXT as _PLAIN_TEXT
from twistmail.mime import STRUCTURED_KEYS as _STRUCTURED_KEYS
from twistmail.mime import date_line as _date_line
from twistmail.mime import fold_encoded, message_payload

from .headers import ADDRESS_HEADERS, POLICY, is_clean, parse_addresses
from .template import MessageTemplate

__all__ = ["render_direct"]

MessageIdFor = Callable[[int, str], str]
"""``(row id, domain) -> Message-ID``."""


def render_direct(
    template: MessageTemplate,
    values: dict[str, str],
    *,
    row_key: int,
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
    message_id = message_id_for(row_key, sender.ascii_domain)
    if not message_id.startswith("<"):
        message_id = f"<{message_id}>"
    if not message_id.isascii() or len(message_id) + 12 > _MAX_LINE:
        return None
    lines.append(_date_line(date))
    lines.append(f"Message-ID: {message_id}\r\n".encode("ascii"))
    text_kind = "html" if template.kind == "html" else "plain"
    parts = [template.attachment_part(a) for a in attachments] if attachments else None
    payload, size, header_end, eight_bit = message_payload(lines, text_kind, body, html, parts)
    envelope_sender = parse_sender(envelope_from, field="--from") if envelope_from else sender
    forward_paths = recipients["to"] + recipients["cc"] + recipients["bcc"]
    envelope = envelope_from_stuffed(
        envelope_sender, forward_paths, payload, size, header_end, message_id, eight_bit
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
