"""Pure pieces of SMTP submission: command arguments, and a received message made ready to queue.

Nothing here does I/O. :func:`parse_path` reads the ``<path> PARAM=...`` argument of ``MAIL``
and ``RCPT``; :class:`Incoming` collects the DATA of one message (finding its end) and turns it
into the :class:`~twistmail.message.Envelope` the queue stores: the bytes as received (still
dot-stuffed, as the wire needs them again), with a ``Received:`` trace header prepended and
``Message-ID`` / ``Date`` added only when missing.
"""

from __future__ import annotations

import email.utils
import re
import secrets
import time
from dataclasses import dataclass, field

from ..address import Address, parse_address, parse_sender
from ..errors import AddressError
from ..message import Envelope

__all__ = ["Incoming", "LineTooLong", "PathError", "parse_path", "received_header"]

_PATH = re.compile(rb"\s*(FROM|TO):\s*<([^<>]*)>\s*(.*)\Z", re.IGNORECASE | re.DOTALL)
_SOURCE_ROUTE = re.compile(r"\A@[^:]*:")


class PathError(ValueError):
    """A ``MAIL``/``RCPT`` argument that cannot be used; ``code`` and ``text`` are the reply."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


# Arguments parsed lately and what they gave (a relay sees the same senders and recipients
# again and again); emptied when full. Refused arguments are not kept.
_PARSED: dict[tuple[bytes, bytes, bool], tuple[Address, dict[str, str | None]]] = {}
_PARSED_MAX = 1024


def parse_path(
    argument: bytes, keyword: bytes, *, null_ok: bool
) -> tuple[Address, dict[str, str | None]]:
    """The address and ESMTP parameters (upper-case name -> value) of a MAIL/RCPT argument.

    :raises PathError: 501 for bad syntax (naming what is wrong), 553 for an address the
        library's parser refuses (with its reason).
    """
    key = (argument, keyword, null_ok)
    parsed = _PARSED.get(key)
    if parsed is None:
        parsed = _parse_path(argument, keyword, null_ok=null_ok)
        if len(_PARSED) >= _PARSED_MAX:
            _PARSED.clear()
        _PARSED[key] = parsed
    address, params = parsed
    return address, dict(params)  # the caller's own: it takes parameters out


def _parse_path(
    argument: bytes, keyword: bytes, *, null_ok: bool
) -> tuple[Address, dict[str, str | None]]:
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


_last_date: tuple[int, str] = (-1, "")


def _date(now: float | None) -> str:
    """An RFC 5322 date in local time, of ``now`` (None: the current time); the text is made
    once a second."""
    global _last_date
    second = int(time.time() if now is None else now)
    if _last_date[0] != second:
        _last_date = (second, email.utils.formatdate(second, localtime=True))
    return _last_date[1]


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
    date = _date(now)
    return (
        f"Received: from {helo_text} ([{client_ip}])\r\n"
        f"\tby {hostname} (twistmail) with {protocol}{for_part};\r\n\t{date}\r\n"
    ).encode()


class LineTooLong(ValueError):
    """A DATA line longer than the limit: the rest cannot be trusted to be framed as meant."""


_END = b"\r\n.\r\n"


@dataclass(slots=True)
class Incoming:
    """One message being received: the envelope so far and its DATA bytes.

    Feed what the client sends after ``354`` to :meth:`feed`, as it comes (still dot-stuffed);
    it reports where the final ``CRLF . CRLF`` ended. (:meth:`line` feeds one line.) The
    checks never stop reading, so the final dot is still found and answered. :meth:`problem`
    is then the reply to give instead of 250, if any.
    """

    sender: Address
    recipients: list[Address]
    max_size: int
    smtputf8: bool = False
    max_line: int = 65536
    size: int = 0
    too_big: bool = False
    bare_line_end: bool = False
    # The DATA so far behind a CRLF (so the end marker of an empty message is found too).
    _buf: bytearray = field(default_factory=lambda: bytearray(b"\r\n"))
    _line_start: int = 2  # where the line being received begins in _buf
    _dots: int = 0  # dot-stuffed lines counted so far (those starting before _counted)
    _counted: int = 0
    _end: int = -1  # where the DATA ends in _buf, once its end marker was found

    def feed(self, data: bytes) -> int | None:
        """More DATA bytes; how many of them were the message's (up to and including its end
        marker) once that end is in them, else None.

        :raises LineTooLong: a line is over ``max_line`` octets.
        """
        buf = self._buf
        before = len(buf)
        buf += data
        end = buf.find(_END, max(before - 4, 0))
        # Lines are checked up to the end marker, or to a CR that may begin a CRLF.
        stop = end if end >= 0 else len(buf) - buf.endswith(b"\r")
        if stop - self._line_start > self.max_line:
            self._check_lines(stop)
        crlf = buf.rfind(b"\r\n", self._line_start, stop)
        if crlf >= 0:
            self._line_start = crlf + 2
        if end >= 0:
            self._finish(end)
            return end + 5 - before
        if len(buf) - 4 > self.max_size and not self.too_big:
            self._dots += buf.count(b"\r\n.", self._counted)
            self._counted = len(buf) - 2
            # The message will be at least this big, whatever follows.
            if len(buf) - 4 - self._dots > self.max_size:
                self._drop()
        return None

    def line(self, line: bytes) -> None:
        """One DATA line, without its CRLF (not the final dot): the message is built line by
        line instead of by :meth:`feed`."""
        self.size += len(line) + 2 - (line[:1] == b".")
        if self.too_big or self.size > self.max_size:
            self.too_big = True
            del self._buf[2:]
            return
        self._buf += line + b"\r\n"

    def _check_lines(self, stop: int) -> None:
        buf, start = self._buf, self._line_start
        while True:
            crlf = buf.find(b"\r\n", start, stop)
            if (crlf if crlf >= 0 else stop) - start > self.max_line:
                raise LineTooLong(f"a line is over {self.max_line} octets")
            if crlf < 0:
                return
            start = crlf + 2

    def _drop(self) -> None:
        """Over the size limit: keep only what finding the end needs from now on."""
        self.too_big = True
        buf = self._buf
        keep = max(min(self._line_start, len(buf) - 4), 0)
        del buf[:keep]
        self._line_start -= keep

    def _finish(self, end: int) -> None:
        """The DATA ends at ``end`` in the buffer: its size and line ends are checked."""
        buf = self._buf
        if self.too_big:
            del buf[:]
            return
        # Each line counts with its CRLF, a dot-stuffing dot does not.
        self.size = end - buf.count(b"\r\n.", 0, end) if end else 0
        if self.size > self.max_size:
            self.too_big = True
            del buf[:]
            return
        self._end = end
        crlf = buf.count(b"\r\n", 2, end)
        if buf.count(b"\r", 2, end) != crlf or buf.count(b"\n", 2, end) != crlf:
            # A bare CR or LF: a receiver that takes it for a line end could see a different
            # message end than the next server will (SMTP smuggling, CVE-2023-51764).
            self.bare_line_end = True

    def _body(self) -> bytes | None:
        """The DATA as received without its last CRLF; None if it had no line (or is dropped)."""
        if self._end < 0 and not self.too_big:  # fed by line(): every line ends in CRLF
            self._finish(max(len(self._buf) - 2, 0))
        if self.too_big or self._end <= 0:
            return None
        return bytes(self._buf[2 : self._end])

    @property
    def lines(self) -> list[bytes]:
        """The DATA lines kept (none once the message is too big)."""
        body = self._body()
        return [] if body is None else body.split(b"\r\n")

    def problem(self) -> tuple[int, str] | None:
        """The refusal this message earned while it was read, or None."""
        self._body()
        if self.too_big:
            return 552, f"5.3.4 Message too big: the limit is {self.max_size} octets"
        if self.bare_line_end:
            return 550, "5.6.11 Bare CR or LF in the message: use CRLF line ends"
        return None

    def envelope(self, received: bytes, hostname: str, now: float | None = None) -> Envelope:
        """The message to queue: ``received`` and any missing Message-ID/Date prepended."""
        body = self._body()
        if body is None:
            lines = []
        else:  # only the header section is read line by line
            blank = body.find(b"\r\n\r\n")
            lines = (body if blank < 0 else body[:blank]).split(b"\r\n")
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
            added.append(f"Date: {_date(now)}\r\n".encode())
        if headers_end < 0:
            added.append(b"\r\n")  # the received lines begin the body
        prefix = b"".join(added)
        payload = b".\r\n" if body is None else body + b"\r\n.\r\n"
        payload = prefix + payload
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
