"""The campaign operations of the memory queue (see :mod:`.campaigns`), in dicts."""

from __future__ import annotations

import dataclasses
import json
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer

from .campaigns import (
    FIRST,
    HELD,
    RECENT,
    Campaign,
    CampaignRenderer,
    CampaignRow,
    CampaignSpec,
    CampaignStatus,
    ReportRow,
    row_state,
    same_template,
)
from .records import ClaimedMessage

__all__ = ["Campaigns"]


@dataclass
class _Row:
    row: int
    email: str
    state: str
    response: str = ""
    fingerprint: int | None = None
    changed: bool = False
    message: int | None = None
    cells: str | None = None


class Campaigns:
    """The campaign operations of :class:`~twistmail.queue.memory.MemoryQueue` (see IQueue)."""

    _messages: dict[int, Any]
    _clock: Callable[[], float]
    enqueue: Callable[..., defer.Deferred[list[int]]]

    def _init_campaigns(self) -> None:
        self._campaigns: dict[str, Campaign] = {}
        self._campaign_rows: dict[str, dict[int, _Row]] = {}
        self._files: dict[str, dict[str, bytes]] = {}
        self._renderer = CampaignRenderer()
        self._row_of: dict[int, tuple[str, int]] = {}  # message -> (campaign, row id)

    def _campaign_store(self) -> tuple[dict[str, Campaign], dict[str, dict[int, _Row]]]:
        return self._campaigns, self._campaign_rows

    def _find(self, name: str) -> Campaign | None:
        campaigns, _ = self._campaign_store()
        return campaigns.get(name) or next((c for c in campaigns.values() if c.id == name), None)

    def _state(self, row: _Row) -> str:
        if row.message is None:
            return row.state
        return str(self._messages[row.message].state)

    def campaign_open(self, name: str, spec: CampaignSpec) -> defer.Deferred[Campaign]:
        """Campaign ``name``, made with ``spec`` unless it exists (see IQueue)."""
        campaigns, rows = self._campaign_store()
        if name not in campaigns:
            campaign = Campaign(secrets.token_hex(12), name, self._clock(), spec)
            campaigns[name] = campaign
            rows[campaign.id] = {}
        return defer.maybeDeferred(same_template, campaigns[name], spec)

    def campaign(self, name: str) -> defer.Deferred[Campaign | None]:
        """Campaign ``name`` (or with that id), or None."""
        return defer.succeed(self._find(name))

    def campaign_lookup(self, campaign: str, ids: Sequence[int]) -> defer.Deferred[dict[int, Any]]:
        """What the queue holds of the rows ``ids`` of ``campaign`` (see IQueue)."""
        rows = self._campaign_store()[1].get(campaign, {})
        found = {}
        for ident in ids:
            row = rows.get(ident)
            if row is not None:
                found[ident] = (row.row, self._state(row), row.fingerprint, int(row.changed))
        return defer.succeed(found)

    def campaign_add(
        self, campaign: str, rows: Sequence[CampaignRow], files: Mapping[str, bytes]
    ) -> defer.Deferred[int]:
        """Record rows of ``campaign`` and queue those to send."""
        stored = self._campaign_store()[1].setdefault(campaign, {})
        kept = self._files.setdefault(campaign, {})
        for name, data in files.items():
            kept.setdefault(name, data)
        queued = 0
        for r in rows:
            old = stored.get(r.id)
            if r.state == "queued":
                if (
                    old is not None
                    and old.message is not None
                    and self._state(old) in (*HELD, "sent")
                ):
                    continue
                assert r.envelope is not None
                envelope = dataclasses.replace(r.envelope, payload=b"")
                ids: list[int] = []
                self.enqueue([envelope]).addCallback(ids.extend)  # fires at once
                (message,) = ids
                stored[r.id] = _Row(
                    r.row,
                    r.email,
                    "queued",
                    "",
                    r.fingerprint,
                    False,
                    message,
                    json.dumps(r.cells),
                )
                self._row_of[message] = (campaign, r.id)
                queued += 1
            elif r.state == "seen":
                if old is not None:
                    old.row, old.changed = r.row, r.changed
            else:
                stored[r.id] = _Row(r.row, r.email, r.state, r.response, r.fingerprint)
        return defer.succeed(queued)

    def campaign_forget(self, campaign: str) -> defer.Deferred[int]:
        """Forget the rows of ``campaign`` that have no message (see IQueue)."""
        rows = self._campaign_store()[1].get(campaign, {})
        gone = [ident for ident, row in rows.items() if row.message is None]
        for ident in gone:
            del rows[ident]
        return defer.succeed(len(gone))

    def campaign_status(
        self, name: str | None = None, *, unsent: int = 20
    ) -> defer.Deferred[list[CampaignStatus]]:
        """Every campaign's progress, or ``name``'s (see IQueue)."""
        campaigns, rows = self._campaign_store()
        if name is None:
            found = sorted(campaigns.values(), key=lambda c: (c.created_at, c.name))
        else:
            one = self._find(name)
            found = [] if one is None else [one]
        statuses = []
        for campaign in found:
            counts: dict[str, int] = {}
            changed = 0
            for row in rows[campaign.id].values():
                state = row_state(self._state(row))
                counts[state] = counts.get(state, 0) + 1
                changed += int(row.changed)
            lines = self._report(campaign.id, FIRST, unsent, unsent_only=True)[0]
            since = self._clock() - RECENT
            recent = sum(
                1
                for row in rows[campaign.id].values()
                if row.message is not None
                and self._messages[row.message].state == "sent"
                and self._messages[row.message].updated_at >= since
            )
            statuses.append(CampaignStatus(campaign, counts, changed, lines, recent))
        return defer.succeed(statuses)

    def campaign_report(
        self, campaign: str, after: tuple[int, int] = FIRST, limit: int = 1000
    ) -> defer.Deferred[tuple[list[ReportRow], tuple[int, int]]]:
        """A page of ``campaign``'s report (see IQueue)."""
        return defer.succeed(self._report(campaign, after, limit))

    def _report(
        self, campaign: str, after: tuple[int, int], limit: int, *, unsent_only: bool = False
    ) -> tuple[list[ReportRow], tuple[int, int]]:
        rows = self._campaign_store()[1].get(campaign, {})
        lines: list[ReportRow] = []
        cursor = after
        for ident, row in sorted(rows.items(), key=lambda item: (item[1].row, item[0])):
            if len(lines) >= limit:
                break
            if (row.row, ident) <= after:
                continue
            state = self._state(row)
            if unsent_only and state == "sent":
                continue
            message = self._messages.get(row.message) if row.message is not None else None
            lines.append(
                (
                    row.row,
                    row.email,
                    row_state(state),
                    message.code if message else None,
                    message.response if message else row.response,
                    message.attempts if message else 0,
                    message.envelope.message_id if message else None,
                    "yes" if row.changed else "",
                )
            )
            cursor = (row.row, ident)
        return lines, cursor

    def _render_claimed(self, claimed: list[ClaimedMessage]) -> list[ClaimedMessage]:
        """``claimed`` with its campaign messages rendered; one that cannot be is failed."""
        if all(c.envelope.payload for c in claimed):
            return claimed
        campaigns, rows = self._campaign_store()
        by_message = {}
        for claim in claimed:
            campaign, ident = self._row_of.get(claim.id, ("", 0))
            row = rows.get(campaign, {}).get(ident)
            if row is not None and row.message == claim.id:
                by_message[claim.id] = (campaign, ident, row.row, row.cells or "{}")
        by_id = {c.id: c for c in campaigns.values()}
        files = self._files
        ready, failed = self._renderer.render(
            claimed, by_message, lambda c: (by_id[c].spec, files.get(c, {}))
        )
        for claim, reason in failed:
            message = self._messages[claim.id]
            message.state, message.owner, message.lease_until = "failed", None, None
            message.response = reason
            for recipient in message.recipients:
                if recipient.state == "pending":
                    recipient.state, recipient.response = "failed", reason
        return ready
