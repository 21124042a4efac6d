"""The library's door: messages from ``send`` / ``send_many`` in, results and a report out.

Retries are kept in memory (:class:`~twistmail.engine.Parked`); each message's outcome goes to
the :class:`~twistmail.results.SendReport` and, if given, the caller's ``on_result``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypeAlias

from twisted.internet.interfaces import IReactorTime

from .engine import Job, Parked
from .errors import DeliveryError, MessageError
from .message import Envelope, MessageLike
from .results import RecipientOutcome, SendReport, SendResult
from .retry import Plan, RetryPolicy
from .smtp._transaction import TransactionResult

__all__ = ["MessageLike", "MessagesDoor", "OnResult", "count_invalid", "count_result"]

OnResult: TypeAlias = Callable[[int, SendResult | Exception], None]


class _MessageJob(Job):
    __slots__ = ("error", "final", "given", "index", "outcomes")

    def __init__(self, envelope: Envelope, index: int) -> None:
        # Job's fields set here rather than through super(): one call less for every message.
        self.envelope = self.given = envelope
        self.attempts = 0
        self.refused = None
        self._handle = None
        self._at_risk = False
        self.index = index
        # outcomes, final and error are set by the first note(): a message sent at the first
        # try never needs them.

    def note(self, outcome: Plan) -> None:
        """Keep what an attempt settled for its recipients."""
        outcomes: dict[str, RecipientOutcome] | None = getattr(self, "outcomes", None)
        if outcomes is None:
            outcomes = {}
            self.outcomes = outcomes
            self.final: TransactionResult | None = None
            self.error: DeliveryError | None = None
        for o in outcome.outcomes:
            outcomes[o.recipient] = o
        if outcome.result is not None:
            self.final = outcome.result
            self.error = None
        else:
            self.error = outcome.error

    def result(self, stopped_by: DeliveryError | None = None) -> SendResult:
        """The message's result; recipients never settled fail with ``stopped_by``."""
        outcomes: dict[str, RecipientOutcome] = getattr(self, "outcomes", None) or {}
        recipients = []
        for address in self.given.recipients:
            rcpt = str(address)
            outcome = outcomes.get(rcpt)
            if outcome is None or (stopped_by is not None and outcome.status == "deferred"):
                assert stopped_by is not None
                outcome = RecipientOutcome(
                    rcpt,
                    "failed",
                    stopped_by.code,
                    stopped_by.enhanced,
                    stopped_by.response or str(stopped_by),
                    self.attempts,
                    shared=True,
                )
            recipients.append(outcome)
        final: TransactionResult | None = getattr(self, "final", None)
        return SendResult(
            sender=str(self.given.sender),
            recipients=recipients,
            code=final.code if final else None,
            response=final.text if final else "",
            attempts=self.attempts,
            message_id=self.given.message_id,
            error=stopped_by or getattr(self, "error", None),
        )


class MessagesDoor:
    """Jobs from an iterator of ``(index, message)`` (or one envelope: :meth:`single`),
    outcomes counted.

    ``policy`` is the retry policy the loop plans with (None: temporary failures are final
    and stay ``deferred``, the caller owns retries).
    """

    def __init__(
        self,
        items: Iterator[tuple[int, MessageLike]] | None,
        prepare: Callable[[MessageLike], Envelope],
        report: SendReport | None,
        on_result: OnResult | None,
        clock: IReactorTime,
        policy: RetryPolicy | None,
        *,
        max_parked: int = 1000,
    ) -> None:
        self._items: Iterator[tuple[int, MessageLike]] | None = items
        self._prepare = prepare
        self._report = report
        self._on_result = on_result
        self._parked = Parked(clock, max_parked)
        self.policy = policy
        self._single: _MessageJob | None = None
        self._single_result: SendResult | None = None

    @classmethod
    def single(
        cls, envelope: Envelope, clock: IReactorTime, policy: RetryPolicy | None, index: int = 0
    ) -> MessagesDoor:
        """A door for one message; :meth:`single_result` once its loop has ended."""
        door = cls(None, lambda m: envelope, None, None, clock, policy)
        door._single = job = _MessageJob(envelope, index)
        door._parked.again(job)
        return door

    def single_result(self) -> SendResult:
        """The result of the one message of a :meth:`single` door."""
        result = self._single_result
        if result is None:
            job = self._single
            assert job is not None
            result = job.result(self.stopped_by)
        return result

    stopped_by: DeliveryError | None = None

    # ------------------------------------------------------------------ Door

    def next_job(self) -> Job | None:
        parked = self._parked
        if parked.waiting:
            job = parked.pop_due()
            if job is not None:
                return job
            if parked.full:
                return None
        items = self._items
        if items is None:
            return None
        prepare = self._prepare
        for index, item in items:
            try:
                envelope = prepare(item)
            except MessageError as e:
                assert self._report is not None
                count_invalid(self._report, index, e, self._on_result)
                continue
            return _MessageJob(envelope, index)
        self._items = None
        return None

    def wake_in(self) -> float | None:
        due = self._parked.due_in()
        if due is not None or self._items is None:
            return due
        return 0.0

    def record(self, job: Job, outcome: Plan) -> None:
        assert isinstance(job, _MessageJob)
        report = self._report
        if (
            outcome.state == "sent"
            and job.attempts == 1
            and self._on_result is None
            and report is not None
        ):
            report.count_sent(len(job.envelope.recipients), 1)
            return
        job.note(outcome)
        if outcome.state == "deferred" and self.policy is not None:
            self._parked.park(job, outcome.delay)
            return
        result = job.result()
        if report is None:
            self._single_result = result
        else:
            count_result(result, job.index, report, self._on_result)

    def put_back(self, job: Job) -> None:
        self._parked.again(job)

    def stopped(self, error: DeliveryError | None) -> None:
        """The loop ended; if ``error`` stopped it, every message not settled fails with it."""
        if error is None:
            return
        self.stopped_by = error
        report = self._report
        if report is None:
            return
        for job in self._parked.drain():
            assert isinstance(job, _MessageJob)
            count_result(job.result(error), job.index, report, self._on_result)
        items, self._items = self._items, None
        for index, item in items or ():
            try:
                envelope = self._prepare(item)
            except MessageError as e:
                count_invalid(report, index, e, self._on_result)
                continue
            count_result(_MessageJob(envelope, index).result(error), index, report, self._on_result)


def count_result(
    result: SendResult, index: int, report: SendReport, on_result: OnResult | None
) -> None:
    """Count one finished message in ``report`` and pass it to ``on_result``."""
    report.add(result)
    if not result.ok:
        bad = result.rejected[0]
        report.note_error(index, f"{bad.recipient}: {bad.code or ''} {bad.response}".strip())
    if on_result is not None:
        on_result(index, result)


def count_invalid(
    report: SendReport, index: int, error: Exception, on_result: OnResult | None
) -> None:
    """Count one item that could not be made into a message."""
    report.invalid += 1
    report.note_error(index, str(error))
    if on_result is not None:
        on_result(index, error)
