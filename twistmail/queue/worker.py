"""Draining a queue: claim what is due, deliver it through the one delivery loop, record it.

:class:`Drain` makes one pass (the cron pattern: deliver what is due when it starts, then
stop). It is a door of :class:`~twistmail.engine.DeliveryLoop`: claims in, each attempt's
:class:`~twistmail.retry.Plan` recorded in the queue. Each pass makes at most one attempt per
message: a message deferred during the pass is due later and is left for a later pass.

Like every door with a store, it keeps the duplicate bound: a message's data goes out only
while fewer than ``concurrency`` delivered messages wait for their outcome's commit, so a drain
killed at any moment can have delivered at most that many messages it has no record of (they
go out again once their lease expires).

A server that cannot be reached or refuses our credentials or TLS says nothing about the
messages: the pass stops (after ``patience`` seconds of backoff for an unreachable server; at
once by default), gives the messages it holds back untouched (no attempt counted) and reports
the error in :attr:`DrainReport.abort`.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from .._twisted import default_reactor
from ..engine import DeliveryLoop, Job, Sender
from ..errors import DeliveryError
from ..interfaces import IQueue
from ..results import RecipientOutcome
from ..retry import Plan, RetryPolicy, plan
from ..smtp._transaction import TransactionResult
from ..suppression.records import is_suppressed_reply
from .records import ClaimedMessage, Outcome, QueueSummary, RecipientState

if TYPE_CHECKING:
    from ..interfaces import ISuppressionList
    from ..suppression.policy import BounceGuard
    from ..suppression.screen import Screened

__all__ = ["Drain", "DrainReport", "outcome_of", "settle"]

log = Logger()

_STATES: dict[str, RecipientState] = {"sent": "sent", "deferred": "pending", "failed": "failed"}


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
    suppressed: int = 0
    """Recipients not sent to because they are on the suppression list."""
    suppressed_messages: int = 0
    """Messages not sent at all: every recipient is suppressed (recorded failed)."""
    abort: DeliveryError | None = None
    spool: QueueSummary | None = None


def outcome_of(claimed: ClaimedMessage, planned: Plan) -> Outcome:
    """The queue record of one planned attempt at ``claimed``."""
    result = planned.result
    if planned.state == "sent" and result is not None and result.accepted_all:
        # Every recipient's fate is the final reply: no per-recipient outcome to build.
        code, text = result.code, result.text
        positions = claimed.positions
        recipients: tuple[tuple[int, RecipientState, int | None, str], ...] = (
            ((positions[0], "sent", code, text),)
            if len(positions) == 1
            else tuple((position, "sent", code, text) for position in positions)
        )
        enhanced: tuple[str | None, ...] = (result.enhanced,) * len(recipients)
    else:
        recipients = tuple(
            (position, _STATES[o.status], o.code, o.response)
            for position, o in zip(claimed.positions, planned.outcomes, strict=True)
        )
        enhanced = tuple(o.enhanced for o in planned.outcomes)
    return Outcome(
        id=claimed.id,
        fence=claimed.fence,
        state=planned.state,
        attempts=planned.attempts,
        retry_in=planned.delay if planned.state == "deferred" else 0.0,
        code=planned.code,
        response=planned.response,
        recipients=recipients,
        enhanced=enhanced if any(enhanced) else (),
    )


def settle(
    claimed: ClaimedMessage,
    result: TransactionResult | None,
    error: DeliveryError | None,
    policy: RetryPolicy,
) -> Outcome:
    """The queue record of one attempt at ``claimed``: the server's ``result`` or the
    ``error`` that ended it, planned by :func:`~twistmail.retry.plan` as every door does."""
    outcome = plan(
        claimed.envelope.recipients,
        result,
        error,
        claimed.attempts + 1,
        policy,
        refused_before=_refused_before(claimed),
    )
    return outcome_of(claimed, outcome)


def _refused_before(claimed: ClaimedMessage) -> RecipientOutcome | None:
    """The refusal an earlier attempt at ``claimed`` recorded, as a recipient outcome."""
    before = claimed.refused_before
    if before is None:
        return None
    rcpt, code, text = before
    if is_suppressed_reply(code, text):
        return None  # left out as suppressed, not refused: the others may still all be sent
    return RecipientOutcome(rcpt, "failed", code, None, text, claimed.attempts)


class _ClaimJob(Job):
    __slots__ = ("claimed", "suppressed")

    def __init__(
        self,
        claimed: ClaimedMessage,
        suppressed: tuple[tuple[int, RecipientState, int | None, str], ...] = (),
    ) -> None:
        super().__init__(claimed.envelope, claimed.attempts)
        self.claimed = claimed
        self.refused = _refused_before(claimed)
        self.suppressed = suppressed
        """Records of the claim's recipients left out as suppressed (added to its outcome)."""


class Drain:
    """One pass over a queue: deliver every message due when :meth:`run` starts.

    ``limit`` caps the messages claimed in this pass. Messages are claimed ``batch`` at a time
    under a ``lease`` of that many seconds, renewed while the pass runs. ``hold_bodies`` is the
    duplicate bound (default: the mailer's connections). ``on_outcome`` is called with each
    recorded outcome (for a progress line or a log). ``reactor`` is the clock the pass runs on
    (the global reactor by default).

    With a ``suppression`` list, every claimed batch is checked against it first: suppressed
    recipients are not sent to (recorded failed, ``suppressed: <reason>``), a message every
    recipient of which is suppressed is not sent at all, and hard bounces about a recipient
    (5.1.1, 5.1.3, 5.1.6 at RCPT) are added to it
    (:class:`~twistmail.suppression.policy.BounceGuard`).
    """

    def __init__(
        self,
        spool: IQueue,
        mailer: Sender,
        *,
        retry: RetryPolicy,
        limit: int | None = None,
        batch: int | None = None,
        lease: float = 300.0,
        owner: str | None = None,
        hold_bodies: int | None = None,
        patience: float = 0.0,
        on_outcome: Callable[[ClaimedMessage, Outcome], None] | None = None,
        reactor: IReactorTime | None = None,
        suppression: ISuppressionList | None = None,
    ) -> None:
        if reactor is None:
            reactor = IReactorTime(default_reactor())
        self.spool = spool
        self.suppression = suppression
        self._guard: BounceGuard | None = None
        self._screened: dict[int, tuple[tuple[int, RecipientState, int | None, str], ...]] = {}
        self._blocked = 0  # messages of the last claim recorded as suppressed, not attempted
        if suppression is not None:
            from ..suppression.policy import BounceGuard

            self._guard = BounceGuard(suppression, reactor)
        self.mailer = mailer
        self.retry = retry
        self.limit = limit
        self.batch = batch or max(10, 2 * mailer.capacity)
        self._low_water = self.batch // 2
        self.lease = lease
        self.owner = owner or f"{socket.gethostname()}:{secrets.token_hex(8)}"
        self.report = DrainReport()
        self._on_outcome = on_outcome
        self._reactor = reactor
        self._buffer: deque[_ClaimJob] = deque()
        self._claiming: defer.Deferred[Any] | None = None
        self._exhausted = False
        self._attempted: set[int] = set()  # ids attempted in this pass
        self._waiting_at_start = 0  # claimable messages when the pass began: its bound
        self._loop = DeliveryLoop(
            mailer,
            self,
            retry,
            clock=reactor,
            hold_bodies=hold_bodies if hold_bodies is not None else _connections(mailer),
            patience=patience,
        )

    def run(self) -> defer.Deferred[DrainReport]:
        """Deliver what is due now; fires with the report once every outcome is committed."""
        return defer.Deferred.fromCoroutine(self._run())

    def stop(self) -> None:
        """Start no more messages; those in flight finish and are recorded."""
        self._loop.stop()

    def abort(self) -> None:
        """Start no more messages and cut off those in flight (recorded as drops: deferred)."""
        self._loop.abort()

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
            await self._loop.start()
        finally:
            if renewal.running:
                renewal.stop()
            if self._claiming is not None:
                await self._claiming
            if self._buffer:
                held = [job.claimed for job in self._buffer]
                self._buffer.clear()
                released = await self.spool.release(self.owner, held)
                self.report.released += released
            if self._guard is not None:
                await self._guard.flush()
        self.report.abort = self._loop.stopped_by
        self.report.spool = await self.spool.summary()
        return self.report

    def _renew(self) -> defer.Deferred[None]:
        d = self.spool.renew(self.owner, self.lease)
        return d.addCallback(lambda _: None)

    # ------------------------------------------------------------------ the loop's door

    def next_job(self) -> Job | None:
        """The next claimed message; claims more once half a batch is left, so that the
        next claim is answered before the buffer runs out."""
        buffer = self._buffer
        if len(buffer) <= self._low_water and self._claiming is None and not self._exhausted:
            self._claim()
        if buffer:
            return buffer.popleft()
        return None

    def wake_in(self) -> float | None:
        """Nothing to deliver now: wait for a claim, or stop once the queue has nothing due."""
        if self._guard is not None and not self._buffer and not self._loop.in_flight:
            # Nothing in flight: what was refused at once so far is one batch.
            self._guard.close_batch()
        if not self._buffer and not self._exhausted:
            self._claim()  # may find the pass's bound reached, or be answered at once
        if self._buffer:
            return 0.0
        if self._claiming is not None:
            return math.inf  # the claim's answer pumps the loop
        return None

    def record(self, job: Job, plan: Plan) -> defer.Deferred[None]:
        """Write the outcome to the queue; a lease lost meanwhile is counted, not an error."""
        assert isinstance(job, _ClaimJob)
        claimed = job.claimed
        outcome = outcome_of(claimed, plan)
        guard = self._guard
        if guard is not None:
            if plan.state == "sent" and plan.result is not None and plan.result.accepted_all:
                guard.accepted(len(claimed.positions))
            else:
                guard.note(plan.outcomes)
        if job.suppressed:
            outcome = dataclasses.replace(outcome, recipients=outcome.recipients + job.suppressed)
        return self.spool.record(self.owner, outcome).addCallback(self._recorded, claimed, outcome)

    def put_back(self, job: Job) -> None:
        """A message the server never saw: it goes again first (or back to the queue)."""
        assert isinstance(job, _ClaimJob)
        self._buffer.appendleft(job)

    def _blocked_recorded(self, kept: bool, claimed: ClaimedMessage) -> None:
        if not kept:
            self.report.lost += 1
            return
        self.report.suppressed_messages += 1
        log.info(
            "message {id} not sent: every recipient is suppressed",
            id=claimed.id,
            message_id=claimed.envelope.message_id,
        )

    def _recorded(self, kept: bool, claimed: ClaimedMessage, outcome: Outcome) -> None:
        if not kept:
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

    # ------------------------------------------------------------------ claims

    def _claim(self) -> None:
        if self._claiming is not None or self._exhausted:
            return
        want = self.batch
        if self.limit is not None:
            want = min(want, self.limit - self.report.claimed)
            if want <= 0:
                self.report.limit_reached = True
                self._exhausted = True
                return
        want = min(want, self._waiting_at_start - self.report.claimed)
        if want <= 0:
            self._exhausted = True
            return
        # Set before the callbacks: a store may answer at once (MemoryQueue).
        self._claiming = claiming = self.spool.claim(self.owner, want, lease=self.lease)
        if self.suppression is not None:
            claiming.addCallback(self._screen)
        claiming.addCallbacks(self._claimed, self._claim_failed)

    def _screen(self, claimed: list[ClaimedMessage]) -> defer.Deferred[list[ClaimedMessage]]:
        """Leave out suppressed recipients; record messages with nothing left as failed."""
        from ..suppression.screen import screen

        assert self.suppression is not None
        return screen(self.suppression, claimed).addCallback(self._screen_done)

    def _screen_done(self, screened: Screened) -> defer.Deferred[list[ClaimedMessage]]:
        self.report.suppressed += screened.matched
        self._screened = {c.id: stopped for c, stopped in screened.kept if stopped}
        self._blocked = len(screened.blocked)
        records = []
        for claimed, outcome in screened.blocked:
            # Counted in the pass's bound like any claim, so that the pass ends.
            self.report.claimed += 1
            self._attempted.add(claimed.id)
            d = self.spool.record(self.owner, outcome)
            records.append(d.addCallback(self._blocked_recorded, claimed))
        done = defer.gatherResults(records, consumeErrors=True)
        return done.addCallback(lambda _: [c for c, _ in screened.kept])

    def _claimed(self, claimed: list[ClaimedMessage]) -> defer.Deferred[None] | None:
        self._claiming = None
        # One attempt per message per pass: one deferred during this pass and due again
        # already (a short retry delay) is given back for the next pass.
        again = [c for c in claimed if c.id in self._attempted]
        fresh = [c for c in claimed if c.id not in self._attempted]
        self.report.claimed += len(fresh)
        self._attempted.update(c.id for c in fresh)
        screened = self._screened
        if screened:
            self._buffer.extend(_ClaimJob(c, screened.pop(c.id, ())) for c in fresh)
        else:
            self._buffer.extend(_ClaimJob(c) for c in fresh)
        blocked, self._blocked = self._blocked, 0
        if not fresh and not blocked:
            self._exhausted = True
        self._loop.pump()
        if again:
            return self.spool.release(self.owner, again).addCallback(lambda _: None)
        return None

    def _claim_failed(self, failure: Failure) -> None:
        self._claiming = None
        self._exhausted = True
        self._loop.fail(failure)


def _connections(mailer: Sender) -> int:
    concurrency = getattr(mailer, "concurrency", None)
    return concurrency if isinstance(concurrency, int) else mailer.capacity
