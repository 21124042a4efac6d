"""Delivery status notifications (RFC 3464 bounces) for messages the relay could not deliver.

:func:`should_bounce` says whether a failed message may get one (never for the null sender or
our own bounce addresses: no loops, no bounce of a bounce); :func:`make_dsn` writes it: a
``multipart/report; report-type=delivery-status`` with a short text for people, a
``message/delivery-status`` part with one block per failed recipient, and the original
message's headers (never its body) as ``text/rfc822-headers``.

Everything that comes from outside — a recipient, a server's reply text, the original
headers — is written so that it cannot end a header line or a MIME part: line breaks and other
control characters in a field become spaces, and the boundary is random and checked against
the content. The result is ASCII unless the envelope sender's address is not (then it needs
SMTPUTF8, as the original did).
"""

from __future__ import annotations

import base64
import re
import secrets
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from email.utils import format_datetime, make_msgid
from typing import Final, NamedTuple

from ..address import mailbox_key, parse_sender
from ..errors import AddressError

__all__ = ["MAX_HEADERS_BYTES", "FailedRecipient", "make_dsn", "should_bounce"]

MAX_HEADERS_BYTES: Final = 64 * 1024
"""The original headers kept in a notification are cut (at a line) to this many bytes."""

_MAX_FIELD_CHARS: Final = 900  # a header line stays under RFC 5322's 998 characters
_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_ACTIONS: Final = frozenset({"failed", "delayed", "delivered", "relayed", "expanded"})
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]+")
_LINE_END = re.compile(rb"\r\n|\r|\n")


class FailedRecipient(NamedTuple):
    """One recipient a notification reports on."""

    recipient: str
    """The address as given at RCPT TO."""
    status: str
    """The enhanced status code, e.g. ``"5.1.1"``."""
    diagnostic: str
    """The server's reply (code and text, e.g. ``"550 5.1.1 no such user"``) or our reason."""
    action: str = "failed"
    """RFC 3464 Action: ``failed`` (the usual), ``delayed``, ``delivered``, ``relayed``..."""


def should_bounce(sender: str | None, own_bounce_addresses: Iterable[str]) -> bool:
    """Whether a message from envelope ``sender`` may get a delivery status notification.

    False for the null sender (``""``, ``"<>"``, None), for a sender that is not a valid
    address, and for any of ``own_bounce_addresses`` (compared as mailboxes, ignoring case):
    a notification is never sent about a notification.
    """
    if sender is None:
        return False
    try:
        address = parse_sender(sender.strip().removeprefix("<").removesuffix(">"))
    except AddressError:
        return False
    if address.is_null:
        return False
    key = mailbox_key(address)
    for own in own_bounce_addresses:
        try:
            if mailbox_key(own) == key:
                return False
        except AddressError:
            continue
    return True


def make_dsn(
    original: bytes,
    envelope_sender: str,
    failed: Sequence[FailedRecipient | tuple[str, str, str, str]],
    reporting_mta: str,
    arrival_date: datetime | float,
    from_address: str,
) -> bytes:
    """The notification to ``envelope_sender`` that ``failed`` recipients of ``original`` failed.

    ``original`` is the message as received (CRLF or LF line ends); only its header block is
    included. ``reporting_mta`` is our host name (``Reporting-MTA: dns; ...`` and the
    Message-ID's domain), ``arrival_date`` when the original was accepted (a ``datetime`` or a
    POSIX timestamp), ``from_address`` the notification's From (e.g.
    ``"Mail Delivery System <MAILER-DAEMON@relay.example>"``). Returns the message with CRLF
    line ends, ready to be enqueued with the null sender ``<>``.

    :raises ValueError: for no recipient, a bad status or action, a host name that is not
        one, or a sender or From that holds a line break.
    """
    if not failed:
        raise ValueError("a delivery status notification needs at least one recipient")
    recipients = [FailedRecipient(*entry) for entry in failed]
    for entry in recipients:
        if _STATUS.fullmatch(entry.status) is None:
            raise ValueError(f"status {entry.status!r} is not an enhanced status code like 5.1.1")
        if entry.action not in _ACTIONS:
            raise ValueError(f"action {entry.action!r} is not one of {sorted(_ACTIONS)}")
    if _HOSTNAME.fullmatch(reporting_mta) is None:
        raise ValueError(f"reporting_mta {reporting_mta!r} is not a host name")
    for name, value in (("envelope_sender", envelope_sender), ("from_address", from_address)):
        if _CONTROL.search(value):
            raise ValueError(f"{name} contains a line break or control character")
    if isinstance(arrival_date, datetime):
        arrived = arrival_date
    else:
        arrived = datetime.fromtimestamp(arrival_date, UTC)
    now = datetime.now(UTC)

    human = _human_text(recipients, reporting_mta)
    status = _status_fields(recipients, reporting_mta, arrived)
    headers, headers_encoding = _original_headers(original)
    parts = [human, status, headers]
    boundary = _boundary(parts)

    lines = [
        f"From: {from_address}",
        f"To: {envelope_sender.strip().removeprefix('<').removesuffix('>')}",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {format_datetime(now)}",
        f"Message-ID: {make_msgid(domain=reporting_mta.strip('[]'))}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=us-ascii",
        "Content-Description: Notification",
        "",
        human,
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "Content-Description: Delivery report",
        "",
        status,
        f"--{boundary}",
        "Content-Type: text/rfc822-headers" + ("; charset=utf-8" if headers_encoding else ""),
        "Content-Description: Undelivered message headers",
        *([f"Content-Transfer-Encoding: {headers_encoding}"] if headers_encoding else []),
        "",
        headers,
        f"--{boundary}--",
        "",
    ]
    return "\r\n".join(lines).encode("utf-8")


def _field(value: str) -> str:
    """``value`` as one safe ASCII header-field body: no line break or control character, other
    non-ASCII as ``\\x{HEX}`` (RFC 6533's notation), at most ~900 characters."""
    text = _CONTROL.sub(" ", value).strip()
    text = "".join(c if c.isascii() else f"\\x{{{ord(c):X}}}" for c in text)
    if len(text) > _MAX_FIELD_CHARS:
        text = text[: _MAX_FIELD_CHARS - 3] + "..."
    return text


def _address_type(recipient: str) -> str:
    """``rfc822; addr`` for an ASCII address, ``utf-8; addr`` (escaped) otherwise (RFC 6533)."""
    address = recipient.strip().removeprefix("<").removesuffix(">")
    kind = "rfc822" if address.isascii() else "utf-8"
    return f"{kind}; {_field(address)}"


def _human_text(recipients: list[FailedRecipient], reporting_mta: str) -> str:
    lines = [
        f"This is the mail system at host {reporting_mta}.",
        "",
        "Your message could not be delivered to one or more recipients. The reason for each is",
        "below; the headers of your message are attached.",
        "",
    ]
    for entry in recipients:
        lines.append(f"<{_field(entry.recipient)}>: {entry.action}")
        lines.append(f"    {_field(entry.diagnostic)}")
    return "\r\n".join([*lines, ""])


def _status_fields(recipients: list[FailedRecipient], reporting_mta: str, arrived: datetime) -> str:
    blocks = [f"Reporting-MTA: dns; {reporting_mta}\r\nArrival-Date: {format_datetime(arrived)}"]
    for entry in recipients:
        diagnostic = _field(entry.diagnostic)
        blocks.append(
            f"Final-Recipient: {_address_type(entry.recipient)}\r\n"
            f"Action: {entry.action}\r\n"
            f"Status: {entry.status}\r\n"
            f"Diagnostic-Code: smtp; {diagnostic}"
        )
    return "\r\n\r\n".join(blocks) + "\r\n"


def _original_headers(original: bytes) -> tuple[str, str | None]:
    """The header block of ``original`` with CRLF line ends, and the transfer encoding it
    needs (None: 7-bit as is; ``"base64"``: it has 8-bit bytes)."""
    lines: list[bytes] = []
    size = 0
    for line in _LINE_END.split(original):
        if not line:
            break  # the blank line ending the headers
        size += len(line) + 2
        if size > MAX_HEADERS_BYTES:
            break
        lines.append(line.replace(b"\0", b" "))
    block = b"".join(line + b"\r\n" for line in lines)
    if block.isascii():
        return block.decode("ascii"), None
    encoded = base64.encodebytes(block).decode("ascii").replace("\n", "\r\n")
    return encoded, "base64"


def _boundary(parts: Iterable[str]) -> str:
    """A random boundary that none of ``parts`` contains."""
    content = "".join(parts)
    while True:
        boundary = f"=_twistmail_dsn_{secrets.token_hex(16)}"
        if boundary not in content:
            return boundary
