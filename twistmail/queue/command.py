"""``twistmail drain``: deliver what a spool holds that is due now, then exit (the cron pattern);
``twistmail worker``: deliver from a queue until stopped.

Exit status: 0 everything due was sent; 1 a message failed permanently in this run; 2 usage or
configuration error (missing spool, bad URL, refused credentials or TLS); 3 messages remain
(deferred, not due yet, ``--limit`` reached, the server could not be reached, or interrupted).
"""

from __future__ import annotations

import math
import os
import secrets
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime

from .._twisted import Reactor, install_signal_handlers
from ..errors import AuthenticationError, TLSError, TwistmailError
from ..options import DeliveryOptions
from ..retry import RetryPolicy
from .records import ClaimedMessage, Outcome, QueueError
from .sharing import Deliverers, deliverers_for, watch_notifications
from .sqlite import read_queue_status
from .url import open_queue
from .worker import Drain, DrainReport

if TYPE_CHECKING:
    from ..interfaces import IQueue, ISuppressionList
    from ..mailer import Mailer
    from ..relay.worker import RelayWorker

__all__ = [
    "DrainOptions",
    "WorkerOptions",
    "drain",
    "status",
    "stopper",
    "watch",
    "work",
    "worker_for",
]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_REMAINING = 0, 1, 2, 3


@dataclass(kw_only=True)
class DrainOptions(DeliveryOptions):
    """Everything ``twistmail drain`` was asked to do."""

    spool_path: str | None = None
    queue_url: str | None = None
    """The queue as a URL (``sqlite:PATH``, ``postgresql://...``); else ``spool_path``."""
    # A cron job reports an unreachable server at once and leaves the messages for next time.
    server_patience: float = 0.0
    limit: int | None = None
    lease: float = 300.0
    out: TextIO = field(default_factory=lambda: sys.stdout)
    verp: Any = None
    """A :class:`~twistmail.bounces.verp.VerpSigner` (``--verp-domain``): each recipient's
    message (a copy each, for a message with several) goes out from its signed return path."""


def drain(options: DrainOptions, reactor: Reactor) -> defer.Deferred[int]:
    """Run one drain; the Deferred fires with the exit status."""
    return defer.Deferred.fromCoroutine(_drain(options, reactor))


async def _drain(opts: DrainOptions, reactor: Reactor) -> int:
    out = opts.out
    url = opts.queue_url or f"sqlite:{opts.spool_path}"
    opened = await _open(opts, out, url, reactor, create=False)
    if opened is None:
        return EXIT_USAGE
    mailer, spool, suppression = opened
    show = _failures_shown(out)

    worker = Drain(
        spool,
        _sender(mailer, opts.verp),
        retry=RetryPolicy(max_attempts=opts.max_attempts, initial_delay=opts.retry_delay),
        limit=opts.limit,
        lease=opts.lease,
        hold_bodies=opts.concurrency,
        patience=opts.server_patience,
        on_outcome=show,
        reactor=IReactorTime(reactor),
        suppression=suppression,
    )
    interrupt, interrupted = stopper(worker, lambda text: _say(out, text))
    restore = install_signal_handlers(reactor, interrupt)
    try:
        report = await worker.run()
    finally:
        restore()
        await mailer.close()
        await suppression.close()
        await spool.close()
    return _finish(report, bool(interrupted), out)


def stopper(worker: Drain, say: Callable[[str], None]) -> tuple[Callable[[], None], list[bool]]:
    """A signal handler for ``worker`` (the first signal stops it, letting the messages in
    flight finish; a second cuts them off), and the list that is not empty once one came."""
    interrupted: list[bool] = []

    def interrupt() -> None:
        if interrupted:  # a second signal: stop waiting for messages in flight
            worker.abort()
            return
        interrupted.append(True)
        say("stopping: letting messages in flight finish (signal again to abort)")
        worker.stop()

    return interrupt, interrupted


def _finish(report: DrainReport, interrupted: bool, out: TextIO) -> int:
    spool = report.spool
    assert spool is not None
    if report.abort is not None:
        _say(out, f"error: {report.abort}")
    counts = spool.counts
    note = " (--limit reached)" if report.limit_reached else ""
    note += " (interrupted)" if interrupted else ""
    _say(
        out,
        f"drain: {report.sent} sent, {report.deferred} deferred, {report.failed} failed"
        f"{_suppressed(report)}{note}; spool: {counts['queued']} queued, "
        f"{counts['deferred']} deferred, {counts['sending']} sending, {counts['sent']} sent, "
        f"{counts['failed']} failed",
    )
    if isinstance(report.abort, AuthenticationError | TLSError):
        return EXIT_USAGE
    if report.failed:
        return EXIT_FAILED
    if spool.waiting or report.abort is not None or interrupted:
        return EXIT_REMAINING
    return EXIT_OK


def _suppressed(report: DrainReport) -> str:
    if not report.suppressed:
        return ""
    return (
        f", {report.suppressed} recipients suppressed ({report.suppressed_messages} "
        "messages not sent at all)"
    )


def status(spool_path: str, limit: int, out: TextIO) -> int:
    """Print a spool's counts and its first messages not sent; 0, or 2 for an unusable spool."""
    try:
        summary = read_queue_status(spool_path, limit=limit)
    except (TwistmailError, OSError) as e:
        print(f"error: {e}", file=out)
        return EXIT_USAGE
    counts = summary.counts
    print(f"spool {spool_path}", file=out)
    print(f"  queued    {counts['queued']}", file=out)
    print(f"  deferred  {counts['deferred']}", file=out)
    print(f"  sending   {counts['sending']} (lease expired: {summary.expired})", file=out)
    print(f"  sent      {counts['sent']}", file=out)
    print(f"  failed    {counts['failed']}", file=out)
    print(f"  due now   {summary.due + summary.expired}", file=out)
    if summary.unsent:
        print("not sent:", file=out)
        for row in summary.unsent:
            code = f" {row.code}" if row.code else ""
            print(
                f"  #{row.id} {row.message_id or '(no Message-ID)'} {row.state}{code} "
                f"attempts={row.attempts} {row.response} [{row.recipients}]",
                file=out,
            )
    return EXIT_OK


@dataclass(kw_only=True)
class WorkerOptions(DeliveryOptions):
    """Everything ``twistmail worker`` was asked to do."""

    queue_url: str
    lease: float = 300.0
    per_domain: int | None = None
    """At most this many messages in flight per recipient domain (shared on PostgreSQL)."""
    # A worker never gives up on an unreachable server: it backs off and keeps the messages.
    server_patience: float = math.inf
    sqlite_check: float = 1.0
    """Seconds between looks for new messages in a SQLite queue (which cannot notify)."""
    out: TextIO = field(default_factory=lambda: sys.stdout)
    verp: Any = None
    """As :attr:`DrainOptions.verp`."""


def _sender(mailer: Mailer, verp: Any) -> Any:
    """``mailer``, sending from VERP return paths when ``verp`` (a signer) is given."""
    if verp is None:
        return mailer
    from ..bounces.sending import VerpSender

    return VerpSender(mailer, verp)


def new_owner() -> str:
    """A name for a new deliverer, unique among a queue's deliverers on any machine."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def work(options: WorkerOptions, reactor: Reactor) -> defer.Deferred[int]:
    """Run a worker until SIGINT/SIGTERM; the Deferred fires with the exit status."""
    return defer.Deferred.fromCoroutine(_work(options, reactor))


def worker_for(
    queue: IQueue,
    mailer: Mailer,
    opts: WorkerOptions,
    reactor: Reactor,
    on_outcome: Callable[[ClaimedMessage, Outcome], None] | None,
    suppression: ISuppressionList | None = None,
    owner: str | None = None,
) -> RelayWorker:
    """A worker delivering from ``queue`` through ``mailer`` as ``opts`` say (from VERP return
    paths with ``opts.verp``), leaving out the recipients ``suppression`` holds, until stopped;
    ``owner`` names it in the queue (a new name if None)."""
    from ..relay.worker import RelayWorker

    return RelayWorker(
        queue,
        _sender(mailer, opts.verp),
        retry=RetryPolicy(max_attempts=opts.max_attempts, initial_delay=opts.retry_delay),
        owner=owner if owner is not None else new_owner(),
        max_age=math.inf,
        age=lambda _claimed: defer.succeed(None),
        reactor=IReactorTime(reactor),
        lease=opts.lease,
        on_outcome=on_outcome,
        suppression=suppression,
    )


async def _work(opts: WorkerOptions, reactor: Reactor) -> int:
    out = opts.out
    try:
        deliverers: Deliverers | None = deliverers_for(opts.queue_url)
    except ValueError:
        deliverers = None  # _open says what is wrong with the URL
    owner = new_owner()
    shared = Shared(deliverers, owner, opts.per_domain, opts.lease) if deliverers else None
    opened = await _open(opts, out, opts.queue_url, reactor, shared)
    if opened is None:
        return EXIT_USAGE
    mailer, queue, suppression = opened
    worker = worker_for(queue, mailer, opts, reactor, _failures_shown(out), suppression, owner)
    watching = watch(queue, worker.wake, opts.sqlite_check, reactor)
    interrupt, _ = stopper(worker, lambda text: _say(out, text))
    restore = install_signal_handlers(reactor, interrupt)
    _say(out, f"worker {owner}: delivering from the queue (SIGTERM to stop)")
    try:
        report = await worker.run()
    finally:
        restore()
        watching()
        await mailer.close()
        await suppression.close()
        await queue.close()
    _say(
        out,
        f"worker: {report.sent} sent, {report.deferred} deferred, {report.failed} failed, "
        f"{report.released} given back{_suppressed(report)}",
    )
    return EXIT_USAGE if isinstance(report.abort, AuthenticationError | TLSError) else EXIT_OK


def watch(
    queue: object, wake: Callable[[], None], every: float, reactor: Reactor
) -> Callable[[], None]:
    """Call ``wake`` whenever the queue says something was enqueued (a PostgreSQL queue's
    ``notified()``), or every ``every`` seconds for a queue that cannot say; returns the
    undo."""
    if getattr(queue, "notified", None) is not None:
        return watch_notifications(queue, wake)
    looking = task.LoopingCall(wake)
    looking.clock = IReactorTime(reactor)
    looking.start(every, now=False)
    return looking.stop


def _say(out: TextIO, text: str) -> None:
    print(text, file=out, flush=True)


async def _open(
    opts: DeliveryOptions,
    out: TextIO,
    url: str,
    reactor: Reactor,
    shared: Shared | None = None,
    **queue_options: Any,
) -> tuple[Mailer, IQueue, ISuppressionList] | None:
    """The Mailer, the queue and its suppression list a drain or a worker delivers with; None
    (the error said on ``out``) when one cannot be opened. A worker gives what it ``shared``
    with the queue's other deliverers: the queue is opened by them, and ``--rate`` and
    ``--per-domain`` are the ones they share.

    Outcome records need not be fsync'd one by one (``synchronous=NORMAL``): a process killed at
    any moment loses none of them; a power cut may lose the last few, whose messages go out
    again. The delivery loop and the queue keep attempts, not the Mailer.
    """
    try:
        mailer = opts.mailer(reactor)
    except (ValueError, OSError) as e:
        _say(out, f"error: {e}")
        return None
    try:
        if shared is not None:
            queue = await shared.deliverers.open(reactor, synchronous="NORMAL")
        else:
            queue = await open_queue(url, synchronous="NORMAL", reactor=reactor, **queue_options)
    except QueueError as e:
        await mailer.close()
        _say(out, f"error: {e}")
        return None
    if shared is not None and (opts.rate or shared.per_domain):
        # Never used: made again, paced by the deliverers' shared rate and caps.
        await mailer.close()
        clock = IReactorTime(reactor)
        deliverers = shared.deliverers
        mailer = opts.mailer(
            reactor,
            deliverers.throttle(opts.rate, clock) if opts.rate else None,
            deliverers.domain_limiter(shared.per_domain, clock, shared.holder, shared.lease)
            if shared.per_domain
            else None,
        )
    from ..suppression import SuppressionError, open_suppression_for_queue

    try:
        suppression = await open_suppression_for_queue(url, queue_ready=True, reactor=reactor)
    except SuppressionError as e:
        await mailer.close()
        await queue.close()
        _say(out, f"error: {e}")
        return None
    return mailer, queue, suppression


@dataclass(frozen=True)
class Shared:
    """What a worker shares with the other deliverers of its queue: the store's terms, its
    name among them, its per-domain cap and its lease."""

    deliverers: Deliverers
    holder: str
    per_domain: int | None
    lease: float


def _failures_shown(out: TextIO) -> Callable[[ClaimedMessage, Outcome], None]:
    """An outcome callback that prints each message that failed for good."""

    def show(claimed: ClaimedMessage, outcome: Outcome) -> None:
        if outcome.state == "failed":
            mid = claimed.envelope.message_id or "(no Message-ID)"
            _say(out, f"failed: message {outcome.id} {mid}: {outcome.response}")

    return show
