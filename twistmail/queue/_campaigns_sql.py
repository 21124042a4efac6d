"""The SQL of the campaign operations, shared by the SQLite and PostgreSQL stores (see
:mod:`.campaigns`): :class:`Sql` adapts a store's connection (its parameter style, its message
insert, its now)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

from ..message import Envelope
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
)
from .records import ClaimedMessage

__all__ = [
    "CAMPAIGN_TABLES",
    "Sql",
    "add_rows",
    "campaign_statuses",
    "create_tables",
    "find_campaign",
    "forget_rows",
    "lookup_rows",
    "open_campaign",
    "render_claimed",
    "report_rows",
]

CAMPAIGN_TABLES: Final = """
CREATE TABLE IF NOT EXISTS campaigns (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    fingerprint TEXT NOT NULL,
    spec TEXT NOT NULL,
    created_at {real} NOT NULL
);
CREATE TABLE IF NOT EXISTS campaign_files (
    campaign TEXT NOT NULL,
    name TEXT NOT NULL,
    data {blob} NOT NULL,
    PRIMARY KEY (campaign, name)
);
CREATE TABLE IF NOT EXISTS campaign_rows (
    campaign TEXT NOT NULL,
    id BIGINT NOT NULL,
    csv_row INTEGER NOT NULL,
    email TEXT NOT NULL,
    state TEXT NOT NULL,
    response TEXT NOT NULL DEFAULT '',
    fingerprint BIGINT,
    changed INTEGER NOT NULL DEFAULT 0,
    message BIGINT,
    cells TEXT,
    PRIMARY KEY (campaign, id)
);
CREATE INDEX IF NOT EXISTS campaign_rows_message ON campaign_rows (message);
CREATE INDEX IF NOT EXISTS campaign_rows_order ON campaign_rows (campaign, csv_row, id)
"""
"""The campaign tables (``{real}`` and ``{blob}`` are the store's type names)."""

_STATE = "COALESCE(m.state, r.state)"
_ROWS = "campaign_rows r LEFT JOIN messages m ON m.id = r.message"


class Sql:
    """A store's connection as the campaign SQL uses it: ``?`` parameters, ``any_of`` lists,
    the store's own message insert (``insert(envelopes)`` gives their ids) and its ``now``."""

    def __init__(
        self,
        conn: Any,
        *,
        postgres: bool,
        insert: Callable[[list[Envelope]], list[int]],
        now: float,
    ) -> None:
        self.conn = conn
        self.postgres = postgres
        self.insert = insert
        self.now = now

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        if self.postgres:
            sql = sql.replace("?", "%s")
        return self.conn.execute(sql, params)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        rows = list(rows)
        if not rows:
            return
        if self.postgres:
            with self.conn.cursor() as cursor:
                cursor.executemany(sql.replace("?", "%s"), rows)
        else:
            self.conn.executemany(sql, rows)

    def by_ids(self, sql: str, column: str, ids: Sequence[int], *params: Any) -> list[Any]:
        """Rows of ``sql`` (its ``{ids}`` is where ``column`` is one of ``ids``)."""
        if self.postgres:
            return list(self.execute(sql.format(ids=f"{column} = ANY(?)"), (*params, list(ids))))
        found: list[Any] = []
        for start in range(0, len(ids), 500):
            some = ids[start : start + 500]
            marks = ", ".join("?" * len(some))
            found.extend(self.execute(sql.format(ids=f"{column} IN ({marks})"), (*params, *some)))
        return found


def create_tables(db: Any, *, postgres: bool) -> None:
    """Create the campaign tables if missing (inside the caller's transaction)."""
    text = CAMPAIGN_TABLES.format(
        real="DOUBLE PRECISION" if postgres else "REAL", blob="BYTEA" if postgres else "BLOB"
    )
    for statement in text.split(";"):
        if statement.strip():
            db.execute(statement)


def _campaign(row: Sequence[Any]) -> Campaign:
    return Campaign(row[0], row[1], float(row[2]), CampaignSpec.from_json(row[3]))


def open_campaign(db: Sql, name: str, spec: CampaignSpec, token: str) -> Campaign:
    """Campaign ``name``, made with ``spec`` (and id ``token``) unless it exists (check it
    with :func:`same_template`: raising here would roll back a group commit's other work)."""
    db.execute(
        "INSERT INTO campaigns (id, name, fingerprint, spec, created_at) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT (name) DO NOTHING",
        (token, name, spec.fingerprint, spec.to_json(), db.now),
    )
    found = find_campaign(db, name)
    assert found is not None
    return found


def find_campaign(db: Sql, name: str) -> Campaign | None:
    """Campaign ``name`` (or with that id), or None."""
    row = db.execute(
        "SELECT id, name, created_at, spec FROM campaigns WHERE name = ? OR id = ?", (name, name)
    ).fetchone()
    return None if row is None else _campaign(row)


def lookup_rows(db: Sql, campaign: str, ids: Sequence[int]) -> dict[int, Any]:
    """``id -> (row, state, fingerprint, changed)`` of the rows of ``campaign`` among ``ids``
    (the state of a row with a message is the message's: ``queued``, ``sending`` ...)."""
    found = db.by_ids(
        f"SELECT r.id, r.csv_row, {_STATE}, r.fingerprint, r.changed FROM {_ROWS} "  # noqa: S608
        "WHERE r.campaign = ? AND {ids}",
        "r.id",
        ids,
        campaign,
    )
    return {ident: (row, state, fp, changed) for ident, row, state, fp, changed in found}


def add_rows(
    db: Sql, campaign: str, rows: Sequence[CampaignRow], files: Mapping[str, bytes]
) -> int:
    """Record ``rows`` of ``campaign`` (and the ``files`` its template read) in the caller's
    transaction; fires with how many messages were queued. A row to send that another run
    queued or sent meanwhile is left as it is."""
    db.executemany(
        "INSERT INTO campaign_files (campaign, name, data) VALUES (?, ?, ?) "
        "ON CONFLICT (campaign, name) DO NOTHING",
        [(campaign, name, data) for name, data in files.items()],
    )
    sending = [r for r in rows if r.state == "queued"]
    if sending:
        taken = {
            ident
            for ident, state in db.by_ids(
                f"SELECT r.id, m.state FROM {_ROWS} WHERE r.campaign = ? AND {{ids}}",  # noqa: S608
                "r.id",
                [r.id for r in sending],
                campaign,
            )
            if state is not None and (state in HELD or state == "sent")
        }
        sending = [r for r in sending if r.id not in taken]
        envelopes = []
        for r in sending:
            assert r.envelope is not None
            envelopes.append(dataclasses.replace(r.envelope, payload=b""))
        messages = db.insert(envelopes) if envelopes else []
        db.executemany(
            "INSERT INTO campaign_rows (campaign, id, csv_row, email, state, response, "
            "fingerprint, changed, message, cells) VALUES (?, ?, ?, ?, 'queued', '', ?, 0, ?, ?) "
            "ON CONFLICT (campaign, id) DO UPDATE SET csv_row = excluded.csv_row, "
            "email = excluded.email, state = excluded.state, response = '', "
            "fingerprint = excluded.fingerprint, changed = 0, message = excluded.message, "
            "cells = excluded.cells",
            [
                (campaign, r.id, r.row, r.email, r.fingerprint, message, json.dumps(r.cells))
                for r, message in zip(sending, messages, strict=True)
            ],
        )
    db.executemany(
        "INSERT INTO campaign_rows (campaign, id, csv_row, email, state, response, fingerprint) "
        "VALUES (?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (campaign, id) DO UPDATE SET csv_row = excluded.csv_row, "
        "email = excluded.email, state = excluded.state, response = excluded.response, "
        "fingerprint = excluded.fingerprint, changed = 0, message = NULL, cells = NULL",
        [
            (campaign, r.id, r.row, r.email, r.state, r.response, r.fingerprint)
            for r in rows
            if r.state in ("invalid", "duplicate")
        ],
    )
    db.executemany(
        "UPDATE campaign_rows SET csv_row = ?, changed = ? WHERE campaign = ? AND id = ?",
        [(r.row, int(r.changed), campaign, r.id) for r in rows if r.state == "seen"],
    )
    return len(sending)


def forget_rows(db: Sql, campaign: str) -> int:
    """Forget the rows of ``campaign`` with no message (invalid, duplicate): a run sorts
    them afresh from the CSV as it is now."""
    cursor = db.execute(
        "DELETE FROM campaign_rows WHERE campaign = ? AND message IS NULL", (campaign,)
    )
    return int(cursor.rowcount)


def campaign_statuses(db: Sql, name: str | None, unsent: int) -> list[CampaignStatus]:
    """Every campaign's status (or ``name``'s alone), each with its first ``unsent`` rows not
    sent."""
    if name is None:
        found = [
            _campaign(row)
            for row in db.execute(
                "SELECT id, name, created_at, spec FROM campaigns ORDER BY created_at, name"
            )
        ]
    else:
        one = find_campaign(db, name)
        found = [] if one is None else [one]
    statuses = []
    for campaign in found:
        counts: dict[str, int] = {}
        changed = 0
        for state, count, flagged in db.execute(
            f"SELECT {_STATE}, count(*), sum(r.changed) FROM {_ROWS} "  # noqa: S608
            "WHERE r.campaign = ? GROUP BY 1",
            (campaign.id,),
        ):
            shown = row_state(state)
            counts[shown] = counts.get(shown, 0) + int(count)
            changed += int(flagged or 0)
        rows, _ = report_rows(db, campaign.id, FIRST, unsent, unsent_only=True)
        (recent,) = db.execute(
            f"SELECT count(*) FROM {_ROWS} WHERE r.campaign = ? "  # noqa: S608
            "AND m.state = 'sent' AND m.updated_at >= ?",
            (campaign.id, db.now - RECENT),
        ).fetchone()
        statuses.append(CampaignStatus(campaign, counts, changed, rows, int(recent)))
    return statuses


def report_rows(
    db: Sql, campaign: str, after: tuple[int, int], limit: int, *, unsent_only: bool = False
) -> tuple[list[ReportRow], tuple[int, int]]:
    """Up to ``limit`` report lines of ``campaign`` after the cursor ``after``, in row order
    (with ``unsent_only``: rows not sent only), and the cursor after them."""
    if limit <= 0:
        return [], after
    where = f" AND {_STATE} != 'sent'" if unsent_only else ""
    rows = db.execute(
        f"SELECT r.csv_row, r.id, r.email, {_STATE}, m.code, "  # noqa: S608
        "COALESCE(m.response, r.response), COALESCE(m.attempts, 0), m.message_id, r.changed "
        f"FROM {_ROWS} WHERE r.campaign = ? AND (r.csv_row > ? OR (r.csv_row = ? AND r.id > ?))"
        f"{where} ORDER BY r.csv_row, r.id LIMIT ?",
        (campaign, after[0], after[0], after[1], limit),
    ).fetchall()
    lines: list[ReportRow] = [
        (row, email, row_state(state), code, response or "", attempts, mid, "yes" if ch else "")
        for row, _ident, email, state, code, response, attempts, mid, ch in rows
    ]
    return lines, ((rows[-1][0], rows[-1][1]) if rows else after)


def render_claimed(
    db: Sql, claimed: list[ClaimedMessage], renderer: CampaignRenderer
) -> list[ClaimedMessage]:
    """``claimed`` with its campaign messages rendered; one that cannot be is failed here
    (in the claim's transaction), with the reason, and left out."""
    blank = [c.id for c in claimed if not c.envelope.payload]
    if not blank:
        return claimed
    rows = {
        message: (campaign, ident, number, cells)
        for message, campaign, ident, number, cells in db.by_ids(
            "SELECT message, campaign, id, csv_row, cells FROM campaign_rows WHERE {ids}",
            "message",
            blank,
        )
    }

    def load(campaign: str) -> tuple[CampaignSpec, dict[str, bytes]]:
        spec = db.execute("SELECT spec FROM campaigns WHERE id = ?", (campaign,)).fetchone()
        files = {
            name: bytes(data)
            for name, data in db.execute(
                "SELECT name, data FROM campaign_files WHERE campaign = ?", (campaign,)
            )
        }
        return CampaignSpec.from_json(spec[0]), files

    ready, failed = renderer.render(claimed, rows, load)
    for claim, reason in failed:
        db.execute(
            "UPDATE messages SET state = 'failed', owner = NULL, lease_until = NULL, "
            "code = NULL, response = ?, updated_at = ? WHERE id = ? AND fence = ?",
            (reason, db.now, claim.id, claim.fence),
        )
        db.execute(
            "UPDATE recipients SET state = 'failed', response = ? "
            "WHERE message = ? AND state = 'pending'",
            (reason, claim.id),
        )
    return ready
