"""The campaign operations of the PostgreSQL queue (see :mod:`.campaigns`).

The campaign tables are part of the queue's schema (version 1), created if missing when the
queue is opened.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet import defer

from ._campaigns_sql import (
    Sql,
    add_rows,
    campaign_statuses,
    create_tables,
    find_campaign,
    forget_rows,
    lookup_rows,
    open_campaign,
    render_claimed,
    report_rows,
)
from .campaigns import (
    FIRST,
    Campaign,
    CampaignRenderer,
    CampaignRow,
    CampaignSpec,
    CampaignStatus,
    ReportRow,
    same_template,
)
from .records import ClaimedMessage

__all__ = ["Campaigns", "prepare", "render"]


def prepare(conn: Any, schema: str) -> None:
    """Create the campaign tables of the queue in ``schema`` (the connection's search path)
    if missing."""
    with conn.transaction():
        # Under the lock that creates the queue's tables: workers start together.
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"twistmail:{schema}",))
        create_tables(conn, postgres=True)


def _sql(conn: Any, now: float | None, channel: str = "") -> Sql:
    from ._postgres_db import _insert

    def insert(envelopes: list[Any]) -> list[int]:
        return _insert(envelopes, uuid.uuid4(), channel, conn, now, False)

    return Sql(conn, postgres=True, insert=insert, now=now if now is not None else time.time())


def render(
    claimed: list[ClaimedMessage], conn: Any, now: float | None, renderer: CampaignRenderer
) -> list[ClaimedMessage]:
    """``claimed`` with its campaign messages rendered (see :func:`.campaigns.render_claimed`)."""
    return render_claimed(_sql(conn, now), claimed, renderer)


def _op(function: Callable[..., Any], *args: Any) -> Callable[[Any, float | None, bool], Any]:
    return lambda conn, now, again: function(_sql(conn, now), *args)


class Campaigns:
    """The campaign operations of :class:`~twistmail.queue.postgres.PostgresQueue` (see
    IQueue)."""

    _channel: str
    _run: Callable[..., defer.Deferred[Any]]

    def campaign_open(self, name: str, spec: CampaignSpec) -> defer.Deferred[Campaign]:
        """Campaign ``name``, made with ``spec`` unless it exists (see IQueue)."""
        d = self._run(_op(open_campaign, name, spec, secrets.token_hex(12)))
        return d.addCallback(same_template, spec)

    def campaign(self, name: str) -> defer.Deferred[Campaign | None]:
        """Campaign ``name`` (or with that id), or None."""
        return self._run(_op(find_campaign, name))

    def campaign_lookup(self, campaign: str, ids: Sequence[int]) -> defer.Deferred[dict[int, Any]]:
        """What the queue holds of the rows ``ids`` of ``campaign`` (see IQueue)."""
        return self._run(_op(lookup_rows, campaign, list(ids)))

    def campaign_add(
        self, campaign: str, rows: Sequence[CampaignRow], files: Mapping[str, bytes]
    ) -> defer.Deferred[int]:
        """Record rows of ``campaign`` and queue those to send, in one transaction."""
        rows, files, channel = list(rows), dict(files), self._channel
        return self._run(
            lambda conn, now, again: add_rows(_sql(conn, now, channel), campaign, rows, files)
        )

    def campaign_forget(self, campaign: str) -> defer.Deferred[int]:
        """Forget the rows of ``campaign`` that have no message (see IQueue)."""
        return self._run(_op(forget_rows, campaign))

    def campaign_status(
        self, name: str | None = None, *, unsent: int = 20
    ) -> defer.Deferred[list[CampaignStatus]]:
        """Every campaign's progress, or ``name``'s (see IQueue)."""
        return self._run(_op(campaign_statuses, name, unsent))

    def campaign_report(
        self, campaign: str, after: tuple[int, int] = FIRST, limit: int = 1000
    ) -> defer.Deferred[tuple[list[ReportRow], tuple[int, int]]]:
        """A page of ``campaign``'s report (see IQueue)."""
        return self._run(_op(report_rows, campaign, after, limit))
