"""Draining a spool: claim what is due, deliver it through a Mailer, record each outcome.

:class:`Drain` makes one pass (the cron pattern: deliver what is due when it starts, then
stop); a long-running service can start a new pass whenever the previous one ends. Each pass
makes at most one attempt per message: a message deferred during the pass is due later and is
left for a later pass. Retries follow a :class:`~twistmail.retry.RetryPolicy`: a 4xx reply, a
drop or a timeout defers the recipients concerned by ``policy.delay(attempts)`` seconds; once
the attempts are used up they fail. A 5xx fails its recipient at once.

A server that cannot be reached or refuses our credentials or TLS says nothing about the
messages: the pass stops, gives the messages it holds back untouched (no attempt counted) and
reports the error in :attr:`DrainReport.abort`.
"""

from __future__ import annotations

import secrets
import socket
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..errors import (
    AuthenticationError,
    ConnectError,
    ConnectionLostError,
    DeliveryError,
    PermanentError,
    TLSError,
)
from ..fanout import fan_out
from ..mailer import Mailer
from ..results import SendResult
from ..retry import RetryPolicy
from .records import ClaimedMessage, Outcome, QueueSummary, RecipientState
from .sqlite import SqliteQueue

__all__ = ["Drain", "DrainReport", "settle"]

log = Logger()

# Errors about the server or our configuration, not about a message: they stop the pass.
_ABORT_ERRORS = (AuthenticationError, TLSError, ConnectError)


@dataclass
class DrainReport:
    """What one pass did, and the spool's counts once it ended.

    ``lost``: messages whose lease expired mid-attempt and were taken over by another drain
    (their outcome was not recorded). ``abort``: the error that stopped the pass early, if any.
    """

    claimed: int = 0
    sent: int = 0
    deferred: int = 0
    failed: int = 0
    lost: int = 0
    released: int = 0
    limit_reached: bool = False
    abort: DeliveryError | None = None
    spool: QueueSummary | None = None


def settle(
    claimed: ClaimedMessage,
    result: SendResult | None,
    error: DeliveryError | None,
    retry: RetryPolicy,
) -> Outcome:
    """The outcome of one attempt at ``claimed`` (one Mailer attempt: ``result`` or ``error``)."""
    attempts = claimed.attempts + 1
    transient = error is not None and error.transient
    by_recipient = {o.recipient: o for o in result.recipients} if result is not None else {}
    settled: list[tuple[int, RecipientState, int | None, str]] = []
    pending: list[tuple[int, str, int | None, str]] = []
    refused: list[tuple[str, int | None, str]] = []
    for position, address in zip(claimed.positions, claimed.envelope.recipients, strict=True):
        rcpt = str(address)
        found = by_recipient.get(rcpt)
        if found is not None and found.status == "sent":
            settled.append((position, "sent", found.code, found.response))
            continue
        if found is not None and (found.code is not None or found.response):
            code, text = found.code, found.response
        else:  # a drop, a timeout, a refused connection: the error text names the host
            code, text = (error.code, str(error)) if error is not None else (None, "")
        if (code is not None and 400 <= code < 500) or (code is None and transient):
            pending.append((position, rcpt, code, text))
        else:
            settled.append((position, "failed", code, text))
            refused.append((rcpt, code, text))
    if pending and retry.can_retry(attempts):
        settled += [(position, "pending", code, text) for position, _, code, text in pending]
        _, rcpt, code, text = pending[0]
        return Outcome(
            id=claimed.id,
            fence=claimed.fence,
            state="deferred",
            attempts=attempts,
            retry_in=retry.delay(attempts),
            code=code,
            response=f"{rcpt}: {text}",
            recipients=tuple(settled),
        )
    for position, rcpt, code, text in pending:
        text = f"{text} (gave up after {attempts} attempts)".lstrip()
        settled.append((position, "failed", code, text))
        refused.append((rcpt, code, text))
    first = refused[0] if refused else claimed.refused_before
    if first is not None:
        rcpt, code, text = first
        return Outcome(
            id=claimed.id,
            fence=claimed.fence,
            state="failed",
            attempts=attempts,
            code=code,
            response=f"{rcpt}: {text}",
            recipients=tuple(settled),
        )
    assert result is not None
    return Outcome(
        id=claimed.id,
        fence=claimed.fence,
        state="sent",
        attempts=attempts,
        code=result.code,
        response=result.response,
        recipients=tuple(settled),
    )


class Drain:
    """One pass over a spool: deliver every message due when :meth:`run` starts.

    ``limit`` caps the messages claimed in this pass. ``workers`` messages are in flight at
    once (default: enough to keep every connection of ``mailer`` busy). Messages are claimed
    ``batch`` at a time under a ``lease`` of that many seconds, renewed while the pass runs.
    ``on_outcome`` is called with each recorded outcome (for a progress line or a log).
    """

    def __init__(
        self,
        spool: SqliteQueue,
        mailer: Mailer,
        *,
        retry: RetryPolicy,
        limit: int | None = None,
        workers: int | None = None,
        batch: int | None = None,
        lease: float = 300.0,
        owner: str | None = None,
        on_outcome: Callable[[ClaimedMessage, Outcome], None] | None = None,
        reactor: Any = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.spool = spool
        self.mailer = mailer
        self.retry = retry
        self.limit = limit
        self.workers = workers or mailer.concurrency * mailer.pool.depth
        self.batch = batch or max(10, 2 * self.workers)
        self.lease = lease
        self.owner = owner or f"{socket.gethostname()}:{secrets.token_hex(8)}"
        self.report = DrainReport()
        self._on_outcome = on_outcome
        self._reactor = reactor
        self._buffer: deque[ClaimedMessage] = deque()
        self._claiming: defer.Deferred[None] | None = None
        self._exhausted = False
        self._stopping = False
        self._attempted: set[int] = set()  # ids attempted in this pass
        self._waiting_at_start = 0  # claimable messages when the pass began: its bound
        self._sending: set[defer.Deferred[SendResult]] = set()

    def run(self) -> defer.Deferred[DrainReport]:
        """Deliver what is due now; fires with the report once every outcome is committed."""
        return defer.Deferred.fromCoroutine(self._run())

    def stop(self) -> None:
        """Start no more messages; those in flight finish and are recorded."""
        self._stopping = True

    def abort(self) -> None:
        """Start no more messages and cut off those in flight (recorded as drops: deferred)."""
        self._stopping = True
        for sending in list(self._sending):
            sending.cancel()

    async def _run(self) -> DrainReport:
        # The pass takes at most what could be claimed when it began, so messages enqueued
        # meanwhile (by a producer faster than delivery) cannot keep it running.
        start = await self.spool.summary()
        self._waiting_at_start = start.due + start.expired
        renewal = task.LoopingCall(self._renew)
        renewal.clock = self._reactor
        renewal.start(self.lease / 3, now=False).addErrback(
            lambda f: log.failure("renewing the spool leases failed", f)
        )
        try:
            await fan_out(self._reactor, self._work, self.workers)
        finally:
            if renewal.running:
                renewal.stop()
            if self._claiming is not None:
                await self._claiming
            if self._buffer:
                held = list(self._buffer)
                self._buffer.clear()
                released = await self.spool.release(self.owner, held)
                self.report.released += released
        self.report.spool = await self.spool.summary()
        return self.report

    def _renew(self) -> defer.Deferred[None]:
        d = self.spool.renew(self.owner, self.lease)
        return d.addCallback(lambda _: None)

    def _work(self) -> Iterator[defer.Deferred[Any] | None]:
        while not self._stopping:
            if self._buffer:
                yield self._deliver(self._buffer.popleft())
            elif self._exhausted:
                return
            else:
                yield self._wait_for_claim()

    def _wait_for_claim(self) -> defer.Deferred[None]:
        if self._claiming is None:
            want = self.batch
            if self.limit is not None:
                want = min(want, self.limit - self.report.claimed)
            if want <= 0:
                self.report.limit_reached = True
                self._exhausted = True
                return defer.succeed(None)
            want = min(want, self._waiting_at_start - self.report.claimed)
            if want <= 0:
                self._exhausted = True
                return defer.succeed(None)
            claiming = self.spool.claim(self.owner, want, lease=self.lease)
            self._claiming = claiming.addCallbacks(self._claimed, self._claim_failed)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._claiming.addBoth(_chain_to, waiter)
        return waiter

    def _claimed(self, claimed: list[ClaimedMessage]) -> defer.Deferred[None] | None:
        self._claiming = None
        # One attempt per message per pass: one deferred during this pass and due again
        # already (a short retry delay) is given back for the next pass.
        again = [c for c in claimed if c.id in self._attempted]
        fresh = [c for c in claimed if c.id not in self._attempted]
        self.report.claimed += len(fresh)
        self._buffer.extend(fresh)
        if not fresh:
            self._exhausted = True
        if again:
            return self.spool.release(self.owner, again).addCallback(lambda _: None)
        return None

    def _claim_failed(self, failure: Failure) -> Failure:
        self._claiming = None
        self._exhausted = True
        return failure

    def _deliver(self, claimed: ClaimedMessage) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._deliver_one(claimed))

    async def _deliver_one(self, claimed: ClaimedMessage) -> None:
        result: SendResult | None = None
        error: DeliveryError | None = None
        self._attempted.add(claimed.id)
        sending = self.mailer.send(claimed.envelope)
        self._sending.add(sending)
        try:
            result = await sending
        except DeliveryError as e:
            result, error = getattr(e, "result", None), e
        except defer.CancelledError:  # abort(): the server may or may not have it
            error = ConnectionLostError("sending was interrupted", host=self.mailer.server.label)
        except Exception as e:  # a bug, not a delivery outcome: fail the message, keep going
            error = PermanentError(f"internal error: {e!r}")
        finally:
            self._sending.discard(sending)
        if isinstance(error, _ABORT_ERRORS) and not (result and result.accepted):
            self._abort(error)
            released = await self.spool.release(self.owner, [claimed])
            self.report.released += released  # not `+= await`: that reads before waiting
            return
        outcome = settle(claimed, result, error, self.retry)
        if not await self.spool.record(self.owner, outcome):
            self.report.lost += 1
            return
        if outcome.state == "sent":
            self.report.sent += 1
        elif outcome.state == "deferred":
            self.report.deferred += 1
        else:
            self.report.failed += 1
        if self._on_outcome is not None:
            self._on_outcome(claimed, outcome)

    def _abort(self, error: DeliveryError) -> None:
        if self.report.abort is None:
            self.report.abort = error
        self._stopping = True


def _chain_to(result: object, waiter: defer.Deferred[None]) -> object:
    if isinstance(result, Failure):
        waiter.errback(result)
        return None  # handled by the waiter
    waiter.callback(None)
    return result
