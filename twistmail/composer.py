"""Compose the common message straight into an :class:`~twistmail.message.Envelope`.

:func:`compose` takes what most mail is made of (From, To, Cc, Bcc, Reply-To, a Subject, a
text body, an HTML alternative, extra headers, attachments) and returns the envelope of the
message the email package would write for the same ``EmailMessage`` built the ordinary way::

    msg = EmailMessage(policy=policy.SMTP)
    msg["From"] = from_addr
    msg["To"] = ", ".join(to)            # and Cc, Bcc, Reply-To when given
    msg["Subject"] = subject             # when not empty
    for name, value in headers:
        msg[name] = value
    msg["Date"] = date                   # now, when not given
    msg["Message-ID"] = message_id       # make_msgid(domain of From), when not given
    msg.set_content(text)                # or set_content(html, subtype="html") without text
    msg.add_alternative(html, subtype="html")   # when both are given
    for a in attachments:
        msg.add_attachment(a.data, maintype=a.maintype, subtype=a.subtype, filename=a.filename)

byte for byte (Bcc is sent to, never written). Common values are written directly
(:mod:`twistmail.mime`); anything else (a long address list, a quoted display name, an
internationalised address ...) is built through the email package, so the bytes are the same
either way. ``tests/test_compose.py`` compares the two.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from email.message import EmailMessage

from twistmail.address import (
    Address,
    check_header_value,
    parse_address_list,
    parse_plain_address_list,
)
from twistmail.errors import AddressError, HeaderInjectionError, MessageError
from twistmail.message import (
    Envelope,
    envelope_from_message,
    envelope_from_stuffed,
    new_message_id,
)
from twistmail.mime import (
    ADDRESS_HEADERS,
    HEADER_NAME,
    MAILBOX,
    MAX_LINE,
    PLAIN_TEXT,
    POLICY,
    STRUCTURED_KEYS,
    Attachment,
    date_line,
    dot_stuffed,
    encode_part,
    fold_encoded,
    local_now,
    message_payload,
)

__all__ = ["Attachment", "compose"]

Addresses = str | Iterable[str]
"""One header value (``"Ann <ann@example.org>, bob@example.org"``) or several, joined by ``, ``."""

# Set by compose's own arguments, or by the MIME structure: not accepted in headers=.
_OWN_HEADERS = {
    "from": "from_addr",
    "to": "to",
    "cc": "cc",
    "bcc": "bcc",
    "reply-to": "reply_to",
    "subject": "subject",
    "date": "date",
    "message-id": "message_id",
}
_MIME_HEADERS = frozenset({"mime-version", "content-type", "content-transfer-encoding"})
# A Message-ID the email package writes back as it is: <dot-atom@dot-atom>.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_MSGID = re.compile(rf"<{_ATOM}(?:\.{_ATOM})*@{_ATOM}(?:\.{_ATOM})*>")


def compose(
    from_addr: str,
    to: Addresses = (),
    *,
    cc: Addresses = (),
    bcc: Addresses = (),
    reply_to: Addresses = (),
    subject: str = "",
    text: str | None = None,
    html: str | None = None,
    headers: Mapping[str, str] | Iterable[tuple[str, str]] = (),
    attachments: Iterable[Attachment] = (),
    date: datetime | None = None,
    message_id: str | None = None,
) -> Envelope:
    """The envelope of the message made of these parts, ready for :meth:`twistmail.Mailer.send`,
    ``send_many`` and every backend.

    ``from_addr`` is the From header (its first address the envelope sender); ``to``, ``cc``,
    ``bcc`` and ``reply_to`` are address header values (a ``str`` or a list of them); every To,
    Cc and Bcc address is a recipient, once. ``text`` is the ``text/plain`` body and ``html``
    an HTML alternative (or the only body); ``headers`` adds headers in order; ``attachments``
    are :class:`~twistmail.mime.Attachment` objects. ``date`` defaults to now and
    ``message_id`` to a new ``<...@from-domain>``.

    Raises :class:`~twistmail.errors.HeaderInjectionError` for a line break in a value,
    :class:`~twistmail.errors.AddressError` naming the header of an invalid address (or when
    there is no recipient), :class:`~twistmail.errors.MessageError` for anything else that
    cannot be sent (no body, a header given twice).
    """
    if text is None and html is None:
        raise MessageError("compose() needs a body: text=, html= or both")
    fields = _fields(from_addr, to, cc, bcc, reply_to, subject, headers)
    attached = list(attachments)
    direct = _direct(fields, text, html, attached, date, message_id)
    if direct is not None:
        return direct
    return envelope_from_message(_message(fields, text, html, attached, date, message_id))


def _fields(
    from_addr: str,
    to: Addresses,
    cc: Addresses,
    bcc: Addresses,
    reply_to: Addresses,
    subject: str,
    headers: Mapping[str, str] | Iterable[tuple[str, str]],
) -> list[tuple[str, str]]:
    """The message's header fields before Date and Message-ID, checked: names, line breaks."""
    fields = [("From", _joined("From", from_addr))]
    for name, value in (("To", to), ("Cc", cc), ("Bcc", bcc), ("Reply-To", reply_to)):
        joined = _joined(name, value)
        if joined:
            fields.append((name, joined))
    if subject:
        fields.append(("Subject", subject))
    for name, value in headers.items() if isinstance(headers, Mapping) else headers:
        if not isinstance(name, str) or HEADER_NAME.fullmatch(name) is None:
            raise HeaderInjectionError(f"header name {name!r} is not valid", field=str(name))
        own = _OWN_HEADERS.get(name.lower())
        if own is not None:
            raise MessageError(f"header {name} is set by compose(): give it as {own}=")
        if name.lower() in _MIME_HEADERS:
            raise MessageError(f"header {name} is written from text=, html= and attachments=")
        if not isinstance(value, str):
            raise MessageError(f"header {name}: the value must be a str, not {type(value)}")
        fields.append((name, value))
    for name, value in fields:
        check_header_value(name, value)
    return fields


def _joined(name: str, value: Addresses) -> str:
    if isinstance(value, str):
        return value
    values = list(value) if isinstance(value, Iterable) else [value]
    if name == "From" or not all(isinstance(v, str) for v in values):
        raise MessageError(f"{name}: give addresses as str values, not {value!r}")
    return ", ".join(values)


def _direct(
    fields: list[tuple[str, str]],
    text: str | None,
    html: str | None,
    attachments: list[Attachment],
    date: datetime | None,
    message_id: str | None,
) -> Envelope | None:
    """The envelope written directly, or None when a value needs the email package."""
    lines: list[bytes] = []
    sender: Address | None = None
    recipients: list[Address] = []
    for name, value in fields:
        key = name.lower()
        written = _header_line(name, key, value)
        if written is None:
            return None
        line, addresses = written
        if key == "from":
            if not addresses:
                return None  # the email package's path names the problem
            sender = addresses[0]
        elif key in ("to", "cc", "bcc"):
            recipients.extend(addresses)
        if key != "bcc":
            lines.append(line)
    assert sender is not None
    if not recipients:
        raise AddressError("no recipients: give to=, cc= or bcc=", field="To")
    if message_id is None:
        message_id = new_message_id([sender])
    if len(message_id) + 12 > MAX_LINE or _MSGID.fullmatch(message_id) is None:
        return None
    lines.append(date_line(date or local_now()))
    lines.append(f"Message-ID: {message_id}\r\n".encode("ascii"))
    parts = [_part(a) for a in attachments]
    if text is None:
        assert html is not None
        payload, size, header_end, eight_bit = message_payload(lines, "html", html, None, parts)
    else:
        payload, size, header_end, eight_bit = message_payload(lines, "plain", text, html, parts)
    envelope = envelope_from_stuffed(
        sender, recipients, payload, size, header_end, message_id, eight_bit
    )
    if envelope.eight_bit:
        # An 8-bit body: for a server without 8BITMIME, rebuilt as 7-bit from these bytes.
        envelope = dataclasses.replace(envelope, rendered=True)
    return envelope


def _header_line(name: str, key: str, value: str) -> tuple[bytes, tuple[Address, ...]] | None:
    """The line policy.SMTP writes for a header and the addresses in it, or None."""
    if len(name) + 2 + len(value) <= MAX_LINE and value.isascii() and "=?" not in value:
        # Written back unchanged by the email package only in this plainest form.
        if key in ADDRESS_HEADERS:
            plain = parse_plain_address_list(value)
            if plain is not None:
                return f"{name}: {value}\r\n".encode("ascii"), plain
        elif key not in STRUCTURED_KEYS and PLAIN_TEXT.fullmatch(value) is not None:
            return f"{name}: {value}\r\n".encode("ascii"), ()
    if key in STRUCTURED_KEYS or "=?" in value:
        return None
    folded = fold_encoded(name, key, value)
    if folded is not None:
        if key not in ADDRESS_HEADERS:
            return folded.encode("ascii"), ()
        mailbox = MAILBOX.fullmatch(value)
        assert mailbox is not None
        addresses = parse_plain_address_list(mailbox.group(3))
        if addresses is not None and len(addresses) == 1:
            return folded.encode("ascii"), addresses
        return None
    if key in ADDRESS_HEADERS:
        return None
    # Unstructured text folded (or encoded) by the email package's own header object.
    try:
        line = POLICY.header_factory(name, value).fold(policy=POLICY)
    except (ValueError, TypeError, IndexError, AttributeError):
        return None
    return (line.encode("ascii"), ()) if line.isascii() else None


_parts: dict[Attachment, tuple[bytes, bytes]] = {}
_MAX_PARTS_BYTES = 16 * 1024 * 1024


def _part(attachment: Attachment) -> tuple[bytes, bytes]:
    """``attachment``'s MIME part and the same dot-stuffed; the same attachment sent again (a
    bulk send attaching one file to every message) is encoded once."""
    part = _parts.get(attachment)
    if part is None:
        encoded = encode_part(attachment)
        part = (encoded, dot_stuffed(encoded))
        if sum(len(p[0]) for p in _parts.values()) + len(encoded) > _MAX_PARTS_BYTES:
            _parts.clear()
        if len(encoded) <= _MAX_PARTS_BYTES:
            _parts[attachment] = part
    return part


def _message(
    fields: list[tuple[str, str]],
    text: str | None,
    html: str | None,
    attachments: list[Attachment],
    date: datetime | None,
    message_id: str | None,
) -> EmailMessage:
    """The message built through the email package, for values the direct path leaves."""
    msg = EmailMessage(policy=POLICY)
    for name, value in fields:
        if name.lower() in ADDRESS_HEADERS:
            parse_address_list(value, field=name)  # names the invalid address
        try:
            msg[name] = value
        # The email package's header parser raises AttributeError on some phrases (". <a@b>").
        except (ValueError, TypeError, IndexError, AttributeError) as exc:
            raise MessageError(f"header {name}: invalid value {value!r}: {exc}") from None
    msg["Date"] = date or local_now()
    if message_id is None:
        message_id = new_message_id(parse_address_list(fields[0][1], field="From"))
    try:
        msg["Message-ID"] = message_id
    except (ValueError, TypeError, IndexError, AttributeError) as exc:
        raise MessageError(f"invalid Message-ID {message_id!r}: {exc}") from None
    if text is not None:
        msg.set_content(text)
        if html is not None:
            msg.add_alternative(html, subtype="html")
    else:
        msg.set_content(html, subtype="html")
    for a in attachments:
        msg.add_attachment(a.data, maintype=a.maintype, subtype=a.subtype, filename=a.filename)
    return msg
