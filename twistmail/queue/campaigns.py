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
PostgreSQL stores share their SQL (:mod:`._campaigns_sql`), the memory
store keeps the same in dicts.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from ..message import Envelope
from .records import ClaimedMessage, QueueError

__all__ = [
    "FIRST",
    "HEADERS_CELL",
    "HELD",
    "RECENT",
    "Campaign",
    "CampaignChanged",
    "CampaignRenderer",
    "CampaignRow",
    "CampaignSpec",
    "CampaignStatus",
    "ReportRow",
    "row_state",
    "same_template",
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
        values = dict(cells)
        headers = values.pop(HEADERS_CELL, None)
        prepared = prepare_row(
            self.template, Row(number, values), self.message_id, self.spec.envelope_from, key
        )
        if isinstance(prepared, Problem):
            return prepared.reason
        envelope = prepared.envelope
        if headers is not None:
            from ..unsubscribe.headers import prepend_headers

            envelope = prepend_headers(envelope, headers.encode("ascii"))
        everyone = envelope.recipients
        if any(position >= len(everyone) for position in claimed.positions):
            return f"row {number}: renders fewer recipients than when it was queued"
        return dataclasses.replace(
            envelope, recipients=tuple(everyone[position] for position in claimed.positions)
        )


HEADERS_CELL: Final = ""
"""The key, in a stored row's cells, of header lines its message gets first in its header
block (``send --queue``'s List-Unsubscribe, whose tokens only the sender's secret makes): no
CSV column has it, since an empty column name is refused."""

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
            try:
                compiled = self._compiled.get(campaign_id)
                if compiled is None:
                    spec, files = load(campaign_id)
                    compiled = self._compiled[campaign_id] = _Compiled(campaign_id, spec, files)
                result = compiled.render(claim, number, json.loads(cells), key)
            except Exception as e:  # a store's transaction (other work with it) must go on
                result = f"row {number} cannot be rendered: {e!r}"
            if isinstance(result, str):
                failed.append((claim, result))
            else:
                ready.append(dataclasses.replace(claim, envelope=result))
        return ready, failed


HELD: Final = ("queued", "sending", "deferred")
"""Message states of rows on their way: a run does not queue them again."""

FIRST: Final = (0, -(2**63))
"""The report cursor before the first line."""


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
