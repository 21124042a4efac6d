"""The state of deliveries in progress: one message's attempts, and a streaming ``send_many``."""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Callable, Iterable, Iterator
from email.message import EmailMessage
from typing import TYPE_CHECKING, TypeAlias

from twisted.internet import defer
from twisted.python.failure import Failure

from ._twisted import Pump
from .errors import DeliveryError, MessageError
from .message import Envelope
from .results import RecipientOutcome, SendReport, SendResult
from .smtp._protocol import MailerProtocol
from .smtp._transaction import TransactionResult, _Txn

if TYPE_CHECKING:
    from .mailer import Mailer

__all__ = ["MessageLike", "OnResult"]

MessageLike: TypeAlias = EmailMessage | Envelope | tuple[str, Iterable[str], bytes]
OnResult: TypeAlias = Callable[[int, SendResult | Exception], None]


class _Delivery:
    """One message's progress through its attempts."""

    __slots__ = (
        "attempts",
        "envelope",
        "error",
        "final",
        "index",
        "outcomes",
        "retry_at",
        "sent_all",
    )

    def __init__(self, envelope: Envelope, index: int = 0) -> None:
        self.envelope = envelope
        self.index = index
        self.attempts = 0
        self.outcomes: list[RecipientOutcome | None] = [None] * len(envelope.recipients)
        self.final: TransactionResult | None = None
        self.error: DeliveryError | None = None
        self.retry_at = 0.0
        # The first attempt delivered to every recipient: `outcomes` is filled in by result().
        self.sent_all = False

    def start_attempt(self) -> Envelope:
        """Count a new attempt; the envelope it sends (every recipient not yet settled)."""
        self.attempts += 1
        return self.envelope if self.attempts == 1 else self.pending_envelope()

    def pending_envelope(self) -> Envelope:
        """The envelope restricted to recipients not yet settled."""
        if all(o is None or o.status == "deferred" for o in self.outcomes):
            return self.envelope
        rcpts = tuple(
            r
            for r, o in zip(self.envelope.recipients, self.outcomes, strict=True)
            if o is None or o.status == "deferred"
        )
        return dataclasses.replace(self.envelope, recipients=rcpts)

    @property
    def done(self) -> bool:
        return self.sent_all or all(o is not None and o.status != "deferred" for o in self.outcomes)

    def settle_deferred(self) -> None:
        """Attempts are exhausted: recipients still deferred have failed."""
        for o in self.outcomes:
            if o is not None and o.status == "deferred":
                o.status = "failed"

    def result(self) -> SendResult:
        final = self.final
        if self.sent_all:
            assert final is not None
            outcomes = [
                RecipientOutcome(str(r.recipient), "sent", r.code, r.enhanced, r.text, 1)
                for r in final.recipients
            ]
        else:
            outcomes = [o for o in self.outcomes if o is not None]
        return SendResult(
            sender=str(self.envelope.sender),
            recipients=outcomes,
            code=final.code if final else None,
            response=final.text if final else "",
            attempts=self.attempts,
            message_id=self.envelope.message_id,
            error=self.error,
        )


def _count_result(
    result: SendResult, index: int, report: SendReport, on_result: OnResult | None
) -> None:
    report.add(result)
    if not result.ok:
        bad = result.rejected[0]
        report.note_error(index, f"{bad.recipient}: {bad.code or ''} {bad.response}".strip())
    if on_result is not None:
        on_result(index, result)


def _count_invalid(
    report: SendReport, index: int, error: Exception, on_result: OnResult | None
) -> None:
    report.invalid += 1
    report.note_error(index, str(error))
    if on_result is not None:
        on_result(index, error)


class _Run(Pump):
    """A streaming ``send_many``: keeps up to ``limit`` attempts in flight from one iterator.

    Each finished attempt takes the next item right away, inside the reply that finished it, so
    the next message's commands go out with that connection's next write. With a free pooled
    connection and no rate limit an attempt is a plain callback from the connection
    (:meth:`MailerProtocol.submit`); otherwise it goes through :meth:`Mailer._attempt`.
    """

    def __init__(
        self,
        mailer: Mailer,
        items: Iterator[tuple[int, MessageLike]],
        report: SendReport,
        on_result: OnResult | None,
    ) -> None:
        self.mailer = mailer
        self.items = items
        self.exhausted = False
        self.report = report
        self.on_result = on_result
        self.parked: list[tuple[float, int, _Delivery]] = []
        self.max_parked = max(1000, 50 * mailer.concurrency)
        # Enough attempts in flight to keep every connection's pipeline full.
        self.limit = mailer.concurrency * mailer.pool.depth
        self.in_flight = 0
        # What is in flight, for cancellation: bulk transactions and slow-path Deferreds.
        self.txns: dict[_Delivery, tuple[MailerProtocol, _Txn | None]] = {}
        self.slow: set[defer.Deferred[None]] = set()
        super().__init__(mailer._clock, defer.Deferred(self._cancel))
        self._fast = mailer._bucket is None and mailer._domains is None

    def _start_one(self) -> bool:
        if self.in_flight >= self.limit:
            return False
        delivery = self._next()
        if delivery is None:
            return False
        self.in_flight += 1
        self._attempt(delivery)
        return True

    def _attempt(self, delivery: _Delivery) -> None:
        mailer = self.mailer
        if self._fast:
            proto = mailer.pool.acquire_now()
            if proto is not None:
                # No handle yet: the connection may end the transaction before submit returns.
                self.txns[delivery] = (proto, None)
                txn = proto.submit(delivery.start_attempt(), self._submitted, delivery)
                if delivery in self.txns:  # not already ended
                    self.txns[delivery] = (proto, txn)
                return
        d = mailer._attempt(delivery)
        self.slow.add(d)
        d.addBoth(self._slow_ended, delivery, d)

    def _submitted(
        self, delivery: _Delivery, result: TransactionResult | None, error: DeliveryError | None
    ) -> None:
        proto, _ = self.txns.pop(delivery)
        mailer = self.mailer
        mailer.pool.release(proto)
        if self.ended:
            return
        try:
            if result is not None:
                mailer._on_transaction(result, delivery)
            else:
                assert error is not None
                mailer._on_failure(Failure(error), delivery)
        except BaseException:  # a bug: fail the run, not the connection that called us
            self._fail(Failure())
            return
        self._ended_attempt(delivery)

    def _slow_ended(self, outcome: object, delivery: _Delivery, d: defer.Deferred[None]) -> None:
        self.slow.discard(d)
        if isinstance(outcome, Failure):
            self._fail(outcome)
        elif not self.ended:
            self._ended_attempt(delivery)

    def _ended_attempt(self, delivery: _Delivery) -> None:
        self.in_flight -= 1
        try:
            if delivery.sent_all and self.on_result is None:
                self.report.count_sent(len(delivery.envelope.recipients), delivery.attempts)
            elif delivery.done:
                _count_result(delivery.result(), delivery.index, self.report, self.on_result)
            else:
                heapq.heappush(self.parked, (delivery.retry_at, delivery.index, delivery))
        except BaseException:  # on_result raised: the run fails with it, as a worker would
            self._fail(Failure())
            return
        self.pump()

    def _next(self) -> _Delivery | None:
        """A parked delivery that is due, else the next item from the iterator."""
        clock = self.mailer._clock
        if self.parked:
            due, _, delivery = self.parked[0]
            if due <= clock.seconds():
                heapq.heappop(self.parked)
                return delivery
            if len(self.parked) >= self.max_parked:
                return None
        while not self.exhausted:
            try:
                index, item = next(self.items)
            except StopIteration:
                self.exhausted = True
                break
            try:
                envelope = self.mailer._prepare(item)
            except MessageError as e:
                _count_invalid(self.report, index, e, self.on_result)
                continue
            return _Delivery(envelope, index)
        return None

    def _idle(self) -> None:
        """Finish when everything is settled; else wake up for the next parked retry."""
        if self.in_flight >= self.limit:
            return
        if self.parked:
            # The soonest retry may have been parked after the wake-up was set for a later one.
            delay = max(0.0, self.parked[0][0] - self.mailer._clock.seconds())
            self._alarm.within(delay)
        elif self.exhausted and self.in_flight == 0:
            self._finish()

    def _cancel(self, _: defer.Deferred[None]) -> None:
        # Ended first: what the cancellations below report is then ignored, and Deferred.cancel
        # fails `done` with its CancelledError.
        self._end()
        for proto, txn in list(self.txns.values()):
            if txn is not None:
                proto.cancel(txn)
        for d in list(self.slow):
            d.cancel()
