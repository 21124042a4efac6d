"""SMTP reply framing for the send loop: bytes from the server in, ``(code, text)`` replies out.

A reply (RFC 5321 §4.2) is one or more lines ``NNN-text`` ending with a line ``NNN text``
(or a bare ``NNN``); lines end with CRLF, a bare LF is tolerated. :class:`ReplyReader` takes
whatever chunks the transport delivers, keeps an incomplete last line and the continuation
lines of an unfinished reply, and returns each complete reply once, its lines' texts joined
with LF. It knows nothing of commands: which command a reply answers is the protocol's business.

A line that is not a reply, or an incomplete line longer than :data:`MAX_LINE`, ends the
stream: the reader returns the replies before it and then one reply with code
:data:`MALFORMED` (the offending line as text) or :data:`OVERLONG`. What arrives after that is
never looked at; the protocol is expected to drop the connection.
"""

from __future__ import annotations

from typing import Final

__all__ = ["MALFORMED", "MAX_LINE", "OVERLONG", "ReplyReader", "reply_code"]

MAX_LINE: Final = 64 * 1024
"""The longest incomplete line kept while waiting for its end."""

MALFORMED: Final = 0
"""The code given to a line that is not a reply line (its text: the line, cut to 80 bytes)."""

OVERLONG: Final = -1
"""The code given to an unfinished line longer than :data:`MAX_LINE`."""

# Final reply lines that make up nearly all traffic, mapped to their code without int().
_COMMON_CODES: Final = {b"%d " % code: code for code in (221, 250, 251, 354)}

Reply = tuple[int, bytes]


def reply_code(line: bytes) -> int:
    """The code of a final reply line (``NNN`` or ``NNN text``), or :data:`MALFORMED`."""
    digits = line[:3]
    code = int(digits) if digits.isdigit() else 0
    if not 200 <= code <= 599 or (len(line) > 3 and line[3] != 32):
        return MALFORMED
    return code


class ReplyReader:
    """Cuts a server's byte stream into complete replies (see the module docstring)."""

    __slots__ = ("_buf", "_cont", "_ended")

    def __init__(self) -> None:
        self._buf = b""
        self._cont: list[bytes] = []
        self._ended = False

    def feed(self, data: bytes) -> list[Reply]:
        """The replies completed by ``data``, in order (an empty list if none is complete)."""
        if self._ended:
            return []
        if self._buf:
            data = self._buf + data
        # One CR before each LF goes, as a line ending; bare LFs end lines too. Dropping the
        # CRs here, in one pass over the chunk, is cheaper than a slice per line.
        lines = data.replace(b"\r\n", b"\n").split(b"\n")
        self._buf = lines.pop()  # an incomplete line (perhaps ending in CR), or b""
        codes = _COMMON_CODES
        replies: list[Reply] = []
        for line in lines:
            code = codes.get(line[:4])
            if code is None:
                if line[3:4] == b"-":
                    self._cont.append(line[4:])
                    continue
                code = reply_code(line)
                if code == MALFORMED:
                    return self._end(replies, (MALFORMED, line[:80]))
            if self._cont:
                self._cont.append(line[4:])
                replies.append((code, b"\n".join(self._cont)))
                self._cont = []
            else:
                replies.append((code, line[4:]))
        if len(self._buf) > MAX_LINE:
            return self._end(replies, (OVERLONG, b""))
        return replies

    def _end(self, replies: list[Reply], last: Reply) -> list[Reply]:
        self._ended = True
        self._buf = b""
        self._cont = []
        replies.append(last)
        return replies
