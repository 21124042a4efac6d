"""Pure pieces of SMTP submission: command arguments, and a received message made ready to queue.

Nothing here does I/O. :func:`parse_path` reads the ``<path> PARAM=...`` argument of ``MAIL``
and ``RCPT``; :class:`Incoming` collects the DATA lines of one message and turns them into the
:class:`~twistmail.message.Envelope` the queue stores: the bytes as received (still dot-stuffed,
as the wire needs them again), with a ``Received:`` trace header prepended and ``Message-ID`` /
``Date`` added only when missing.
"""

from __future__ import annotations

import email.utils
import re
import secrets
from dataclasses import dataclass, field

from ..address import Address, parse_address, parse_sender
from ..errors import AddressError
from ..message import Envelope

__all__ = ["Incoming", "PathError", "parse_path", "received_header"]

_PATH = re.compile(rb"\s*(FROM|TO):\s*<([^<>]*)>\s*(.*)\Z", re.IGNORECASE | re.DOTALL)
_SOURCE_ROUTE = re.compile(r"\A@[^:]*:")


class PathError(ValueError):
    """A ``MAIL``/``RCPT`` argument that cannot be used; ``code`` and ``text`` are the reply."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


def parse_path(
    argument: bytes, keyword: bytes, *, null_ok: bool
) -> tuple[Address, dict[str, str | None]]:
    """The address and ESMTP parameters (upper-case name -> value) of a MAIL/RCPT argument.

    :raises PathError: 501 for bad syntax (naming what is wrong), 553 for an address the
        library's parser refuses (with its reason).
    """
    match = _PATH.match(argument)
    if match is None or match.group(1).upper() != keyword:
        raise PathError(501, f"5.5.4 Syntax: {keyword.decode()}:<address> [parameters]")
    try:
        path = match.group(2).decode("utf-8")
        params_text = match.group(3).decode("ascii")
    except UnicodeDecodeError:
        raise PathError(501, "5.5.4 the address or parameters are not valid UTF-8") from None
    path = _SOURCE_ROUTE.sub("", path)  # RFC 5321 §4.1.1.3: a source route is ignored
    field = "sender" if null_ok else "recipient"
    try:
        address = parse_sender(path, field=field) if null_ok else parse_address(path, field=field)
        address.smtp_path(utf8=True)  # the checks a path must pass to be sent on
    except AddressError as e:
        code = "5.1.7" if null_ok else "5.1.3"
        raise PathError(553, f"{code} {e}") from None
    if not null_ok and address.is_null:
        raise PathError(501, "5.1.3 a recipient cannot be the null path <>")
    params: dict[str, str | None] = {}
    for item in params_text.split():
        name, eq, value = item.partition("=")
        params[name.upper()] = value if eq else None
    return address, params


def received_header(
    *,
    helo: str,
    client_ip: str,
    hostname: str,
    protocol: str,
    recipients: tuple[Address, ...],
    now: float | None = None,
) -> bytes:
    """A ``Received:`` trace header (RFC 5321 §4.4), CRLF-terminated and folded.

    ``for <rcpt>`` only names a single recipient (a list would show Bcc recipients to every
    other one).
    """
    helo_text = helo.encode("ascii", "replace").decode("ascii") or "unknown"
    helo_text = re.sub(r"[^\x21-\x7e]", "?", helo_text)[:255]
    for_part = f"\r\n\tfor <{recipients[0]}>" if len(recipients) == 1 else ""
    date = email.utils.formatdate(now, localtime=True)
    return (
        f"Received: from {helo_text} ([{client_ip}])\r\n"
        f"\tby {hostname} (twistmail) with {protocol}{for_part};\r\n\t{date}\r\n"
    ).encode()


@dataclass(slots=True)
class Incoming:
    """One message being received: the envelope so far and its DATA lines.

    Feed each DATA line (without its CRLF, still dot-stuffed) to :meth:`line`; the checks never
    stop reading, so the client's final dot is still found and answered. :meth:`problem` is
    then the reply to give instead of 250, if any.
    """

    sender: Address
    recipients: list[Address]
    max_size: int
    smtputf8: bool = False
    size: int = 0
    too_big: bool = False
    bare_line_end: bool = False
    lines: list[bytes] = field(default_factory=list)
    """The DATA lines kept so far (none once the message is too big)."""

    def line(self, line: bytes) -> None:
        """One DATA line (not the final dot), as received."""
        self.size += len(line) + 2 - (line[:1] == b".")
        if self.too_big or self.size > self.max_size:
            self.too_big = True
            self.lines.clear()
            return
        if b"\r" in line or b"\n" in line:
            # A bare CR or LF: a receiver that takes it for a line end could see a different
            # message end than the next server will (SMTP smuggling, CVE-2023-51764).
            self.bare_line_end = True
        self.lines.append(line)

    def problem(self) -> tuple[int, str] | None:
        """The refusal this message earned while it was read, or None."""
        if self.too_big:
            return 552, f"5.3.4 Message too big: the limit is {self.max_size} octets"
        if self.bare_line_end:
            return 550, "5.6.11 Bare CR or LF in the message: use CRLF line ends"
        return None

    def envelope(self, received: bytes, hostname: str, now: float | None = None) -> Envelope:
        """The message to queue: ``received`` and any missing Message-ID/Date prepended."""
        lines = self.lines
        has_date = False
        message_id: str | None = None
        added = [received]
        headers_end = 0
        for headers_end, header in enumerate(lines):
            if not header:
                break
            lower = header[:11].lower()
            if lower.startswith(b"date:"):
                has_date = True
            elif lower == b"message-id:":
                message_id = header[11:].strip().decode("utf-8", "replace")
            elif header[:1] not in b" \t" and b":" not in header:
                headers_end = -1  # not a header section: the whole DATA is a body
                break
        else:
            headers_end = len(lines)
        if message_id is None:
            message_id = f"<{secrets.token_hex(12)}@{hostname}>"
            added.append(f"Message-ID: {message_id}\r\n".encode())
        if not has_date:
            added.append(f"Date: {email.utils.formatdate(now, localtime=True)}\r\n".encode())
        if headers_end < 0:
            added.append(b"\r\n")  # the received lines begin the body
        prefix = b"".join(added)
        body = b"\r\n".join(lines)
        payload = prefix + body + (b"\r\n.\r\n" if lines else b".\r\n")
        size = len(prefix) + self.size
        return Envelope(
            sender=self.sender,
            recipients=tuple(self.recipients),
            payload=payload,
            size=size,
            eight_bit=not payload.isascii(),
            smtputf8=self.smtputf8,
            message_id=message_id,
        )
