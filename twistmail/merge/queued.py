"""``twistmail send CSV TEMPLATE --queue URL``: a campaign stored in a shared queue.

The campaign's template (with the files it attaches) and its rows are stored once in the queue
(:mod:`twistmail.queue.campaigns`); any worker on any machine renders a row when it claims it.
What the CLI promises with its journal holds: every row is validated (rendered) before it is
queued, invalid ones are recorded with the reason; rows are kept under their recipient
(:mod:`.identity`) and sorted against what the queue holds (:mod:`.resume`), so running the
same command again queues only the rows not queued, sent or failed before (failed ones again
with ``--retry-failed``), even from a CSV fixed, extended or sorted differently since; the
Message-IDs are the campaign's, stable across runs and machines.

Without ``--enqueue-only`` the command then delivers, as one more worker of the queue, until
none of its campaign's rows is waiting, and writes the report.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet import defer, task, threads
from twisted.internet.interfaces import IReactorTime

from twistmail._twisted import Reactor, install_signal_handlers
from twistmail.errors import TwistmailError
from twistmail.interfaces import IQueue
from twistmail.options import DeliveryOptions
from twistmail.queue.campaigns import (
    FIRST,
    HEADERS_CELL,
    HELD,
    Campaign,
    CampaignRow,
    CampaignSpec,
    CampaignStatus,
)
from twistmail.queue.records import QueueError
from twistmail.queue.url import open_queue
from twistmail.unsubscribe.headers import Unsubscribe

from .attachments import UploadingAttachments
from .csvsource import CsvSource, open_csv
from .identity import RowIdentity, campaign_message_id
from .prepare import Problem, prepare_row
from .report import ReportFile
from .resume import DUPLICATE_RESPONSE, Sorter, ToSend
from .run import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, SendOptions
from .suppressing import unsubscribe_lines
from .template import MessageTemplate

__all__ = ["Enqueued", "campaign_name", "enqueue_campaign", "report", "send", "status"]

_CHUNK = 1024
_PAGE = 5000


def campaign_name(options: SendOptions) -> str:
    """The campaign's name: ``--campaign``, else the CSV file's name without its suffix."""
    return options.campaign or Path(options.csv_path).stem


def send(options: SendOptions, reactor: Reactor) -> defer.Deferred[int]:
    """Queue the campaign (and deliver it unless ``enqueue_only``); fires with the exit
    status."""
    return defer.ensureDeferred(_send(options, reactor))


def _say(options: SendOptions | Any, text: str) -> None:
    print(text, file=options.out, flush=True)


def _load(options: SendOptions) -> tuple[CsvSource, MessageTemplate, UploadingAttachments]:
    uploads = UploadingAttachments(Path(options.template_path).parent)
    template = MessageTemplate.load(options.template_path, sandboxed=True, attachments=uploads)
    source = open_csv(options.csv_path)
    template.check_columns(source.columns)
    return source, template, uploads


async def _send(opts: SendOptions, reactor: Reactor) -> int:
    assert opts.queue_url is not None
    try:
        source, template, uploads = _load(opts)
    except (TwistmailError, OSError) as e:
        _say(opts, f"error: {e}")
        return EXIT_USAGE
    spec = CampaignSpec(
        template.source,
        os.path.basename(opts.template_path),
        source.columns,
        opts.envelope_from,
        hashlib.sha256(template.source.encode("utf-8", "surrogatepass")).hexdigest(),
    )
    try:
        queue = await open_queue(opts.queue_url, reactor=reactor)
    except QueueError as e:
        _say(opts, f"error: {e}")
        return EXIT_USAGE
    try:
        try:
            campaign = await queue.campaign_open(campaign_name(opts), spec)
        except QueueError as e:
            _say(opts, f"error: {e}")
            return EXIT_USAGE
        await queue.campaign_forget(campaign.id)
        done = await enqueue_campaign(
            queue,
            campaign,
            source,
            template,
            uploads.take,
            envelope_from=opts.envelope_from,
            retry_failed=opts.retry_failed,
            allow_duplicates=opts.allow_duplicates,
            limit=opts.limit,
            say=lambda text: _say(opts, text),
            unsubscribe=opts.unsubscribe,
        )
        _say(
            opts,
            f"campaign {campaign.name}: {done.queued} queued now, {done.held} already queued, "
            f"{done.settled} settled before",
        )
        limited = done.limited
        if done.problem is not None:
            _say(opts, f"error: {done.problem}")
            return EXIT_USAGE
        if limited:
            _say(opts, "--limit reached: run the same command again to queue the rest")
        if opts.enqueue_only:
            (progress,) = await queue.campaign_status(campaign.id, unsent=0)
            _say(opts, f"campaign {campaign.name}: {_counts(progress)}")
            _say(opts, f"workers deliver it: twistmail worker --queue {_shown(opts)} --smtp URL")
            return EXIT_FAILED if progress.counts.get("invalid") else EXIT_OK
        code = await _deliver(queue, campaign, opts, reactor)
        return EXIT_INTERRUPTED if limited and code == EXIT_OK else code
    finally:
        await queue.close()


@dataclass
class Enqueued:
    """What storing a campaign's rows did."""

    queued: int = 0
    """Rows queued now."""
    held: int = 0
    """Rows already queued by an earlier run (left to the workers)."""
    settled: int = 0
    """Rows sent (or failed) before: not queued again."""
    limited: bool = False
    """The limit left rows out."""
    problem: str | None = None
    """Why the CSV could not be read on (the rows before it are stored)."""


Render = Callable[..., "defer.Deferred[Any]"]


async def enqueue_campaign(
    queue: IQueue,
    campaign: Campaign,
    source: CsvSource,
    template: MessageTemplate,
    files: Callable[[], dict[str, bytes]],
    *,
    envelope_from: str | None = None,
    retry_failed: bool = False,
    allow_duplicates: bool = False,
    limit: int | None = None,
    say: Callable[[str], None] = lambda text: None,
    render: Render = defer.maybeDeferred,
    unsubscribe: Unsubscribe | None = None,
) -> Enqueued:
    """Sort every row against what the queue holds of ``campaign``, validate (render) those
    to send and store them, a chunk at a time: ``files()`` gives the files the template read
    since the last call (stored with the chunk), ``say`` hears each invalid, duplicate or
    changed row, ``render(function, *args)`` runs a chunk's rendering (e.g. in a thread).
    With ``unsubscribe``, each row is stored with its ``List-Unsubscribe`` headers (their
    tokens made now, with the sender's secret), which its message gets when rendered."""
    sorter = Sorter(
        iter(source),
        RowIdentity.of(template, source.columns),
        retry_failed=retry_failed,
        allow_duplicates=allow_duplicates,
    )

    def message_id(key: int, domain: str) -> str:
        return campaign_message_id(campaign.id, key, domain)

    done = Enqueued()
    started = 0
    while True:
        try:
            keyed, duplicates, out = sorter.identify(_CHUNK)
        except TwistmailError as e:
            done.problem = str(e)
            return done
        known = await queue.campaign_lookup(campaign.id, [item[1] for item in keyed])
        _, moves = sorter.decide(keyed, known, out, held=HELD)
        rows = [
            CampaignRow(ident, number, email, "duplicate", fp, DUPLICATE_RESPONSE)
            for ident, number, email, fp in duplicates
        ]
        rows.extend(
            CampaignRow(ident, number, "", "seen", changed=bool(changed))
            for number, changed, ident in moves
        )
        left = None if limit is None else limit - started
        rendered, count, notes = await render(
            _render_chunk, template, out.send, message_id, envelope_from, left, unsubscribe
        )
        rows.extend(rendered)
        started += count
        if left is not None and count >= left and count < len(out.send):
            done.limited = True
        done.queued += await queue.campaign_add(campaign.id, rows, files())
        done.settled += out.settled
        done.held += out.held
        for note in [*notes, *out.notes]:
            say(note)
        if out.finished:
            return done


def _render_chunk(
    template: MessageTemplate,
    send: list[ToSend],
    message_id: Callable[[int, str], str],
    envelope_from: str | None,
    left: int | None,
    unsubscribe: Unsubscribe | None = None,
) -> tuple[list[CampaignRow], int, list[str]]:
    """The rows of ``send`` rendered (at most ``left`` to queue): their campaign rows, how
    many are to queue, and a note for each invalid one."""
    rows: list[CampaignRow] = []
    notes: list[str] = []
    count = 0
    for row, ident, fingerprint in send:
        if left is not None and count >= left:
            break
        prepared = prepare_row(template, row, message_id, envelope_from, ident, fingerprint)
        if isinstance(prepared, Problem):
            notes.append(f"invalid: {prepared.reason}")
            rows.append(
                CampaignRow(
                    ident, row.number, prepared.email, "invalid", fingerprint, prepared.reason
                )
            )
            continue
        count += 1
        cells = row.values
        if unsubscribe is not None:
            lines = unsubscribe_lines(prepared, unsubscribe).decode("ascii")
            cells = {**cells, HEADERS_CELL: lines}
        rows.append(
            CampaignRow(
                ident,
                row.number,
                prepared.email,
                "queued",
                fingerprint,
                envelope=prepared.envelope,
                cells=cells,
            )
        )
    return rows, count, notes


async def _deliver(queue: IQueue, campaign: Campaign, opts: SendOptions, reactor: Reactor) -> int:
    """Work the queue until no row of ``campaign`` waits; write its report."""
    from twistmail.queue.command import WorkerOptions, new_owner, stopper, watch, worker_for
    from twistmail.queue.sharing import deliverers_for

    # Paced as the queue's other deliverers are: --rate is all of them together.
    deliverers = deliverers_for(opts.queue_url or "")
    deliverers.share(queue)
    throttle = deliverers.throttle(opts.rate, IReactorTime(reactor)) if opts.rate else None
    try:
        mailer = opts.mailer(reactor, throttle)
    except (ValueError, OSError) as e:
        _say(opts, f"error: {e}")
        return EXIT_USAGE
    delivery = {f.name: getattr(opts, f.name) for f in dataclasses.fields(DeliveryOptions)}
    delivery["server_patience"] = float("inf")
    worker_options = WorkerOptions(
        queue_url=opts.queue_url or "", out=opts.out, verp=opts.verp, **delivery
    )

    def failed(claimed: Any, outcome: Any) -> None:
        if outcome.state == "failed":
            _say(opts, f"failed: {claimed.envelope.message_id}: {outcome.response}")

    from twistmail.suppression import SuppressionError, open_suppression_for_queue

    try:
        suppression = await open_suppression_for_queue(
            worker_options.queue_url, queue_ready=True, reactor=reactor
        )
    except SuppressionError as e:
        await mailer.close()
        _say(opts, f"error: {e}")
        return EXIT_USAGE
    worker = worker_for(queue, mailer, worker_options, reactor, failed, suppression, new_owner())
    watching = watch(queue, worker.wake, worker_options.sqlite_check, reactor)
    done: list[CampaignStatus] = []

    def look() -> defer.Deferred[None]:
        asked = reactor.seconds()

        def seen(statuses: list[CampaignStatus]) -> None:
            # A large campaign's count takes a while: look at most a tenth of the time.
            checking.interval = max(0.5, 10 * (reactor.seconds() - asked))
            if statuses and statuses[0].waiting == 0 and not done:
                done.append(statuses[0])
                worker.stop()

        return queue.campaign_status(campaign.id, unsent=0).addCallback(seen)

    checking = task.LoopingCall(look)
    checking.clock = reactor  # type: ignore[assignment]

    interrupt, interrupted = stopper(worker, lambda text: _say(opts, text))
    restore = install_signal_handlers(reactor, interrupt)
    try:
        checking.start(0.5, now=False).addErrback(lambda f: worker.stop())
        await worker.run()
    finally:
        restore()
        if checking.running:
            checking.stop()
        watching()
        await mailer.close()
        await suppression.close()
    (progress,) = await queue.campaign_status(campaign.id, unsent=0)
    path = opts.report_path or str(Path(opts.csv_path).with_name(f"{campaign.name}.report.csv"))
    lines = await _write_report(queue, campaign, path)
    _say(opts, f"campaign {campaign.name}: {_counts(progress)}")
    _say(opts, f"report: {path} ({lines} rows)")
    if interrupted:
        _say(opts, "interrupted: run the same command again to resume (or start workers)")
        return EXIT_INTERRUPTED
    if progress.counts.get("failed") or progress.counts.get("invalid"):
        return EXIT_FAILED
    return EXIT_INTERRUPTED if progress.waiting else EXIT_OK


def _counts(progress: CampaignStatus) -> str:
    order = ["sent", "failed", "deferred", "pending", "invalid", "duplicate"]
    states = order + sorted(set(progress.counts) - set(order))
    return ", ".join(f"{progress.counts.get(state, 0)} {state}" for state in states)


def _shown(opts: SendOptions) -> str:
    from twistmail.queue.url import _shown as shown

    return shown(opts.queue_url or "")


async def _write_report(queue: IQueue, campaign: Campaign, path: str) -> int:
    """Write ``campaign``'s report to ``path`` page by page; how many lines it has."""
    report = await threads.deferToThread(ReportFile, path)
    try:
        after = FIRST
        while True:
            lines, after = await queue.campaign_report(campaign.id, after, _PAGE)
            if not lines:
                break
            await threads.deferToThread(report.write, lines)
        return int(await threads.deferToThread(report.finish))
    except BaseException:
        await threads.deferToThread(report.discard)
        raise


async def _existing(queue_url: str, out: Any, reactor: Reactor) -> IQueue | None:
    """The queue at ``queue_url`` (a SQLite file is not created); None, the error said on
    ``out``, if it cannot be opened."""
    try:
        return await open_queue(queue_url, reactor=reactor, create=False)
    except QueueError as e:
        print(f"error: {e}", file=out)
        return None


def report(
    queue_url: str, name: str, path: str | None, out: Any, reactor: Reactor
) -> defer.Deferred[int]:
    """``twistmail report --queue URL CAMPAIGN``: write the campaign's report CSV."""

    async def run() -> int:
        queue = await _existing(queue_url, out, reactor)
        if queue is None:
            return EXIT_USAGE
        try:
            campaign = await queue.campaign(name)
            if campaign is None:
                print(f"error: no campaign {name!r} in the queue", file=out)
                return EXIT_USAGE
            target = path or f"{campaign.name}.report.csv"
            lines = await _write_report(queue, campaign, target)
            print(f"report: {target} ({lines} rows)", file=out)
            return EXIT_OK
        finally:
            await queue.close()

    return defer.ensureDeferred(run())


def status(
    queue_url: str, name: str | None, limit: int, out: Any, reactor: Reactor
) -> defer.Deferred[int]:
    """``twistmail status --queue URL [CAMPAIGN]``: every campaign's progress, or one's with
    its first rows not sent. Exit status 0 when every row shown was sent, 1 otherwise."""

    async def run() -> int:
        queue = await _existing(queue_url, out, reactor)
        if queue is None:
            return EXIT_USAGE
        try:
            statuses = await queue.campaign_status(name, unsent=limit if name else 0)
        finally:
            await queue.close()
        if name is not None and not statuses:
            print(f"error: no campaign {name!r} in the queue", file=out)
            return EXIT_USAGE
        not_sent = 0
        for progress in statuses:
            campaign = progress.campaign
            print(f"campaign {campaign.name} (id {campaign.id}): {progress.total} rows", file=out)
            for state in ("sent", "failed", "deferred", "pending", "invalid", "duplicate"):
                print(f"  {state:<9} {progress.counts.get(state, 0)}", file=out)
            for state in sorted(
                set(progress.counts)
                - {"sent", "failed", "deferred", "pending", "invalid", "duplicate"}
            ):
                print(f"  {state:<9} {progress.counts[state]}", file=out)
            if progress.changed:
                print(f"changed since sent: {progress.changed}", file=out)
            if progress.unsent:
                print("not sent:", file=out)
                for row, email, state, code, response, *_ in progress.unsent:
                    shown = f" {code}" if code else ""
                    print(f"  row {row} {email} {state}{shown} {response}", file=out)
            not_sent += progress.total - progress.counts.get("sent", 0)
        return EXIT_OK if not_sent == 0 else EXIT_FAILED

    return defer.ensureDeferred(run())
