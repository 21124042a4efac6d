"""Pure ESMTP helpers: reply codes, capability parsing, enhanced status codes.

Nothing here does I/O; the protocol module feeds it bytes and acts on the answers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum

__all__ = ["Capabilities", "ReplyCode", "split_enhanced"]


class ReplyCode(IntEnum):
    """The SMTP reply codes the client acts on by name."""

    SERVICE_READY = 220
    CLOSING = 221
    AUTH_SUCCESSFUL = 235
    OK = 250
    AUTH_CONTINUE = 334
    START_MAIL_INPUT = 354
    SERVICE_NOT_AVAILABLE = 421
    MAILBOX_UNAVAILABLE_TEMP = 450
    LOCAL_ERROR = 451
    INSUFFICIENT_STORAGE = 452
    SYNTAX_ERROR = 500
    BAD_SEQUENCE = 503
    MAILBOX_UNAVAILABLE = 550
    EXCEEDED_STORAGE = 552
    TRANSACTION_FAILED = 554


_CLASSES = frozenset("245")
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?:\s+|$)")


def split_enhanced(text: str, code: int | None, advertised: bool = False) -> tuple[str | None, str]:
    """Split an RFC 3463 enhanced status code off the front of the text of a ``code`` reply.

    ``"5.1.1 no such user"`` (of a 550) gives ``("5.1.1", "no such user")``; text without one
    gives ``(None, text)``. A well-formed code (class 2, 4 or 5, then one to three digits
    twice) is taken when the server ``advertised`` ENHANCEDSTATUSCODES, and otherwise only
    when its class is the reply's (a 550 starting "4.2.0" was not written as a status code).
    """
    first = text[:1]
    if first not in _CLASSES:
        return None, text
    if not advertised and (code is None or first != str(code)[:1]):
        return None, text
    match = _ENHANCED.match(text)
    if match is None:
        return None, text
    status = text[: match.end(3)]  # the match starts the text: "class.subject.detail"
    rest = text[match.end() :]
    if "\n" in rest:  # multi-line replies repeat the code on every line
        rest = "\n".join(
            line[m.end() :] if (m := _ENHANCED.match(line)) else line for line in rest.split("\n")
        )
    return status, rest


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a server offered in its EHLO reply."""

    esmtp: bool = False
    pipelining: bool = False
    eight_bit_mime: bool = False
    smtputf8: bool = False
    starttls: bool = False
    enhanced_status_codes: bool = False
    size: int | None = None
    auth: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def from_items(cls, items: Mapping[bytes, bytes | None]) -> Capabilities:
        """Build from EHLO keywords mapped to their parameters (as Twisted's client splits them)."""
        upper = {key.upper(): value for key, value in items.items()}
        size: int | None = None
        raw_size = upper.get(b"SIZE")
        if raw_size:
            try:
                size = int(raw_size.split()[0]) or None
            except ValueError:
                size = None
        auth_words: set[str] = set()
        for key in (b"AUTH", b"AUTH=LOGIN"):
            value = upper.get(key)
            if value:
                auth_words.update(w.decode("ascii", "replace").upper() for w in value.split())
            elif key == b"AUTH=LOGIN" and key in upper:
                auth_words.add("LOGIN")
        return cls(
            esmtp=True,
            pipelining=b"PIPELINING" in upper,
            eight_bit_mime=b"8BITMIME" in upper,
            smtputf8=b"SMTPUTF8" in upper,
            starttls=b"STARTTLS" in upper,
            enhanced_status_codes=b"ENHANCEDSTATUSCODES" in upper,
            size=size,
            auth=frozenset(auth_words),
        )

    @classmethod
    def from_ehlo_reply(cls, reply: bytes) -> Capabilities:
        """Parse the text of a multi-line EHLO reply (lines after the greeting line)."""
        items: dict[bytes, bytes | None] = {}
        for line in reply.splitlines()[1:]:
            parts = line.split(None, 1)
            if parts:
                items[parts[0]] = parts[1] if len(parts) > 1 else None
        return cls.from_items(items)
