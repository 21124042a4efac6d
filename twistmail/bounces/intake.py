"""The bounce intake: what a received DSN or complaint changes.

:meth:`BounceIntake.process` reads one message (:func:`~twistmail.bounces.parse.parse_report`)
and, for each recipient it reports on:

- a **hard** bounce fails the recipient in the queue or the campaign's journal (when a VERP
  return path names a queued message or a campaign row, and that store is given) and, when
  the status is about the recipient's address (5.1.1, 5.1.3, 5.1.6, 5.1.10), suppresses the
  address for all mail (reason ``hard-bounce``);
- a **soft** bounce (a delay, a 4.x.x status) is recorded: the queued recipient's (or row's)
  response says so, and the event is returned (the relay logs it, ``twistmail bounces``
  prints it);
- a **complaint** (an RFC 5965 feedback report of type abuse, fraud or other) suppresses the
  address for all mail (reason ``complaint``);
- a message that is no report changes nothing (:attr:`Processed.report` is None).

Which address: with a signed VERP return path the report arrived at, the path decides — the
queued recipient or campaign row it names (looked up in the store), or else the reported
address whose keyed hash matches the path's tag. A report at a return path can never have any
other address suppressed, so a forged DSN sent to someone's own return path suppresses at most
them. Without VERP (a Maildir of bounces to a plain address) the report's addresses are taken
as written.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from twisted.internet import defer, threads
from twisted.internet.interfaces import IReactorFromThreads, IReactorThreads

from ..interfaces import ISuppressionList
from ..suppression.records import COMPLAINT, HARD_BOUNCE, Suppression, SuppressionError
from .parse import RecipientReport, Report, parse_report
from .verp import VerpRef, VerpSigner

__all__ = ["BounceEvent", "BounceIntake", "BounceJournal", "BounceQueue", "Processed"]

_BASIC_CODE = re.compile(r"(?<!\d)([245]\d\d)(?![\d.])")
_MAX_RESPONSE = 1000


class BounceQueue(Protocol):
    """The queue operation the intake needs (:meth:`twistmail.queue.sqlite.SqliteQueue.bounce`)."""

    def bounce(
        self,
        message: int,
        position: int,
        *,
        failed: bool,
        code: int | None,
        response: str,
        enhanced: str | None = None,
    ) -> defer.Deferred[str | None]: ...


class BounceJournal(Protocol):
    """What the intake needs of a campaign's journal
    (:func:`twistmail.merge.journal.bounce_rows`)."""

    def bounce(
        self, campaign: str, row: int, *, failed: bool, code: int | None, response: str
    ) -> defer.Deferred[str | None]: ...


EventKind = Literal["hard", "soft", "complaint", "other", "unmatched"]


@dataclass(frozen=True, slots=True)
class BounceEvent:
    """What the intake did about one reported recipient."""

    kind: EventKind
    """``hard``, ``soft``, ``complaint``, ``other`` (delivered/relayed/expanded or a feedback
    report that is no complaint: nothing done) or ``unmatched`` (at a VERP return path, but
    the recipient it names could not be found: nothing done)."""
    address: str | None
    status: str
    detail: str
    suppressed: bool = False
    failed: bool = False
    """Whether the queued recipient the return path names is failed (by this bounce or an
    earlier copy of it)."""
    ref: VerpRef | None = None


@dataclass(frozen=True, slots=True)
class Processed:
    """The outcome of one message given to the intake."""

    report: Report | None
    events: tuple[BounceEvent, ...] = ()

    @property
    def is_report(self) -> bool:
        return self.report is not None


class BounceIntake:
    """Applies reports to a suppression list and (optionally) a queue or journal; see the
    module. With a ``reactor``, messages are parsed in its thread pool (a report may be as
    large as the relay's message size limit: its parsing never holds up the reactor)."""

    def __init__(
        self,
        suppressions: ISuppressionList | None,
        *,
        queue: BounceQueue | None = None,
        journal: BounceJournal | None = None,
        verp: VerpSigner | None = None,
        reactor: object = None,
    ) -> None:
        self.reactor = reactor
        self.suppressions = suppressions
        self.queue = queue
        self.journal = journal
        self.verp = verp

    def ref_of(self, addresses: Sequence[str]) -> VerpRef | None:
        """The first correctly signed VERP return path among ``addresses``, as a reference."""
        if self.verp is None:
            return None
        for address in addresses:
            ref = self.verp.verify(address)
            if ref is not None:
                return ref
        return None

    def process(self, data: bytes, to: Sequence[str] = ()) -> defer.Deferred[Processed]:
        """Apply the report in ``data`` (a whole message, not dot-stuffed); ``to`` are the
        envelope recipients it was delivered to (over SMTP), else its Delivered-To,
        X-Original-To and To headers are looked at. Fails only when a store does."""
        return defer.ensureDeferred(self._process(data, to))

    async def _process(self, data: bytes, to: Sequence[str]) -> Processed:
        pool = IReactorThreads(self.reactor, None)
        if pool is None:
            report = parse_report(data)
        else:
            report = await threads.deferToThreadPool(
                IReactorFromThreads(self.reactor), pool.getThreadPool(), parse_report, data
            )
        if report is None:
            return Processed(None)
        ref = self.ref_of([*to, *report.addressed_to])
        entries = list(report.recipients)
        if report.complaint and not entries:
            # The feedback loop redacted the recipient: only a return path can name it.
            entries = [_complaint_entry(report)]
        if ref is not None and self.verp is not None:
            verp = self.verp
            about = [e for e in entries if any(verp.names(ref, a) for a in _addresses(e))]
            # A report at a return path is about its recipient even if the address it shows
            # is another (a forward); the entries naming it are the ones to use if any do.
            entries = about or entries
        events = [await self._apply(report, entry, ref) for entry in entries]
        return Processed(report, tuple(events))

    async def _apply(
        self, report: Report, entry: RecipientReport, ref: VerpRef | None
    ) -> BounceEvent:
        complaint = entry.action == "complained"
        kind: EventKind = entry.kind
        if complaint:
            kind = "complaint" if report.complaint else "other"
        detail = _detail(report, entry)
        if kind == "other":
            return BounceEvent(kind, entry.address, entry.status, detail, ref=ref)
        failed = kind == "hard"
        address: str | None
        marked = False
        prefix = {"hard": "bounced", "soft": "delayed", "complaint": "complaint"}[kind]
        response = f"{prefix}: {detail}"[:_MAX_RESPONSE]
        code = _code(entry) if failed else None
        if ref is not None and ref.kind == "queue" and self.queue is not None:
            address = await self.queue.bounce(
                ref.message,
                ref.number,
                failed=failed,
                code=code,
                response=response,
                enhanced=entry.status if failed else None,
            )
            marked = failed and address is not None
        elif ref is not None and ref.kind == "campaign" and self.journal is not None:
            address = await self.journal.bounce(
                ref.campaign, ref.number, failed=failed, code=code, response=response
            )
            marked = failed and address is not None
        elif ref is not None and self.verp is not None:
            verp = self.verp
            address = next((a for a in _addresses(entry) if verp.names(ref, a)), None)
        else:
            address = entry.address
        if address is None:
            return BounceEvent("unmatched", entry.address, entry.status, detail, ref=ref)
        suppressed = False
        if entry.suppress and self.suppressions is not None:
            try:
                await self.suppressions.add(
                    [Suppression(address, COMPLAINT if complaint else HARD_BOUNCE, detail=detail)]
                )
                suppressed = True
            except SuppressionError:
                suppressed = False  # not an address the list can hold: nothing to suppress
        return BounceEvent(kind, address, entry.status, detail, suppressed, marked, ref)


def _addresses(entry: RecipientReport) -> list[str]:
    return [a for a in (entry.original_recipient, entry.final_recipient) if a]


def _complaint_entry(report: Report) -> RecipientReport:
    return RecipientReport(
        final_recipient=None,
        original_recipient=None,
        action="complained",
        status="",
        diagnostic_code=f"feedback; {report.feedback_type}",
        remote_mta=None,
        kind="hard",
    )


def _detail(report: Report, entry: RecipientReport) -> str:
    if entry.action == "complained":
        return f"complaint ({report.feedback_type or 'unknown'})"
    diagnostic = entry.diagnostic_code or ""
    _, semicolon, text = diagnostic.partition(";")
    reply = (text if semicolon else diagnostic).strip()
    return " ".join(p for p in (entry.status, reply) if p)[:_MAX_RESPONSE] or entry.action


def _code(entry: RecipientReport) -> int:
    match = _BASIC_CODE.search(entry.diagnostic_code or "")
    if match is not None and match.group(1)[0] == "5":
        return int(match.group(1))
    return 550
