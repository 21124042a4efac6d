"""The campaign loop of ``twistmail send``: CSV rows in, journaled outcomes out.

Each CSV row becomes one message. The journal keeps each row under its recipient
(:mod:`.identity`), and rows whose recipient is already settled there (sent, and failed unless
``retry_failed``) are skipped (:mod:`.resume`), so re-running the same command resumes, even
with a CSV fixed, extended or sorted differently since. A kill at any moment can only duplicate
at most ``concurrency`` messages.

The campaign is a door of the one delivery loop (:mod:`twistmail.engine`), which keeps that
bound: a message's data goes out only while fewer than ``concurrency`` delivered messages wait
for their outcome's commit to the journal. Retries are planned by
:func:`twistmail.retry.plan`: a 4xx reply, a drop or a timeout parks the row as ``deferred``
(journaled with its next attempt time) and it comes back after an exponential backoff with
jitter, for the recipients still deferred only. A refused login or TLS check stops the run
(exit 2) without spending an attempt on any row; a server that cannot be reached keeps the rows
pending and stops the run (exit 3) once ``--server-patience`` seconds of backoff are spent.
"""

from __future__ import annotations

import hashlib
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet import defer, threads
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from twistmail._twisted import Reactor, install_signal_handlers
from twistmail.engine import DeliveryLoop, Job, Parked
from twistmail.errors import DeliveryError, PermanentError, TwistmailError
from twistmail.mailer import Mailer
from twistmail.options import DeliveryOptions
from twistmail.retry import Plan, RetryPolicy
from twistmail.suppression.opening import open_suppression_file
from twistmail.suppression.policy import BounceGuard
from twistmail.unsubscribe.headers import Unsubscribe

from .csvsource import CsvSource, count_lines
from .identity import RowIdentity
from .journal import Journal, RowState
from .prepare import Prepared, Problem, load_inputs, prepare_row
from .progress import Progress
from .report import write_report
from .resume import RowFeed, Sorted, Sorter
from .suppressing import Item, RowScreen, Suppressed, batches, message_size
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
    allow_duplicates: bool = False
    grace: float = 30.0
    queue_url: str | None = None
    """Store the campaign in this queue (``sqlite:PATH``, ``postgresql://...``), not a journal."""
    enqueue_only: bool = False
    """With ``queue_url``: queue the campaign and exit, leaving delivery to the workers."""
    campaign: str | None = None
    """With ``queue_url``: the campaign's name (default: the CSV file's name)."""
    progress: bool | None = None  # None: a live display when stdout is a terminal
    out: Any = field(default_factory=lambda: sys.stdout)
    suppression_path: str | None = None
    """The suppression list's SQLite file (None: ``default_suppression_path()``)."""
    unsubscribe: Unsubscribe | None = None
    """The ``List-Unsubscribe`` headers each message gets (``--unsubscribe-url/-mailto``)."""
    verp: Any = None
    """A :class:`~twistmail.bounces.verp.VerpSigner` (``--verp-domain``): each row's message
    goes out from its own signed return path."""


def default_journal_path(csv_path: str) -> str:
    """``recipients.csv`` -> ``recipients.journal.db``, beside the CSV."""
    path = Path(csv_path)
    return str(path.with_name(path.stem + ".journal.db"))


def default_report_path(csv_path: str) -> str:
    """``recipients.csv`` -> ``recipients.report.csv``, beside the CSV."""
    path = Path(csv_path)
    return str(path.with_name(path.stem + ".report.csv"))


class _Job(Job):
    __slots__ = ("prepared",)

    def __init__(self, prepared: Prepared) -> None:
        super().__init__(prepared.envelope)
        self.prepared = prepared


@dataclass
class Counts:
    """What this run did."""

    sent: int = 0
    failed: int = 0
    deferred: int = 0
    invalid: int = 0
    duplicate: int = 0
    skipped: int = 0
    changed: int = 0
    """Rows skipped as settled whose cells changed since (reported, not sent again)."""
    suppressed: int = 0
    """Rows not sent: every recipient is on the suppression list."""
    started: int = 0
    waiting: str | None = None
    """Why the run is waiting for the server, while it is (for the progress line)."""


class Campaign:
    """One run of a campaign; :meth:`run` fires with the exit status.

    The campaign is a door of the delivery loop (:class:`~twistmail.engine.DeliveryLoop`):
    rendered rows in, each outcome journaled before the message's data of one more row may go
    out (the duplicate bound), deferred rows parked in memory until due.
    """

    def __init__(
        self, options: SendOptions, reactor: Reactor, clock: IReactorTime | None = None
    ) -> None:
        """``clock`` (the reactor by default) times retries, server back-off and the grace
        period after an interrupt; tests pass a :class:`twisted.internet.task.Clock`."""
        self.options = options
        self.reactor = reactor
        self.clock = IReactorTime(reactor) if clock is None else clock
        self.counts = Counts()
        self.retry = RetryPolicy(
            max_attempts=options.max_attempts, initial_delay=options.retry_delay
        )
        self.stopping = False
        self.interrupted = False
        self._parked = Parked(self.clock, max(1000, 50 * options.concurrency))
        self._rows: Iterator[Item | None] | None = None
        self._feed: RowFeed | None = None
        self._exhausted = False
        self._limit_reached = False
        self._journal: Journal | None = None
        self._mailer: Mailer | None = None
        self._abort_timer: Any = None
        self._loop: DeliveryLoop | None = None
        self._unreadable: BaseException | None = None  # why the rows could not be read on
        self._screen: RowScreen | None = None
        self._screening = False  # a chunk of rows is being checked against the list
        self._checked: list[Item] | None = None  # its rows, once checked
        self._guard: BounceGuard | None = None
        self._unrecorded: set[defer.Deferred[None]] = set()  # suppressed rows being journaled

    async def run(self) -> int:
        """Send the campaign; the exit status (0, 1, 2 or 3 as documented by the CLI)."""
        opts = self.options
        try:
            source, template = load_inputs(opts.csv_path, opts.template_path)
        except (TwistmailError, OSError) as e:
            self._say(f"error: {e}")
            return EXIT_USAGE
        journal_path = opts.journal_path or default_journal_path(opts.csv_path)
        template_fp, lines = await threads.deferToThread(
            _template_fingerprint_and_lines, opts.csv_path, opts.template_path
        )
        try:
            journal = await Journal.open(
                journal_path,
                template_fingerprint=template_fp,
                new_campaign=opts.new_campaign,
                reactor=self.reactor,
            )
        except TwistmailError as e:
            self._say(f"error: {e}")
            return EXIT_USAGE
        self._journal = journal
        try:
            store = await open_suppression_file(opts.suppression_path, reactor=self.reactor)
        except (TwistmailError, OSError) as e:
            await journal.close()
            self._say(f"error: --suppression: {e}")
            return EXIT_USAGE
        self._screen = RowScreen(store, opts.unsubscribe)
        self._guard = BounceGuard(store, self.clock)
        try:
            # Rows for the progress display: lines after the header (an overestimate when
            # cells hold line breaks).
            return await self._run_with(journal, source, template, max(0, lines - 1))
        finally:
            await journal.close()
            await store.close()

    async def _run_with(
        self, journal: Journal, source: CsvSource, template: MessageTemplate, total: int
    ) -> int:
        opts = self.options
        try:
            self._mailer = opts.mailer(self.reactor)
        except (ValueError, OSError) as e:
            self._say(f"error: {e}")
            return EXIT_USAGE
        # Rows are sorted against the journal on its thread, a chunk ahead of the renderer;
        # every row not settled is recorded pending, so status and the report name it.
        sorter = Sorter(
            iter(source),
            RowIdentity.of(template, source.columns),
            retry_failed=opts.retry_failed,
            allow_duplicates=opts.allow_duplicates,
        )
        feed = self._feed = RowFeed(
            journal, sorter, ready=self._rows_ready, sorted=self._sorted, failed=self._feed_failed
        )
        self._rows = self._prepared_rows(template, journal, feed)
        progress = Progress(opts.out, total=total, live=opts.progress, clock=self.reactor)
        progress.start(self.counts)
        restore = install_signal_handlers(self.reactor, self.interrupt)
        sender: Any = self._mailer
        if opts.verp is not None:
            from twistmail.bounces.sending import VerpSender

            sender = VerpSender(self._mailer, opts.verp, campaign=journal.campaign_id)
        loop = self._loop = DeliveryLoop(
            sender,
            self,
            self.retry,
            clock=self.clock,
            # A message's data goes out only while fewer than `concurrency` delivered
            # messages wait for their journal commit: a kill duplicates at most that many.
            hold_bodies=opts.concurrency,
            limit=self._mailer.capacity,
            patience=opts.server_patience,
            on_server=self._server_trouble,
        )
        try:
            await loop.start()
            # The rows not reached (--limit, an interrupt) are recorded pending all the same.
            await feed.rest()
            if self._guard is not None:
                await self._guard.flush()
            await defer.DeferredList(list(self._unrecorded))
        finally:
            restore()
            if self._abort_timer is not None and self._abort_timer.active():
                self._abort_timer.cancel()
            progress.stop()
            await self._mailer.close()
        stopped_by = loop.stopped_by
        if stopped_by is not None:
            self._say(f"error: {stopped_by}")
        code = await self._finish(journal)
        if self._unreadable is not None:
            self._say(f"error: {self._unreadable}")
            return EXIT_USAGE
        if isinstance(stopped_by, PermanentError):
            return EXIT_USAGE  # refused login or TLS: fix the configuration, run again
        if stopped_by is not None:
            return EXIT_INTERRUPTED  # the server could not be reached: rows stay pending
        return code

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
        self, template: MessageTemplate, journal: Journal, feed: RowFeed
    ) -> Iterator[Item | None]:
        """Each row to send, rendered and screened; None while the next rows are being
        sorted or checked against the suppression list."""
        envelope_from = self.options.envelope_from
        message_id = journal.message_id
        take = feed.take
        while True:
            chunk = take()
            if chunk is None:
                if not feed.waiting:
                    return
                yield None
                continue
            rendered = (
                prepare_row(template, row, message_id, envelope_from, key, fingerprint)
                for row, key, fingerprint in chunk
            )
            if self._screen is None:
                yield from rendered
                continue
            # Rendered a batch at a time: rows with a large attachment are not all held.
            for batch in batches(rendered, message_size):
                self._screening, self._checked = True, None
                self._screen.screen(batch).addCallbacks(self._screened, self._feed_failed)
                while self._screening:
                    yield None  # the answer pumps the loop
                checked, self._checked = self._checked, None
                if checked is None:
                    return  # the list could not be read: the run stops, exit 2
                yield from checked

    def _screened(self, items: list[Item]) -> None:
        self._checked = items
        self._screening = False
        self._rows_ready()

    def _rows_ready(self) -> None:
        if self._loop is not None:
            self._loop.pump()

    def _sorted(self, result: Sorted) -> None:
        counts = self.counts
        counts.skipped += result.settled
        counts.duplicate += result.duplicate
        counts.changed += result.changed
        for note in result.notes:
            self._say(note)

    def _feed_failed(self, failure: Failure) -> None:
        """The CSV could not be read on (or the journal or the suppression list failed): the
        rows read before are sent, and the run exits 2 naming the problem."""
        self._unreadable = failure.value
        if self._screening:
            self._screening = False
            self._rows_ready()

    # ------------------------------------------------------------------ the loop's door

    def next_job(self) -> _Job | None:
        """A job given back or due again, else the next good row (recording invalid ones)."""
        parked = self._parked
        if parked.waiting:
            job = parked.pop_due()
            if job is not None:
                self.counts.deferred = parked.waiting
                assert isinstance(job, _Job)
                return job
            if parked.full:
                # A server refusing everything must not pull the whole CSV into the retry heap.
                return None
        if self._exhausted or self.stopping or self._rows is None:
            return None
        limit = self.options.limit
        for item in self._rows:
            if item is None:
                return None  # the feed pumps the loop once the next rows are sorted
            if isinstance(item, Problem):
                self.counts.invalid += 1
                self._record_problem(item)
                continue
            if isinstance(item, Suppressed):
                self.counts.suppressed += 1
                self._record_suppressed(item)
                continue
            if limit is not None and self.counts.started >= limit:
                self._limit_reached = True
                self._exhausted = True
                return None
            self.counts.started += 1
            return _Job(item)
        self._exhausted = True
        return None

    def wake_in(self) -> float | None:
        """Seconds until a parked retry is due; None when the campaign has nothing left."""
        if self.stopping:
            return None
        due = self._parked.due_in()
        if due is None and not self._exhausted and self._feed is not None and self._feed.waiting:
            return math.inf  # rows are being sorted: the feed pumps the loop when they come
        if due is None and self._screening:
            return math.inf  # rows are being checked: the answer pumps the loop
        return due

    def record(self, job: Job, outcome: Plan) -> defer.Deferred[None]:
        """Journal what an attempt settled; park a deferred row until it is due."""
        assert isinstance(job, _Job)
        guard = self._guard
        if guard is not None:
            if outcome.state == "sent" and outcome.result is not None:
                guard.accepted(len(job.envelope.recipients))
            else:
                guard.note(outcome.outcomes)
        if outcome.state == "sent":
            self.counts.sent += 1
            result = outcome.result
            if result is not None:  # the server's final reply, read without Plan's lookups
                return self._record(job, "sent", result.code, result.text)
            return self._record(job, "sent", outcome.code, outcome.response)
        if outcome.state == "deferred":
            due = self._parked.park(job, outcome.delay)
            self.counts.deferred = len(self._parked)
            return self._record(
                job, "deferred", outcome.code, outcome.response, _wall(self.clock, due)
            )
        self.counts.failed += 1
        prepared = job.prepared
        self._say(f"failed: row {prepared.row} {prepared.email}: {outcome.response}")
        return self._record(job, "failed", outcome.code, outcome.response)

    def put_back(self, job: Job) -> None:
        """A row whose message never reached the server: it goes again first, uncounted."""
        self._parked.again(job)

    def _record_problem(self, problem: Problem) -> None:
        self._say(f"invalid: {problem.reason}")
        self._record_unsent(problem, "invalid", problem.reason)

    def _record_suppressed(self, item: Suppressed) -> None:
        self._record_unsent(item, "suppressed", item.reason)

    def _record_unsent(self, item: Problem | Suppressed, state: RowState, reason: str) -> None:
        """Journal a row that is not attempted (invalid, or suppressed)."""
        assert self._journal is not None
        d = self._journal.record(
            item.key,
            row=item.row,
            email=item.email,
            state=state,
            response=reason,
            fingerprint=item.fingerprint,
        ).addErrback(self._journal_failed)
        # Waited for before the counts are read: the exit status and summary include them.
        self._unrecorded.add(d)
        d.addBoth(lambda _: self._unrecorded.discard(d))

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
            prepared.key,
            row=prepared.row,
            email=prepared.email,
            state=state,
            code=code,
            response=response,
            attempts=job.attempts,
            message_id=prepared.message_id,
            next_attempt_at=next_attempt_at,
            fingerprint=prepared.fingerprint,
        )

    # ------------------------------------------------------------------ signals

    def interrupt(self) -> None:
        """Stop starting messages; abort what is in flight after the grace period."""
        if self.stopping:
            self._say("aborting: cutting off the messages in flight")
            self._abort_now()
            return
        self.stopping = True
        self.interrupted = True
        self._say("stopping: letting messages in flight finish (signal again to abort)")
        self._abort_timer = self.clock.callLater(self.options.grace, self._abort_now)
        if self._loop is not None:
            self._loop.stop()

    def _server_trouble(self, error: DeliveryError | None, retry_in: float) -> None:
        """The loop paused for a server that cannot be reached (or it works again)."""
        if error is None:
            self.counts.waiting = None
            return
        self.counts.waiting = str(error)
        self._say(f"waiting for the server: {error}; trying again in {retry_in:g}s")

    def _abort_now(self) -> None:
        if self._loop is not None:
            self._loop.abort()

    # ------------------------------------------------------------------ output

    def _say(self, text: str) -> None:
        print(text, file=self.options.out, flush=True)

    def _journal_failed(self, failure: Failure) -> None:
        self._say(f"error: journal write failed: {failure.getErrorMessage()}")
        self.interrupt()


def _template_fingerprint_and_lines(csv_path: str, template_path: str) -> tuple[str, int]:
    return hashlib.sha256(Path(template_path).read_bytes()).hexdigest(), count_lines(csv_path)


def _wall(clock: IReactorTime, due: float) -> float:
    import time

    return time.time() + (due - clock.seconds())


def run(options: SendOptions, reactor: Reactor) -> defer.Deferred[int]:
    """Run a campaign; the Deferred fires with the exit status."""
    return defer.ensureDeferred(Campaign(options, reactor).run())
