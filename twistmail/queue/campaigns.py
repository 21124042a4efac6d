"""CSV campaigns stored in a queue: the template and the rows once, each row rendered when claimed.

A campaign (``twistmail send CSV TEMPLATE --queue URL``) is stored in the queue it is sent
from: its template's text, the CSV's columns, the envelope sender and the files its template
attaches, once (:class:`CampaignSpec`); then one row per recipient, keyed as the CLI's journal
keys them (:mod:`twistmail.merge.identity`), with the row's cells. A row to send has a message
in the queue with no payload: the worker that claims it renders the row then (in Jinja2's
sandbox, from the stored files: :class:`CampaignRenderer`), so a million-row campaign is not
stored as a million rendered messages, and any worker (``twistmail worker``, the relay,
``drain``) can send any campaign. A row's state is its message's: ``queued`` and ``sending``
are reported ``pending``; ``invalid`` and ``duplicate`` rows have no message.

The campaign operations are part of :class:`~twistmail.interfaces.IQueue`; the SQLite and
PostgreSQL stores share the SQL below (:class:`Sql` adapts the parameter style), the memory
store keeps the same in dicts.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from ..message import Envelope
from .records import ClaimedMessage, QueueError

__all__ = [
    "CAMPAIGN_TABLES",
    "FIRST",
    "HELD",
    "RECENT",
    "Campaign",
    "CampaignChanged",
    "CampaignRenderer",
    "CampaignRow",
    "CampaignSpec",
    "CampaignStatus",
    "ReportRow",
    "Sql",
    "row_state",
]

RECENT: Final = 60.0
"""The window, in seconds, of a campaign's recent rate (:attr:`CampaignStatus.rate`)."""

ROW_STATE: Final[dict[str, str]] = {"queued": "pending", "sending": "pending"}
"""A message's state as its campaign row reports it (others as they are)."""

ReportRow = tuple[int, str, str, "int | None", str, int, "str | None", str]
"""One report line: row, email, status, code, response, attempts, message_id, changed."""


def row_state(message_state: str) -> str:
    """The state a campaign row reports for a message in ``message_state``."""
    return ROW_STATE.get(message_state, message_state)


class CampaignChanged(QueueError):
    """The campaign exists in the queue with another template."""


@dataclass(frozen=True, slots=True)
class CampaignSpec:
    """What every row of a campaign is rendered with."""

    template: str
    """The template's text."""
    template_name: str
    """Its name in messages (the file it came from)."""
    columns: tuple[str, ...]
    """The CSV's columns."""
    envelope_from: str | None = None
    """The envelope sender, if not the From address."""
    fingerprint: str = ""
    """The template's SHA-256: a campaign's template never changes."""

    def to_json(self) -> str:
        """The spec as stored."""
        return json.dumps(
            {
                "template": self.template,
                "template_name": self.template_name,
                "columns": list(self.columns),
                "envelope_from": self.envelope_from,
                "fingerprint": self.fingerprint,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> CampaignSpec:
        """The spec stored as ``text``."""
        data = json.loads(text)
        return cls(
            data["template"],
            data["template_name"],
            tuple(data["columns"]),
            data.get("envelope_from"),
            data.get("fingerprint", ""),
        )


@dataclass(frozen=True, slots=True)
class Campaign:
    """A campaign in a queue: ``id`` is the token its Message-IDs carry, ``name`` what users
    call it by."""

    id: str
    name: str
    created_at: float
    spec: CampaignSpec


@dataclass(frozen=True, slots=True)
class CampaignRow:
    """What a run decided for one row, for :meth:`~twistmail.interfaces.IQueue.campaign_add`.

    ``state``: ``queued`` (to send: ``envelope`` is its rendered envelope, whose payload is not
    stored, and ``cells`` its cells), ``invalid`` or ``duplicate`` (with the ``response``
    saying why), or ``seen`` (a row the queue has: only its row number and ``changed`` flag
    are updated).
    """

    id: int
    row: int
    email: str
    state: Literal["queued", "invalid", "duplicate", "seen"]
    fingerprint: int | None = None
    response: str = ""
    changed: bool = False
    envelope: Envelope | None = None
    cells: Mapping[str, str] | None = None


@dataclass(frozen=True, slots=True)
class CampaignStatus:
    """A campaign's progress: rows by state (see :func:`row_state`), and those changed since
    sent."""

    campaign: Campaign
    counts: dict[str, int]
    changed: int = 0
    unsent: list[ReportRow] = field(default_factory=list)
    recent: int = 0
    """Rows sent in the last :data:`RECENT` seconds (the store's clock)."""

    @property
    def rate(self) -> float:
        """Rows sent per second lately."""
        return self.recent / RECENT

    @property
    def eta(self) -> float | None:
        """Seconds until every waiting row is sent at :attr:`rate`; None when nothing is
        sent lately (0.0 when nothing waits)."""
        if not self.waiting:
            return 0.0
        return self.waiting / self.rate if self.recent else None

    @property
    def total(self) -> int:
        """Rows in the campaign."""
        return sum(self.counts.values())

    @property
    def waiting(self) -> int:
        """Rows still on their way (pending or deferred)."""
        return self.counts.get("pending", 0) + self.counts.get("deferred", 0)


# Rendering at claim time ---------------------------------------------------------------------


class _Compiled:
    """One campaign's template, compiled once per process (in the sandbox)."""

    def __init__(self, campaign_id: str, spec: CampaignSpec, files: Mapping[str, bytes]) -> None:
        from ..merge.attachments import StoredAttachments
        from ..merge.template import MessageTemplate

        self.campaign_id = campaign_id
        self.spec = spec
        self.error: str | None = None
        self.template: Any = None
        try:
            template = MessageTemplate(
                spec.template,
                name=spec.template_name,
                sandboxed=True,
                attachments=StoredAttachments(files),
            )
            template.check_columns(spec.columns)
            self.template = template
        except Exception as e:  # any template error fails its rows, saying why
            self.error = f"the campaign's template cannot be used: {e}"

    def message_id(self, key: int, domain: str) -> str:
        from ..merge.identity import campaign_message_id

        return campaign_message_id(self.campaign_id, key, domain)

    def render(
        self, claimed: ClaimedMessage, number: int, cells: Mapping[str, str], key: int
    ) -> Envelope | str:
        """The envelope of ``claimed`` rendered from its row, or why it cannot be."""
        from ..merge.csvsource import Row
        from ..merge.prepare import Problem, prepare_row

        if self.template is None:
            return self.error or "the campaign's template cannot be used"
        prepared = prepare_row(
            self.template, Row(number, dict(cells)), self.message_id, self.spec.envelope_from, key
        )
        if isinstance(prepared, Problem):
            return prepared.reason
        envelope = prepared.envelope
        everyone = envelope.recipients
        if any(position >= len(everyone) for position in claimed.positions):
            return f"row {number}: renders fewer recipients than when it was queued"
        return dataclasses.replace(
            envelope, recipients=tuple(everyone[position] for position in claimed.positions)
        )


StoredRow = tuple[str, int, int, str]
"""A claimed message's campaign row: campaign id, row id, row number and its cells (JSON)."""


class CampaignRenderer:
    """Renders claimed campaign messages (those with no payload) from their rows; each
    campaign's template is compiled once, on first use."""

    def __init__(self) -> None:
        self._compiled: dict[str, _Compiled] = {}

    def render(
        self,
        claimed: list[ClaimedMessage],
        rows: Mapping[int, StoredRow],
        load: Callable[[str], tuple[CampaignSpec, Mapping[str, bytes]]],
    ) -> tuple[list[ClaimedMessage], list[tuple[ClaimedMessage, str]]]:
        """``claimed`` with every campaign message rendered (``rows`` maps message ids to
        their rows; ``load(campaign_id)`` gives a campaign's spec and files), and the messages
        that could not be rendered, with the reason."""
        ready: list[ClaimedMessage] = []
        failed: list[tuple[ClaimedMessage, str]] = []
        for claim in claimed:
            if claim.envelope.payload:
                ready.append(claim)
                continue
            stored = rows.get(claim.id)
            if stored is None:
                failed.append((claim, "its campaign row is gone (the campaign was replaced)"))
                continue
            campaign_id, key, number, cells = stored
            compiled = self._compiled.get(campaign_id)
            if compiled is None:
                spec, files = load(campaign_id)
                compiled = self._compiled[campaign_id] = _Compiled(campaign_id, spec, files)
            result = compiled.render(claim, number, json.loads(cells), key)
            if isinstance(result, str):
                failed.append((claim, result))
            else:
                ready.append(dataclasses.replace(claim, envelope=result))
        return ready, failed


# SQL shared by the SQLite and PostgreSQL stores ----------------------------------------------

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


def same_template(campaign: Campaign, spec: CampaignSpec) -> Campaign:
    """``campaign``; :class:`CampaignChanged` if it was made with another template than
    ``spec``'s."""
    if campaign.spec.fingerprint != spec.fingerprint:
        raise CampaignChanged(
            f"campaign {campaign.name!r} was started with another template, so new messages "
            "would differ from those already sent: restore the template, or send it as a new "
            "campaign (--campaign NAME)"
        )
    return campaign


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


HELD: Final = ("queued", "sending", "deferred")
"""Message states of rows on their way: a run does not queue them again."""


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


FIRST: Final = (0, -(2**63))
"""The report cursor before the first line."""


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
