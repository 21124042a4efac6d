"""Who a CSV row is for: the identity a campaign's journal keeps each row under.

A row is identified by its recipient, not its position, so a campaign resumes from an export
that was fixed, extended or sorted differently. The recipient comes from the row's *address
columns*: the columns the template's To header reads (then Cc, then Bcc), in order of use; the
first of their cells holding one valid address gives the key, in the one spelling
:func:`twistmail.address.mailbox_key` gives it (case and display name ignored, the domain as
its A-label). The duplicate check compares the same keys. A row with no such cell (an empty or
invalid address, a template that builds the address from parts) is identified by its number,
``#N``, so it is still reported, but it resumes only from the same row order.

A row also has a *fingerprint*: a 64-bit hash of the cells the template reads (its address as
its key), stored with its outcome so a row sent once and changed since is told apart from the
same row again.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from twistmail.address import mailbox_key
from twistmail.errors import MessageError

from .csvsource import Row
from .template import MessageTemplate

__all__ = ["RowIdentity", "campaign_message_id", "message_token", "row_id"]

# A key never starts with "#" otherwise: a mailbox key holds an "@".
ROW_NUMBER_PREFIX = "#"
_MASK = (1 << 64) - 1


def _hash64(data: bytes) -> int:
    digest = hashlib.blake2b(data, digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)  # as SQLite keeps an INTEGER


def row_id(key: str) -> int:
    """The journal's id of the row keyed ``key``: a 64-bit hash of it (SQLite's integer key is
    far cheaper than a text one; two keys share an id with a chance of about n² / 2⁶⁵)."""
    return _hash64(key.encode("utf-8", "surrogatepass"))


def message_token(row: int) -> str:
    """The row id ``row`` as its message's Message-ID shows it (no address in the header)."""
    return f"{row & _MASK:016x}"


def campaign_message_id(campaign_id: str, row: int, domain: str) -> str:
    """The Message-ID of campaign ``campaign_id``'s message for the row with id ``row``:
    stable across runs, retries, row orders and the machines that render it."""
    return f"<{campaign_id}.{message_token(row)}@{domain}>"


@dataclass(frozen=True, slots=True)
class RowIdentity:
    """How a campaign's rows are keyed: its address columns and the columns fingerprinted."""

    address_columns: tuple[str, ...]
    fingerprinted: tuple[str, ...]

    @classmethod
    def of(cls, template: MessageTemplate, columns: tuple[str, ...]) -> RowIdentity:
        """The identity of rows with ``columns`` sent with ``template``."""
        read = template.columns_read(columns)
        return cls(
            template.columns_read(columns, recipients=True) or (),
            columns if read is None else read,
        )

    def key(self, row: Row) -> tuple[str, str, str | None]:
        """``(key, address cell, its column)`` of ``row``: its mailbox key, else ``#N``."""
        values = row.values
        for column in self.address_columns:
            cell = values.get(column)
            if cell and "@" in cell:
                try:
                    return mailbox_key(cell), cell[:200], column
                except MessageError:
                    continue
        return f"{ROW_NUMBER_PREFIX}{row.number}", "", None

    def identify(self, row: Row) -> tuple[str, str, int]:
        """``(key, address cell, fingerprint)`` of ``row``.

        The fingerprint is a 64-bit hash of the cells the template reads, the address counted
        as its key: ``ANN@Example.org`` for ``ann@example.org`` is no change.
        """
        key, email, column = self.key(row)
        values = row.values
        cells = [key if name == column else values.get(name, "") for name in self.fingerprinted]
        return key, email, _hash64("\x00".join(cells).encode("utf-8", "surrogatepass"))
