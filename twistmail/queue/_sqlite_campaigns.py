"""The campaign operations of the SQLite queue (see :mod:`.campaigns`).

The campaign tables are created in every spool file if missing and versioned under their own
``meta`` key, ``campaigns_version``, so they change apart from the queue's own schema.
"""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, TypeVar

from twisted.internet import defer

from .._sqlite import SqliteThread
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
from .records import ClaimedMessage, QueueError

__all__ = ["CAMPAIGNS_VERSION", "Campaigns", "prepare", "render"]

CAMPAIGNS_VERSION: Final = "1"

_T = TypeVar("_T")


def prepare(conn: sqlite3.Connection, path: str) -> None:
    """Create the campaign tables if missing (in the caller's transaction); refuse a newer
    version of them."""
    row = conn.execute("SELECT value FROM meta WHERE key = 'campaigns_version'").fetchone()
    if row is not None and row[0] == CAMPAIGNS_VERSION:
        return
    if row is not None:
        raise QueueError(
            f"{path}: campaign tables of version {row[0]!r}, which this twistmail (version "
            f"{CAMPAIGNS_VERSION}) cannot use; upgrade twistmail to use this file"
        )
    create_tables(conn, postgres=False)
    conn.execute(
        "INSERT INTO meta (key, value) VALUES ('campaigns_version', ?)", (CAMPAIGNS_VERSION,)
    )


def _sql(conn: sqlite3.Connection, now: float) -> Sql:
    from .sqlite import _insert

    return Sql(conn, postgres=False, insert=lambda envs: _insert(envs, conn, now), now=now)


def render(
    claimed: list[ClaimedMessage],
    conn: sqlite3.Connection,
    now: float,
    renderer: CampaignRenderer,
) -> list[ClaimedMessage]:
    """``claimed`` with its campaign messages rendered (see :func:`.campaigns.render_claimed`)."""
    return render_claimed(_sql(conn, now), claimed, renderer)


def _read(function: Callable[..., _T], clock: Callable[[], float]) -> Callable[..., _T]:
    def run(conn: sqlite3.Connection, *args: Any) -> _T:
        conn.execute("BEGIN")  # one snapshot
        try:
            return function(_sql(conn, clock()), *args)
        finally:
            conn.execute("COMMIT")

    return run


class Campaigns:
    """The campaign operations of :class:`~twistmail.queue.SqliteQueue` (see IQueue)."""

    _db: SqliteThread[Any]
    _clock: Callable[[], float]

    def campaign_open(self, name: str, spec: CampaignSpec) -> defer.Deferred[Campaign]:
        """Campaign ``name``, made with ``spec`` unless it exists (see IQueue)."""
        token = secrets.token_hex(12)
        d: defer.Deferred[Campaign] = self._db.submit(
            lambda conn, now: open_campaign(_sql(conn, now), name, spec, token)
        )
        return d.addCallback(same_template, spec)

    def campaign(self, name: str) -> defer.Deferred[Campaign | None]:
        """Campaign ``name`` (or with that id), or None."""
        return self._db.read(_read(find_campaign, self._clock), name)

    def campaign_lookup(self, campaign: str, ids: Sequence[int]) -> defer.Deferred[dict[int, Any]]:
        """What the queue holds of the rows ``ids`` of ``campaign`` (see IQueue)."""
        return self._db.read(_read(lookup_rows, self._clock), campaign, list(ids))

    def campaign_add(
        self, campaign: str, rows: Sequence[CampaignRow], files: Mapping[str, bytes]
    ) -> defer.Deferred[int]:
        """Record rows of ``campaign`` and queue those to send, in one transaction."""
        rows, files = list(rows), dict(files)
        return self._db.submit(lambda conn, now: add_rows(_sql(conn, now), campaign, rows, files))

    def campaign_forget(self, campaign: str) -> defer.Deferred[int]:
        """Forget the rows of ``campaign`` that have no message (see IQueue)."""
        return self._db.submit(lambda conn, now: forget_rows(_sql(conn, now), campaign))

    def campaign_status(
        self, name: str | None = None, *, unsent: int = 20
    ) -> defer.Deferred[list[CampaignStatus]]:
        """Every campaign's progress, or ``name``'s (see IQueue)."""
        return self._db.read(_read(campaign_statuses, self._clock), name, unsent)

    def campaign_report(
        self, campaign: str, after: tuple[int, int] = FIRST, limit: int = 1000
    ) -> defer.Deferred[tuple[list[ReportRow], tuple[int, int]]]:
        """A page of ``campaign``'s report (see IQueue)."""
        return self._db.read(_read(report_rows, self._clock), campaign, after, limit)
