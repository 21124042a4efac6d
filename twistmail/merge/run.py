"""The campaign loop of ``twistmail send``: CSV rows in, journaled outcomes out.

Each CSV row becomes one message. Rows already settled in the journal (sent, invalid, and
failed unless ``retry_failed``) are skipped, so re-running the same command resumes. The
delivery loop (:mod:`.delivery`) lets a message's data go out only while fewer than
``concurrency`` messages wait for their outcome to be committed to the journal, so a kill at
any moment can only duplicate at most ``concurrency`` messages.

Retries are the campaign's own: the Mailer makes one attempt per call, a 4xx reply, a drop or
a timeout parks the row as ``deferred`` (journaled with its next attempt time) and it comes
back after an exponential backoff with jitter, for the recipients still deferred only.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from twisted.internet import defer, threads
from twisted.python.failure import Failure

from twistmail._twisted import install_signal_handlers
from twistmail.errors import DeliveryError, TwistmailError
from twistmail.mailer import Mailer
from twistmail.message import Envelope
from twistmail.options import DeliveryOptions
from twistmail.results import SendResult
from twistmail.retry import RetryPolicy

from .csvsource import CsvSource, scan
from .delivery import JournaledDelivery
from .journal import Journal, RowState, is_set
from .prepare import Prepared, Problem, guess_email, load_inputs, prepare_row
from .progress import Progress
from .report import write_report
from .template import MessageTemplate

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "Campaign", "SendOptions"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 3


@dataclass
class SendOptions(DeliveryOptions):
    """Everything ``twistmail send`` was asked to do."""

    csv_path: str
    template_path: str
    envelope_from: str | None = None
    journal_path: str | None = None
    report_path: str | None = None
    limit: int | None = None
    retry_failed: bool = False
    new_campaign: bool = False
    grace: float = 30.0
    progress: bool | None = None  # None: a live display when stdout is a terminal
    out: Any = field(default_factory=lambda: sys.stdout)


def default_journal_path(csv_path: str) -> str:
    """``recipients.csv`` -> ``recipients.journal.db``, beside the CSV."""
    path = Path(csv_path)
    return str(path.with_name(path.stem + ".journal.db"))


def default_report_path(csv_path: str) -> str:
    """``recipients.csv`` -> ``recipients.report.csv``, beside the CSV."""
    path = Path(csv_path)
    return str(path.with_name(path.stem + ".report.csv"))


@dataclass
class _Job:
    prepared: Prepared
    attempts: int = 0
    due: float = 0.0

    @property
    def envelope(self) -> Envelope:
        return self.prepared.envelope


@dataclass
class Counts:
    """What this run did."""

    sent: int = 0
    failed: int = 0
    deferred: int = 0
    invalid: int = 0
    skipped: int = 0
    started: int = 0


class Campaign:
    """One run of a campaign; :meth:`run` fires with the exit status."""

    def __init__(self, options: SendOptions, reactor: Any) -> None:
        self.options = options
        self.reactor = reactor
        self.counts = Counts()
        self.retry = RetryPolicy(
            max_attempts=options.max_attempts, initial_delay=options.retry_delay
        )
        self.stopping = False
        self.interrupted = False
        self._parked: list[tuple[float, int, _Job]] = []
        self._max_parked = max(1000, 50 * options.concurrency)
        self._seq = itertools.count()
        self._rows: Iterator[Prepared | Problem] | None = None
        self._exhausted = False
        self._limit_reached = False
        self._journal: Journal | None = None
        self._mailer: Mailer | None = None
        self._abort_timer: Any = None
        self._delivery: JournaledDelivery | None = None

    async def run(self) -> int:
        """Send the campaign; the exit status (0, 1, 2 or 3 as documented by the CLI)."""
        opts = self.options
        try:
            source, template = load_inputs(opts.csv_path, opts.template_path)
        except (TwistmailError, OSError) as e:
            self._say(f"error: {e}")
            return EXIT_USAGE
        journal_path = opts.journal_path or default_journal_path(opts.csv_path)
        csv_fp, template_fp, lines = await threads.deferToThread(
            _fingerprints, opts.csv_path, opts.template_path
        )
        try:
            journal = await Journal.open(
                journal_path,
                csv_fingerprint=csv_fp,
                template_fingerprint=template_fp,
                new_campaign=opts.new_campaign,
                reactor=self.reactor,
            )
        except TwistmailError as e:
            self._say(f"error: {e}")
            return EXIT_USAGE
        self._journal = journal
        try:
            # Rows for the progress display: lines after the header (an overestimate when
            # cells hold line breaks).
            return await self._run_with(journal, source, template, max(0, lines - 1))
        finally:
            await journal.close()

    async def _run_with(
        self, journal: Journal, source: CsvSource, template: MessageTemplate, total: int
    ) -> int:
        opts = self.options
        settled = await journal.settled_rows(opts.retry_failed)
        try:
            # The campaign keeps attempts and backoff itself (in the journal).
            self._mailer = opts.single_attempt_mailer(self.reactor)
        except (ValueError, OSError) as e:
            self._say(f"error: {e}")
            return EXIT_USAGE
        self._rows = self._prepared_rows(source, template, journal, settled)
        # Every row is in the journal from the start (as pending), so status and the report
        # name the recipients not reached yet; runs on the journal's thread, in chunks.
        registering = journal.register_pending((row.number, guess_email(row)) for row in source)
        progress = Progress(opts.out, total=total, live=opts.progress, clock=self.reactor)
        progress.start(self.counts)
        restore = install_signal_handlers(self.reactor, self.interrupt)
        try:
            self._delivery = JournaledDelivery(
                self._mailer,
                self.reactor,
                opts.concurrency,
                next_job=self._next_job,
                more_in=self._more_in,
                settle=self._settle,
                sent=self._settle_sent,
            )
            await self._delivery.start()
            await registering
        finally:
            restore()
            if self._abort_timer is not None and self._abort_timer.active():
                self._abort_timer.cancel()
            progress.stop()
            await self._mailer.close()
        return await self._finish(journal)

    async def _finish(self, journal: Journal) -> int:
        opts = self.options
        # Rows still parked were journaled as deferred when they were parked.
        counts = await journal.counts()
        report_path = opts.report_path or default_report_path(opts.csv_path)
        await journal.close()
        lines = await threads.deferToThread(write_report, journal.path, report_path)
        Progress.summary(opts.out, self.counts, counts, report_path, lines)
        if self.interrupted:
            self._say("interrupted: run the same command again to resume")
            return EXIT_INTERRUPTED
        if counts.get("failed", 0) or counts.get("invalid", 0):
            return EXIT_FAILED
        if counts.get("deferred", 0) or counts.get("pending", 0) or self._limit_reached:
            return EXIT_INTERRUPTED
        return EXIT_OK

    # ------------------------------------------------------------------ rows

    def _prepared_rows(
        self,
        source: CsvSource,
        template: MessageTemplate,
        journal: Journal,
        settled: bytearray,
    ) -> Iterator[Prepared | Problem]:
        envelope_from = self.options.envelope_from
        for row in source:
            if is_set(settled, row.number):
                self.counts.skipped += 1
                continue
            yield prepare_row(template, row, journal.message_id, envelope_from)

    def _next_job(self) -> _Job | None:
        """A parked job that is due, else the next good row (recording invalid ones)."""
        now = self.reactor.seconds()
        if self._parked and self._parked[0][0] <= now:
            job = heapq.heappop(self._parked)[2]
            self.counts.deferred = len(self._parked)
            return job
        if self._exhausted or self.stopping or self._rows is None:
            return None
        if len(self._parked) >= self._max_parked:
            # A server refusing everything must not pull the whole CSV into the retry heap.
            return None
        limit = self.options.limit
        for item in self._rows:
            if isinstance(item, Problem):
                self.counts.invalid += 1
                self._record_problem(item)
                continue
            if limit is not None and self.counts.started >= limit:
                self._limit_reached = True
                self._exhausted = True
                return None
            self.counts.started += 1
            return _Job(item)
        self._exhausted = True
        return None

    def _record_problem(self, problem: Problem) -> None:
        assert self._journal is not None
        self._say(f"invalid: {problem.reason}")
        self._journal.record(
            problem.row, email=problem.email, state="invalid", response=problem.reason
        ).addErrback(self._journal_failed)

    def _more_in(self) -> float | None:
        """Seconds until a parked retry is due; None when the campaign has nothing left."""
        if self.stopping or not self._parked:
            return None
        return max(0.0, self._parked[0][0] - float(self.reactor.seconds()))

    # ------------------------------------------------------------------ outcomes

    def _settle_sent(self, job: _Job, code: int | None, response: str) -> defer.Deferred[None]:
        """Every recipient of ``job`` was accepted and the message taken."""
        self.counts.sent += 1
        return self._record(job, "sent", code, response)

    def _settle(
        self, job: _Job, result: SendResult | None, error: DeliveryError | None
    ) -> defer.Deferred[None]:
        assert self._journal is not None
        prepared = job.prepared
        error = error or (result.error if result is not None else None)
        transient_error = error is not None and error.transient
        retry, refused = [], []
        if result is not None:
            for outcome in result.recipients:
                if outcome.status == "sent":
                    continue
                code = outcome.code
                if (code is not None and 400 <= code < 500) or (code is None and transient_error):
                    retry.append(outcome)
                else:
                    refused.append(outcome)
        if result is not None and not retry and not refused:
            return self._settle_sent(job, result.code, result.response)
        whole_retry = result is None and transient_error  # nothing known per recipient
        if (retry or whole_retry) and not refused and self.retry.can_retry(job.attempts):
            if retry:
                keep = {o.recipient for o in retry}
                recipients = tuple(r for r in prepared.envelope.recipients if str(r) in keep)
                job.prepared = replace(
                    prepared, envelope=replace(prepared.envelope, recipients=recipients)
                )
            first = retry[0] if retry else None
            due = self.reactor.seconds() + self.retry.delay(job.attempts)
            heapq.heappush(self._parked, (due, next(self._seq), job))
            self.counts.deferred = len(self._parked)
            code = first.code if first else (error.code if error else None)
            text = first.response if first else (str(error) if error else "")
            return self._record(job, "deferred", code, text, _wall(self.reactor, due))
        self.counts.failed += 1
        bad = refused[0] if refused else (retry[0] if retry else None)
        if bad is not None and bad.response:
            code, text = bad.code, f"{bad.recipient}: {bad.response}"
        else:  # a drop, a timeout or a refused connection: the error names the host
            code, text = (error.code if error else None), (str(error) if error else "")
        self._say(f"failed: row {prepared.row} {prepared.email}: {text}")
        return self._record(job, "failed", code, text)

    def _record(
        self,
        job: _Job,
        state: RowState,
        code: int | None,
        response: str,
        next_attempt_at: float | None = None,
    ) -> defer.Deferred[None]:
        assert self._journal is not None
        prepared = job.prepared
        return self._journal.record(
            prepared.row,
            email=prepared.email,
            state=state,
            code=code,
            response=response,
            attempts=job.attempts,
            message_id=prepared.message_id,
            next_attempt_at=next_attempt_at,
        )

    # ------------------------------------------------------------------ signals

    def interrupt(self) -> None:
        """Stop starting messages; abort what is in flight after the grace period."""
        if self.stopping:
            self._abort_now()
            return
        self.stopping = True
        self.interrupted = True
        self._say("stopping: letting messages in flight finish (signal again to abort)")
        self._abort_timer = self.reactor.callLater(self.options.grace, self._abort_now)
        if self._delivery is not None:
            self._delivery.pump()  # it may be waiting for a parked retry: it ends now instead

    def _abort_now(self) -> None:
        if self._mailer is not None:
            self._mailer.pool.abort()

    # ------------------------------------------------------------------ output

    def _say(self, text: str) -> None:
        print(text, file=self.options.out, flush=True)

    def _journal_failed(self, failure: Failure) -> None:
        self._say(f"error: journal write failed: {failure.getErrorMessage()}")
        self.interrupt()


def _fingerprints(csv_path: str, template_path: str) -> tuple[str, str, int]:
    csv_fp, lines = scan(csv_path)
    return csv_fp, hashlib.sha256(Path(template_path).read_bytes()).hexdigest(), lines


def _wall(reactor: Any, due: float) -> float:
    import time

    return time.time() + (due - float(reactor.seconds()))


def run(options: SendOptions, reactor: Any) -> defer.Deferred[int]:
    """Run a campaign; the Deferred fires with the exit status."""
    return defer.ensureDeferred(Campaign(options, reactor).run())
