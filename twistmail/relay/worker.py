"""The relay's delivery worker: the drain door kept running, woken instead of polling.

:class:`RelayWorker` is :class:`~twistmail.queue.worker.Drain` (claims in, outcomes recorded in
the queue, the duplicate bound) that does not end when nothing is due: it sleeps until
:meth:`RelayWorker.wake` (a message was committed) or until the queue's earliest due time
(:meth:`~twistmail.interfaces.IQueue.next_due`), whichever comes first, and never stops on an
unreachable upstream (the loop backs off; messages are given back without an attempt counted).

A message still undelivered ``max_age`` seconds after it came in fails instead of being
deferred again (Postfix's ``maximal_queue_lifetime``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from ..engine import Job, Sender
from ..interfaces import IQueue, ISuppressionList
from ..queue.records import ClaimedMessage, Outcome
from ..queue.worker import Drain, _ClaimJob
from ..retry import Plan, RetryPolicy

__all__ = ["RelayWorker"]

log = Logger()


class RelayWorker(Drain):
    """Delivers from ``spool`` until stopped (see the module's docstring).

    ``age(claimed)`` fires with how long ago a claimed message was queued, in seconds (None:
    unknown); ``on_outcome`` hears of every recorded attempt.
    """

    def __init__(
        self,
        spool: IQueue,
        mailer: Sender,
        *,
        retry: RetryPolicy,
        owner: str,
        max_age: float,
        age: Callable[[ClaimedMessage], defer.Deferred[float | None]],
        reactor: IReactorTime,
        lease: float = 300.0,
        on_outcome: Callable[[ClaimedMessage, Outcome], None] | None = None,
        suppression: ISuppressionList | None = None,
    ) -> None:
        super().__init__(
            spool,
            mailer,
            retry=retry,
            owner=owner,
            lease=lease,
            patience=math.inf,
            on_outcome=on_outcome,
            reactor=reactor,
            suppression=suppression,
        )
        self.max_age = max_age
        self._age = age
        self._timer: IDelayedCall | None = None
        self._asking: defer.Deferred[Any] | None = None
        self._ask_again = False
        self.enhanced: dict[int, dict[str, str | None]] = {}
        """Enhanced status codes of the failed recipients of a message just failed, by queue
        id and recipient (taken with ``enhanced.pop(id)`` by whoever reports the failure)."""
        self._running = False
        self._stopped = False
        self._loop._on_server = self._upstream_changed  # the drain's loop, told of outages

    @property
    def upstream_error(self) -> str | None:
        """What is wrong with the upstream (unreachable, refusing), None while it works."""
        error = self._loop.server_error
        return None if error is None else str(error)

    def _upstream_changed(self, error: object, retry_in: float) -> None:
        if error is None:
            log.info("the upstream works again")
        else:
            log.warn(
                "the upstream cannot be reached, messages stay queued (next try in {delay:g} s): "
                "{error}",
                delay=retry_in,
                error=str(error),
            )

    @property
    def running(self) -> bool:
        """Whether the worker is delivering (started and not stopped)."""
        return self._running

    def run(self) -> defer.Deferred[Any]:
        """Deliver until :meth:`stop`/:meth:`abort`; fires with the report once stopped."""
        self._running = True

        def ended(result: object) -> object:
            self._running = False
            self._cancel_timer()
            return result

        return super().run().addBoth(ended)

    def stop(self) -> None:
        """Claim nothing more; deliveries in flight finish and are recorded."""
        self._stopped = True
        self._cancel_timer()
        super().stop()

    def abort(self) -> None:
        """Claim nothing more and cut off deliveries in flight (they stay queued)."""
        self._stopped = True
        self._cancel_timer()
        super().abort()

    def wake(self) -> None:
        """New messages were committed: claim them now if the worker sleeps."""
        if self._stopped or not self._exhausted:
            return
        self._cancel_timer()
        self._exhausted = False
        self._loop.pump()

    # ------------------------------------------------------------------ the door

    def wake_in(self) -> float | None:
        """Never "no more jobs" while running: sleep until woken or the next due time."""
        if not self._stopped and self._exhausted:
            self._sleep()
        if self._stopped:
            return super().wake_in()
        delay = super().wake_in()
        return math.inf if delay is None else delay

    def record(self, job: Job, plan: Plan) -> defer.Deferred[None]:
        """As the drain, but a deferral of a message older than ``max_age`` fails it."""
        assert isinstance(job, _ClaimJob)
        if plan.state != "deferred":
            if plan.state == "failed":
                self._keep_enhanced(job.claimed.id, plan)
            return super().record(job, plan)

        def decide(age: float | None) -> defer.Deferred[None]:
            settled = plan
            if age is not None and age + plan.delay > self.max_age:
                settled = expired(plan, self.max_age)
                self._keep_enhanced(job.claimed.id, settled)
            return Drain.record(self, job, settled)

        return self._age(job.claimed).addCallback(decide)

    def _keep_enhanced(self, message: int, plan: Plan) -> None:
        # The queue keeps reply codes and texts, not enhanced status codes: a notification
        # about this failure (read by on_outcome right after the record) wants them.
        self.enhanced[message] = {o.recipient: o.enhanced for o in plan.outcomes}

    def _claimed(self, claimed: list[ClaimedMessage]) -> defer.Deferred[None] | None:
        # Unlike a one-pass drain, a message deferred earlier in this run is attempted again
        # whenever it is due, and the run is not bounded by what waited at its start.
        self._attempted.clear()
        return super()._claimed(claimed)

    def _claim(self) -> None:
        self._waiting_at_start = self.report.claimed + self.batch
        super()._claim()

    def _claim_failed(self, failure: Any) -> None:
        # A store that cannot be written now (locked, disk full) is tried again shortly: the
        # relay keeps running and its health shows the problem.
        self._claiming = None
        self._exhausted = True
        log.failure("claiming from the queue failed; trying again in 5 s", failure)
        if not self._stopped and self._timer is None:
            self._timer = self._reactor.callLater(5.0, self._due)

    # ------------------------------------------------------------------ sleeping

    def _sleep(self) -> None:
        """Nothing was due: ask the queue when something will be, and wake then.

        Asked again each time the loop goes idle (an outcome committed since may have made
        a message due sooner); an answer that arrives while a newer question is pending is
        dropped in favour of the newer one.
        """
        if self._asking is not None:
            self._ask_again = True
            return
        self._ask_again = False
        self._asking = asking = self.spool.next_due()

        def answered(delay: float | None) -> None:
            self._asking = None
            if self._ask_again:
                self._sleep()
                return
            if self._stopped or not self._exhausted:
                return
            self._cancel_timer()
            if delay is None:
                return  # nothing waits: only wake() starts the worker again
            self._timer = self._reactor.callLater(max(delay, 0.01), self._due)

        def failed(failure: Any) -> None:
            self._asking = None
            log.failure("asking the queue for its next due time failed", failure)

        asking.addCallbacks(answered, failed)

    def _due(self) -> None:
        self._timer = None
        self.wake()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


def expired(deferral: Plan, max_age: float) -> Plan:
    """``deferral`` turned into a failure: the message would outlive ``max_age`` seconds."""
    note = f" (expired: not delivered within {max_age / 86400:g} days)"
    outcomes = [
        dataclasses.replace(o, status="failed", response=o.response + note)
        if o.status == "deferred"
        else o
        for o in deferral.outcomes
    ]
    refused = deferral.refused or next(o for o in outcomes if o.status == "failed")
    return Plan(
        "failed",
        deferral.attempts,
        result=deferral.result,
        error=deferral.error,
        outcomes=outcomes,
        refused=refused,
    )
