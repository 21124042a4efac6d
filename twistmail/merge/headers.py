"""The header lines of a message template, compiled: shared by the two renderers.

:mod:`.template` builds a :class:`CompiledHeader` for each header line of a template and renders
rows through the email package; :mod:`.wire` writes the common simple message straight to bytes
from the same compiled headers. Both refuse the same values, with the same :class:`RowError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from email.headerregistry import BaseHeader
from email.message import EmailMessage

import jinja2

from twistmail.address import Address, find_header_break, parse_address_list
from twistmail.errors import AddressError, RowError
from twistmail.mime import ADDRESS_HEADERS, POLICY

__all__ = [
    "ADDRESS_HEADERS",
    "POLICY",
    "RECIPIENT_HEADERS",
    "CompiledHeader",
    "check_folding",
    "check_value",
    "is_clean",
    "parse_addresses",
]

RECIPIENT_HEADERS = ("to", "cc", "bcc")
"""The headers naming recipients, in the order the report address is chosen from."""


@dataclass(frozen=True, slots=True)
class CompiledHeader:
    """One header line of a template: a literal value, prepared once, or a Jinja2 template."""

    name: str
    key: str  # the name in lower case
    line: int
    literal: str | None
    template: jinja2.Template | None
    addresses: tuple[Address, ...] | None  # pre-parsed, for a literal address header
    parsed: BaseHeader | None  # the header object of a literal value, built once
    wire: bytes | None  # how a literal value goes out (folded, CRLF), when that is ASCII
    source: str = ""  # the template text of a templated value


def is_clean(name: str, value: str) -> bool:
    """Whether ``value`` keeps header ``name`` on its line (no line break, no NUL)."""
    return find_header_break(value) is None


def check_value(name: str, value: str) -> None:
    """Raise RowError when ``value`` could end header ``name``'s line early."""
    if not is_clean(name, value):
        raise RowError(name, "the value contains CR, LF or another line break (or NUL), refused")


def parse_addresses(name: str, value: str) -> list[Address]:
    """The addresses in header ``name``'s ``value``; raise RowError when one is invalid."""
    try:
        return parse_address_list(value, field=name)
    except AddressError as exc:
        raise RowError(exc.field or name, str(exc)) from None


def check_folding(msg: EmailMessage, name: str) -> None:
    """Refuse a long address header the email package would fold wrongly.

    On Python 3.11 folding a quoted display name longer than a line drops its quotes
    (``"Doe, Jane ..."`` becomes two mailboxes): the folded header must read back as the same
    addresses.
    """
    header = msg[name]
    unfolded = header.fold(policy=POLICY).split(":", 1)[1].replace("\r\n", "").strip()
    before = [a.addr_spec for a in getattr(header, "addresses", ())]
    try:
        again = POLICY.header_factory(name, unfolded)
        after = [a.addr_spec for a in getattr(again, "addresses", ())]
    # What the parser raises on a folded header it cannot read back (AttributeError included).
    except (ValueError, TypeError, IndexError, AttributeError):
        after = []
    if before != after:
        raise RowError(
            name, "a display name this long cannot be folded safely; shorten it (quoted text)"
        )
