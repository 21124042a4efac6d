"""Screening claimed queue messages against the suppression list before they are attempted.

Used by the drain, the workers and the relay (:class:`~twistmail.queue.worker.Drain`): one
:meth:`~twistmail.interfaces.ISuppressionList.check` per claimed batch and list. A message's
list is its ``List-Id`` header (an unsubscribe applies to that list only; mail of no list, a
password reset, is stopped only by all-mail entries).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Final

from twisted.internet import defer

from ..interfaces import ISuppressionList
from ..queue.records import ClaimedMessage, Outcome, RecipientState
from .records import Suppression, SuppressionError, key_or_none, list_key, suppressed_reply

__all__ = ["Screened", "list_id_of", "screen"]

_LIST_ID: Final = re.compile(rb"^list-id:[ \t]*(.*(?:\r?\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)

SuppressedRecipient = tuple[int, RecipientState, int | None, str]


def header_end(payload: bytes) -> int:
    """Where the header section of a message's bytes ends: the start of its first empty line's
    line break (``\\r\\n`` or ``\\n``); the length of ``payload`` when it has no body."""
    end = payload.find(b"\n\r\n")
    if end < 0:
        end = len(payload)
    lf = payload.find(b"\n\n", 0, end + 1)  # only up to the CRLF one: no scan of a large body
    if lf >= 0:
        end = lf
    return end - 1 if 0 < end < len(payload) and payload[end - 1] == 0x0D else end


def list_id_of(payload: bytes) -> str:
    """The list id of the ``List-Id`` header of a message's bytes; "" when it has none (or
    one that is not a list id)."""
    end = header_end(payload)
    # Most messages have no List-Id: a plain search rules that out before the regex runs (the
    # regex alone took about 4 µs a message, on the reactor thread of every drain).
    if b"list-id:" not in payload[:end].lower():
        return ""
    match = _LIST_ID.search(payload, 0, end)
    if match is None:
        return ""
    try:
        return list_key(match.group(1).decode("utf-8", "replace").replace("\r\n", ""))
    except SuppressionError:
        return ""


@dataclass
class Screened:
    """Claims screened: ``kept`` to attempt (each with its suppressed recipients' records,
    restricted to the others), ``blocked`` outcomes of messages every recipient of which is
    suppressed (to record as failed, not sent at all), and the entries that matched."""

    kept: list[tuple[ClaimedMessage, tuple[SuppressedRecipient, ...]]] = field(default_factory=list)
    blocked: list[tuple[ClaimedMessage, Outcome]] = field(default_factory=list)
    matched: int = 0


def screen(store: ISuppressionList, claimed: list[ClaimedMessage]) -> defer.Deferred[Screened]:
    """Check the recipients of ``claimed`` (one query per list among them)."""
    by_list: dict[str, list[ClaimedMessage]] = defaultdict(list)
    lists = {}
    for c in claimed:
        lists[c.id] = list_id = list_id_of(c.envelope.payload)
        by_list[list_id].append(c)
    checks = [
        store.check([r for c in group for r in c.envelope.recipients], list_id)
        for list_id, group in by_list.items()
    ]
    found = defer.gatherResults(checks, consumeErrors=True)

    def split(results: list[dict[str, Suppression]]) -> Screened:
        entries = dict(zip(by_list, results, strict=True))
        screened = Screened()
        for c in claimed:
            hits = entries[lists[c.id]]
            if not hits:
                screened.kept.append((c, ()))
                continue
            keep_positions, keep_rcpts, stopped = [], [], []
            for position, rcpt in zip(c.positions, c.envelope.recipients, strict=True):
                entry = hits.get(key_or_none(rcpt))
                if entry is None:
                    keep_positions.append(position)
                    keep_rcpts.append(rcpt)
                else:
                    stopped.append((position, "failed", None, suppressed_reply(entry)))
            screened.matched += len(stopped)
            if not stopped:
                screened.kept.append((c, ()))
            elif keep_rcpts:
                envelope = replace(c.envelope, recipients=tuple(keep_rcpts))
                kept = replace(c, envelope=envelope, positions=tuple(keep_positions))
                screened.kept.append((kept, tuple(stopped)))  # type: ignore[arg-type]
            else:
                outcome = Outcome(
                    id=c.id,
                    fence=c.fence,
                    state="failed",
                    attempts=c.attempts,
                    code=None,
                    response="every recipient is suppressed: not sent",
                    recipients=tuple(stopped),  # type: ignore[arg-type]
                )
                screened.blocked.append((c, outcome))
        return screened

    return found.addCallback(split)
