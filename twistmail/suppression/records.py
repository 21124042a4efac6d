"""What a suppression list holds: entries, reasons, and the keys addresses and lists go by.

Pure (no I/O). Shared by every :class:`~twistmail.interfaces.ISuppressionList` store, so each
keys addresses and lists exactly alike.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Final, Literal

from ..address import Address, mailbox_key
from ..errors import AddressError, TwistmailError

__all__ = [
    "COMPLAINT",
    "HARD_BOUNCE",
    "MANUAL",
    "REASONS",
    "SUPPRESSED",
    "UNSUBSCRIBED",
    "Reason",
    "Suppression",
    "SuppressionError",
    "checked",
    "is_suppressed_reply",
    "key_or_none",
    "keys_of",
    "list_key",
    "lookup",
    "removal",
    "shown_state",
    "suppressed_reply",
    "suppression_key",
]

Reason = Literal["unsubscribed", "hard-bounce", "complaint", "manual"]

UNSUBSCRIBED: Final = "unsubscribed"
"""The recipient unsubscribed from a list (``list_id``); from all mail when ``list_id`` is ""."""
HARD_BOUNCE: Final = "hard-bounce"
"""A server said the mailbox does not exist (5.1.1, 5.1.3, 5.1.6): applies to all mail."""
COMPLAINT: Final = "complaint"
"""The recipient reported mail as spam (a feedback-loop report): applies to all mail."""
MANUAL: Final = "manual"
"""Added by hand (``twistmail suppress add``): applies to all mail."""

REASONS: Final[tuple[Reason, ...]] = (UNSUBSCRIBED, HARD_BOUNCE, COMPLAINT, MANUAL)

MAX_DETAIL: Final = 1000
"""Characters of ``detail`` kept (a server's reply can be long)."""
MAX_LIST_ID: Final = 255


class SuppressionError(TwistmailError, ValueError):
    """A suppression entry that cannot be stored, or a store that cannot be used."""


@dataclass(frozen=True, slots=True)
class Suppression:
    """One entry: mail to ``address`` (on ``list_id``, or all mail) is not to be sent.

    ``address`` is the normalized mailbox (:func:`suppression_key`); ``list_id`` is "" for an
    entry that applies to all mail, else the list an unsubscribe applies to (:func:`list_key`).
    Only an ``unsubscribed`` entry may name a list. ``created_at`` is seconds since the epoch
    (None when adding: the store's now). ``detail`` says where it came from (a server's reply,
    "one-click", a person's note).
    """

    address: str
    reason: Reason
    list_id: str = ""
    created_at: float | None = None
    detail: str = ""

    @property
    def applies_to_all_mail(self) -> bool:
        """Whether this entry blocks every message to the address, not just one list's."""
        return not self.list_id


def suppression_key(address: Address | str) -> str:
    """The normalized mailbox entries are keyed by (:func:`twistmail.address.mailbox_key`).

    Raises :class:`SuppressionError` naming ``address`` when it is not one valid address.
    """
    try:
        key = mailbox_key(address)
    except AddressError as e:
        raise SuppressionError(f"{str(address)!r} is not an address: {e}") from None
    if not key:
        raise SuppressionError("the null address <> cannot be suppressed")
    return key


_ANGLED = re.compile(r"<([^<>]*)>")
_NOT_IN_LIST_ID = re.compile(r"[\x00-\x20\x7f]")


def key_or_none(address: object) -> str:
    """:func:`suppression_key` of ``address`` (an :class:`~twistmail.address.Address`, parsed
    already, or a string), or "" for a value that is not an address (which matches no
    entry)."""
    try:
        if isinstance(address, Address):
            return mailbox_key(address)
        return suppression_key(str(address))
    except (SuppressionError, AddressError):
        return ""


def keys_of(addresses: Iterable[object]) -> list[str]:
    """The distinct normalized addresses among ``addresses`` (values not addresses left out)."""
    return [key for key in dict.fromkeys(map(key_or_none, addresses)) if key]


def lookup(addresses: Iterable[object], list_id: str) -> tuple[list[str], str]:
    """``(keys, list key)`` of a :meth:`~twistmail.interfaces.ISuppressionList.check`;
    :class:`SuppressionError` for a list id that is not one."""
    return keys_of(addresses), list_key(list_id)


def removal(address: str, list_id: str | None) -> tuple[str, str | None]:
    """``(key, list key or None)`` of a :meth:`~twistmail.interfaces.ISuppressionList.remove`;
    :class:`SuppressionError` for a value that is not an address or a list id."""
    return suppression_key(address), (list_key(list_id) if list_id is not None else None)


@functools.lru_cache(maxsize=1024)  # a few lists, asked of for every message
def list_key(value: str) -> str:
    """The list id a ``List-Id`` header value (``Name <id.example.org>``) or a bare id names,
    lower-cased; "" for an empty value."""
    match = _ANGLED.search(value)
    key = (match.group(1) if match else value).strip().lower()
    if len(key) > MAX_LIST_ID or _NOT_IN_LIST_ID.search(key):
        raise SuppressionError(f"list id {value!r} is not a list id (RFC 2919)")
    return key


def checked(entry: Suppression) -> Suppression:
    """``entry`` with its address and list normalized; :class:`SuppressionError` naming the
    field when an entry cannot be stored."""
    if entry.reason not in REASONS:
        raise SuppressionError(
            f"reason {entry.reason!r} for {entry.address!r}: expected one of {', '.join(REASONS)}"
        )
    list_id = list_key(entry.list_id)
    if list_id and entry.reason != UNSUBSCRIBED:
        raise SuppressionError(
            f"{entry.address!r}: a {entry.reason} applies to all mail, not to list {list_id!r}"
        )
    address = suppression_key(entry.address)
    detail = entry.detail[:MAX_DETAIL]
    if (address, list_id, detail) == (entry.address, entry.list_id, entry.detail):
        return entry
    return replace(entry, address=address, list_id=list_id, detail=detail)


SUPPRESSED: Final = "suppressed"
"""What a door reports for a recipient not sent to because it is suppressed."""
_REPLY_PREFIX: Final = "suppressed: "


def suppressed_reply(entry: Suppression) -> str:
    """The response text a store records for a recipient not sent to because of ``entry``
    (state ``failed``, no reply code): ``suppressed: <reason>[ from <list>]``."""
    where = f" from {entry.list_id}" if entry.list_id else ""
    return f"{_REPLY_PREFIX}{entry.reason}{where}"


SHOWN_STATE_SQL: Final = (
    f"CASE WHEN r.state = 'failed' AND r.code IS NULL AND "
    f"substr(r.response, 1, {len(_REPLY_PREFIX)}) = '{_REPLY_PREFIX}' "
    f"THEN '{SUPPRESSED}' ELSE r.state END"
)
""":func:`shown_state` of the recipients row ``r`` in SQL (SQLite and PostgreSQL alike)."""


def is_suppressed_reply(code: int | None, response: str) -> bool:
    """Whether a recorded failure (``code``, ``response``) is a suppression, not a refusal."""
    return code is None and response.startswith(_REPLY_PREFIX)


def shown_state(state: str, code: int | None, response: str) -> str:
    """A recipient's state as reports show it: ``suppressed`` for a suppression."""
    if state == "failed" and is_suppressed_reply(code, response):
        return SUPPRESSED
    return state
