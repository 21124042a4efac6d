"""The delivery loop of ``twistmail send``: jobs in, outcomes recorded, bounded duplicates.

A message can arrive twice only if the process dies after the server took it and before its
outcome was committed to the journal. This loop keeps at most ``concurrency`` such messages at
any time: a message's data (its body and final dot) goes out only while fewer than
``concurrency`` delivered-or-delivering messages wait for their record's commit.

Within that bound it keeps every connection busy. On a free pooled connection a job is a
plain :meth:`~twistmail.smtp._protocol.MailerProtocol.submit`: up to the pool's depth of
envelopes are pipelined per connection, and when the server asks for a message's data while
the bound is reached, the body waits (:meth:`~MailerProtocol.release_body`) for a commit
instead of the next envelope waiting for the whole previous message. Anything else (opening
a connection, a rate limit, a per-domain cap) goes through :meth:`Mailer.send`, whose data
cannot be held back, so such a job takes its place in the bound before it starts.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet import defer
from twisted.python.failure import Failure

from twistmail._bulk import _Delivery
from twistmail._twisted import Pump
from twistmail.errors import DeliveryError
from twistmail.mailer import Mailer
from twistmail.message import Envelope
from twistmail.results import SendResult
from twistmail.smtp._protocol import MailerProtocol
from twistmail.smtp._transaction import TransactionResult, _Txn

__all__ = ["Job", "JournaledDelivery"]


class Job(Protocol):
    """What the loop needs of a campaign's job."""

    attempts: int

    @property
    def envelope(self) -> Envelope: ...


# settle(job, result, error) -> fires once the outcome is committed.
Settle = Callable[[Any, SendResult | None, DeliveryError | None], defer.Deferred[None]]
# sent(job, code, text) -> fires once the "sent" record is committed.
Sent = Callable[[Any, int, str], defer.Deferred[None]]


class _Attempt:
    __slots__ = ("at_risk", "ended", "job", "proto", "txn")

    def __init__(self, job: Job) -> None:
        self.job = job
        self.proto: MailerProtocol | None = None
        self.txn: _Txn | None = None
        self.at_risk = False  # counted in the bound until its record is committed
        self.ended = False


class JournaledDelivery(Pump):
    """Runs jobs from ``next_job`` until ``more_in`` says nothing more will come.

    ``next_job()`` gives the next job or None; ``more_in()`` then says in how many seconds to
    ask again (a retry parked for later), or None when the campaign has nothing left.
    ``settle`` and ``sent`` record outcomes; no new job starts while ``max_recording`` of them
    (default: 50 per connection, at least 1,000) wait for their commit. :meth:`start` fires once
    every outcome is committed; it fails if recording one fails.
    """

    def __init__(
        self,
        mailer: Mailer,
        reactor: Any,
        concurrency: int,
        *,
        next_job: Callable[[], Job | None],
        more_in: Callable[[], float | None],
        settle: Settle,
        sent: Sent,
        max_recording: int | None = None,
    ) -> None:
        self._mailer = mailer
        self._next_job = next_job
        self._more_in = more_in
        self._settle = settle
        self._sent = sent
        self._risk_limit = concurrency
        self._at_risk = 0
        self._fast = mailer._bucket is None and mailer._domains is None
        self._limit = concurrency * (mailer.pool.depth if self._fast else 1)
        self._in_flight = 0  # attempts whose transaction has not ended
        self._recording = 0  # outcomes not yet committed
        # Outcomes that need no commit before the next message (refusals, deferrals) still
        # wait for one before more rows are read, so a slow journal cannot let them pile up.
        self._max_recording = max_recording or max(1000, 50 * concurrency)
        self._held: deque[_Attempt] = deque()
        self._attempts: set[_Attempt] = set()
        super().__init__(reactor, defer.Deferred())

    def _start_one(self) -> bool:
        if self._in_flight >= self._limit or self._recording >= self._max_recording:
            return False
        pool = self._mailer.pool
        proto = None
        if self._fast:
            proto = pool.acquire_now()
            if proto is None and not pool.has_room:
                return False  # every connection is full: an ending attempt pumps again
        if proto is None and self._at_risk >= self._risk_limit:
            return False  # Mailer.send cannot hold its data back: wait for a commit
        job = self._next_job()
        if job is None:
            if proto is not None:
                pool.release(proto)
            return False
        self._start(job, proto)
        return True

    # ------------------------------------------------------------------ attempts

    def _start(self, job: Job, proto: MailerProtocol | None) -> None:
        attempt = _Attempt(job)
        self._attempts.add(attempt)
        self._in_flight += 1
        job.attempts += 1
        if proto is not None:
            attempt.proto = proto
            attempt.txn = proto.submit(job.envelope, self._ended_fast, attempt, ready=self._ready)
            return
        self._take_risk(attempt)
        d = self._mailer.send(job.envelope)
        d.addCallbacks(
            self._ended_slow, self._failed_slow, callbackArgs=(attempt,), errbackArgs=(attempt,)
        )

    def _ready(self, attempt: _Attempt) -> None:
        """The server asks for the data of a pipelined message."""
        if self._at_risk < self._risk_limit:
            self._release(attempt)
        else:
            self._held.append(attempt)

    def _take_risk(self, attempt: _Attempt) -> None:
        self._at_risk += 1
        attempt.at_risk = True

    def _release_held(self) -> None:
        held = self._held
        while held and self._at_risk < self._risk_limit:
            attempt = held.popleft()
            if attempt.ended:
                continue  # its connection failed while the data waited
            self._release(attempt)

    def _release(self, attempt: _Attempt) -> None:
        self._take_risk(attempt)
        proto, txn = attempt.proto, attempt.txn
        assert proto is not None
        assert txn is not None
        proto.release_body(txn)

    def _ended_fast(
        self, attempt: _Attempt, result: TransactionResult | None, error: DeliveryError | None
    ) -> None:
        proto = attempt.proto
        assert proto is not None
        attempt.proto = attempt.txn = None
        self._mailer.pool.release(proto)
        if self.ended:
            return
        job = attempt.job
        try:
            if result is not None and result.accepted_all:
                recorded = self._sent(job, result.code, result.text)
            else:
                # The library's own bookkeeping turns replies or an error into per-recipient
                # outcomes, as Mailer.send would have.
                delivery = _Delivery(job.envelope)
                delivery.start_attempt()  # the loop's own attempt (the Mailer makes one each)
                if result is not None:
                    self._mailer._on_transaction(result, delivery)
                else:
                    assert error is not None
                    self._mailer._on_failure(Failure(error), delivery)
                recorded = self._settle(job, delivery.result(), delivery.error)
        except BaseException:
            self._fail(Failure())
            return
        self._recording_started(attempt, recorded)

    def _ended_slow(self, result: SendResult, attempt: _Attempt) -> None:
        self._settle_slow(attempt, result, None)

    def _failed_slow(self, failure: Failure, attempt: _Attempt) -> None:
        error = failure.value
        if isinstance(error, DeliveryError):
            self._settle_slow(attempt, getattr(error, "result", None), error)
        else:  # a bug, not a delivery outcome: fail the row, keep going
            self._settle_slow(attempt, None, DeliveryError(f"internal error: {error!r}"))

    def _settle_slow(
        self, attempt: _Attempt, result: SendResult | None, error: DeliveryError | None
    ) -> None:
        if self.ended:
            return
        try:
            recorded = self._settle(attempt.job, result, error)
        except BaseException:  # recording could not even start: the run fails with it
            self._fail(Failure())
            return
        self._recording_started(attempt, recorded)

    def _recording_started(self, attempt: _Attempt, recorded: defer.Deferred[None]) -> None:
        attempt.ended = True
        self._in_flight -= 1
        self._recording += 1
        recorded.addCallbacks(self._committed, self._fail, callbackArgs=(attempt,))
        self.pump()

    def _committed(self, _: None, attempt: _Attempt) -> None:
        self._attempts.discard(attempt)
        self._recording -= 1
        if attempt.at_risk:
            attempt.at_risk = False
            self._at_risk -= 1
            self._release_held()
        self.pump()

    # ------------------------------------------------------------------ the end

    def _idle(self) -> None:
        if self._in_flight or self._recording:
            return
        delay = self._more_in()
        if delay is None:
            self._finish()
        else:
            self._alarm.within(delay)

    def _abandon(self) -> None:
        # Data held back must not wait for commits that will not come: dropping those
        # connections makes the server discard the unfinished messages.
        for attempt in list(self._attempts):
            if attempt.proto is not None and attempt.txn is not None:
                attempt.proto.cancel(attempt.txn)
