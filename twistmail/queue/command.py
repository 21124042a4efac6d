"""``twistmail drain``: deliver what a spool holds that is due now, then exit (the cron pattern).

Exit status: 0 everything due was sent; 1 a message failed permanently in this run; 2 usage or
configuration error (missing spool, bad URL, refused credentials or TLS); 3 messages remain
(deferred, not due yet, ``--limit`` reached, the server could not be reached, or interrupted).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TextIO

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from .._twisted import Reactor, install_signal_handlers
from ..errors import AuthenticationError, TLSError, TwistmailError
from ..options import DeliveryOptions
from ..retry import RetryPolicy
from .records import ClaimedMessage, Outcome, QueueError
from .sqlite import SqliteQueue, read_queue_status
from .worker import Drain, DrainReport

__all__ = ["DrainOptions", "drain", "status"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_REMAINING = 0, 1, 2, 3


@dataclass(kw_only=True)
class DrainOptions(DeliveryOptions):
    """Everything ``twistmail drain`` was asked to do."""

    spool_path: str
    # A cron job reports an unreachable server at once and leaves the messages for next time.
    server_patience: float = 0.0
    limit: int | None = None
    lease: float = 300.0
    out: TextIO = field(default_factory=lambda: sys.stdout)


def drain(options: DrainOptions, reactor: Reactor) -> defer.Deferred[int]:
    """Run one drain; the Deferred fires with the exit status."""
    return defer.Deferred.fromCoroutine(_drain(options, reactor))


async def _drain(opts: DrainOptions, reactor: Reactor) -> int:
    out = opts.out
    try:
        mailer = opts.mailer(reactor)  # the delivery loop and the spool keep attempts
    except (ValueError, OSError) as e:
        _say(out, f"error: {e}")
        return EXIT_USAGE
    try:
        # Outcome records need not be fsync'd one by one: a drain killed at any moment loses
        # none of them; a power cut may lose the last few, whose messages go out again.
        spool = await SqliteQueue.open(
            opts.spool_path, create=False, synchronous="NORMAL", reactor=reactor
        )
    except QueueError as e:
        await mailer.close()
        _say(out, f"error: {e}")
        return EXIT_USAGE

    def show(claimed: ClaimedMessage, outcome: Outcome) -> None:
        if outcome.state == "failed":
            mid = claimed.envelope.message_id or "(no Message-ID)"
            _say(out, f"failed: message {outcome.id} {mid}: {outcome.response}")

    worker = Drain(
        spool,
        mailer,
        retry=RetryPolicy(max_attempts=opts.max_attempts, initial_delay=opts.retry_delay),
        limit=opts.limit,
        lease=opts.lease,
        hold_bodies=opts.concurrency,
        patience=opts.server_patience,
        on_outcome=show,
        reactor=IReactorTime(reactor),
    )
    interrupted: list[bool] = []

    def interrupt() -> None:
        if interrupted:  # a second signal: stop waiting for messages in flight
            worker.abort()
            return
        interrupted.append(True)
        _say(out, "stopping: letting messages in flight finish (signal again to abort)")
        worker.stop()

    restore = install_signal_handlers(reactor, interrupt)
    try:
        report = await worker.run()
    finally:
        restore()
        await mailer.close()
        await spool.close()
    return _finish(report, bool(interrupted), out)


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
        f"{note}; spool: {counts['queued']} queued, {counts['deferred']} deferred, "
        f"{counts['sending']} sending, {counts['sent']} sent, {counts['failed']} failed",
    )
    if isinstance(report.abort, AuthenticationError | TLSError):
        return EXIT_USAGE
    if report.failed:
        return EXIT_FAILED
    if spool.waiting or report.abort is not None or interrupted:
        return EXIT_REMAINING
    return EXIT_OK


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


def _say(out: TextIO, text: str) -> None:
    print(text, file=out, flush=True)
