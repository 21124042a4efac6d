"""The one delivery loop behind every door: jobs in, one attempt each, planned outcomes out.

A *door* is a source of jobs and a sink of outcomes: ``send_many`` (an iterable in, a report
out), ``twistmail send`` (CSV rows in, the journal out), ``twistmail drain`` and the workers
(queue claims in, the queue out). :class:`DeliveryLoop` takes jobs from its door while the
sender has room, makes one attempt at each through :meth:`twistmail.Mailer.attempt` (pooled,
pipelined connections), decides what the attempt settled with :func:`twistmail.retry.plan` and
hands that :class:`~twistmail.retry.Plan` to the door, which records it (and, for a deferral,
brings the job back when it is due).

What every door gets from the loop:

- **The duplicate bound** (``hold_bodies=N``): a message's data goes out only while fewer than
  ``N`` messages whose data went out wait for their outcome to be committed by the door. A
  process killed at any moment can then have delivered at most ``N`` messages it has no record
  of. Meanwhile the next envelopes are already pipelined: the server's request for data just
  waits.
- **No attempt spent on a message the server never saw.** A message queued on a connection
  that broke before its turn is given back to the door and tried again at once, uncounted.
- **Server-level refusals stop or pause the run**, not every message: a refused login or a
  failed TLS check stops it at once (:attr:`DeliveryLoop.stopped_by`); a server that cannot be
  reached pauses it with a growing backoff, messages given back uncounted, and stops it once
  the backoff has waited ``patience`` seconds in a row without a session.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from ._twisted import Pump
from .errors import ConnectionLostError, DeliveryError, PermanentError
from .message import Envelope
from .results import RecipientOutcome
from .retry import Plan, RetryPolicy, plan
from .smtp._transaction import TransactionResult

__all__ = ["DeliveryLoop", "Door", "Job", "Parked", "Sender", "SenderAttempt"]


class Job:
    """One message on its way: what is still to deliver, and what earlier attempts settled.

    Doors subclass it to carry their own reference (a CSV row, a queue claim, an index).
    """

    __slots__ = ("_at_risk", "_handle", "attempts", "envelope", "refused")

    def __init__(self, envelope: Envelope, attempts: int = 0) -> None:
        self.envelope = envelope
        """The recipients still to deliver (after a deferral: only those deferred)."""
        self.attempts = attempts
        """Attempts made so far (an attempt the server never saw is not counted)."""
        self.refused: RecipientOutcome | None = None
        """The first recipient refused for good by an earlier attempt."""
        self._handle: SenderAttempt | None = None
        self._at_risk = False


class SenderAttempt(Protocol):
    """One attempt in progress, as :meth:`Sender.attempt` returns it."""

    def release_body(self) -> None:
        """Send the data held back for this attempt (see ``ready``)."""

    def cancel(self) -> None:
        """Give up: the attempt ends (with a drop) if it already reached the server."""


Notify = Callable[[Any, TransactionResult | None, DeliveryError | None], None]


class Sender(Protocol):
    """What the loop needs of a :class:`twistmail.Mailer`."""

    @property
    def capacity(self) -> int:
        """Attempts worth having in flight at once (connections times pipeline depth)."""

    def attempt(
        self,
        envelope: Envelope,
        notify: Notify,
        context: Any,
        ready: Callable[[Any], None] | None = None,
    ) -> SenderAttempt:
        """Start one attempt; ``notify(context, result, error)`` ends it."""

    def abort(self) -> None:
        """Drop every connection now."""


class Door(Protocol):
    """A source of jobs and a sink of their outcomes."""

    def next_job(self) -> Job | None:
        """A job to attempt now, or None when none is ready."""

    def wake_in(self) -> float | None:
        """Asked when the loop is idle: seconds until a job may be ready (``math.inf``: the
        door calls :meth:`DeliveryLoop.pump` itself), or None when no job will come again."""

    def record(self, job: Job, outcome: Plan) -> defer.Deferred[None] | None:
        """Keep what an attempt settled; a Deferred firing once that is committed (None: at
        once). A deferred job is to come back from :meth:`next_job` once due."""

    def put_back(self, job: Job) -> None:
        """Take back a job whose attempt never reached the server: it is to be tried again
        (its attempts are not counted)."""


class Parked:
    """Jobs waiting for their retry time, soonest first; a door's in-memory retry queue.

    Also holds jobs given back untried, which come first.
    """

    def __init__(self, clock: IReactorTime, limit: int) -> None:
        self._clock = clock
        self.limit = limit
        """Park at most this many before the door stops taking new work."""
        self._heap: list[tuple[float, int, Job]] = []
        self._seq = itertools.count()
        self._again: deque[Job] = deque()
        self.waiting = 0
        """How many jobs wait (a plain attribute: doors read it for every job)."""

    def __len__(self) -> int:
        return self.waiting

    @property
    def full(self) -> bool:
        """As many jobs wait as the door should let wait: take no new ones."""
        return len(self._heap) >= self.limit

    def park(self, job: Job, delay: float) -> float:
        """Bring ``job`` back in ``delay`` seconds; the clock time it is due."""
        due = self._clock.seconds() + delay
        heapq.heappush(self._heap, (due, next(self._seq), job))
        self.waiting += 1
        return due

    def again(self, job: Job) -> None:
        """Bring ``job`` back before anything else (it was given back untried)."""
        self._again.append(job)
        self.waiting += 1

    def pop_due(self) -> Job | None:
        """A job given back or due now, else None."""
        if self._again:
            self.waiting -= 1
            return self._again.popleft()
        heap = self._heap
        if heap and heap[0][0] <= self._clock.seconds():
            self.waiting -= 1
            return heapq.heappop(heap)[2]
        return None

    def due_in(self) -> float | None:
        """Seconds until the soonest job is due (0 if one is), None if none waits."""
        if self._again:
            return 0.0
        if not self._heap:
            return None
        return max(0.0, self._heap[0][0] - self._clock.seconds())

    def drain(self) -> list[Job]:
        """Every waiting job, removed."""
        jobs = list(self._again) + [job for _, _, job in sorted(self._heap)]
        self._again.clear()
        self._heap.clear()
        self.waiting = 0
        return jobs


class DeliveryLoop(Pump):
    """Delivers the jobs of ``door`` through ``sender``; :meth:`start` fires once all ended.

    ``policy`` decides retries (:func:`~twistmail.retry.plan`; None: the door owns them).
    ``hold_bodies`` is the duplicate bound (None: data goes out at once). No new job starts
    while ``max_recording`` outcomes wait for their commit, or while ``limit`` attempts
    (default: the sender's capacity) are in flight. ``patience`` is how long, in seconds of
    backoff in a row, a server that cannot be reached is waited for; ``on_server(error,
    retry_in)`` hears of each pause (and ``(None, 0)`` once a session works again).

    :ivar stopped_by: the server-level error that stopped the run, if one did.
    :ivar server_error: the server-level error of the ongoing trouble, None once a session
        works again (for a progress display).
    """

    backoff_first = 1.0
    backoff_max = 30.0

    def __init__(
        self,
        sender: Sender,
        door: Door,
        policy: RetryPolicy | None,
        *,
        clock: IReactorTime,
        hold_bodies: int | None = None,
        max_recording: int | None = None,
        limit: int | None = None,
        patience: float = 60.0,
        on_server: Callable[[DeliveryError | None, float], None] | None = None,
    ) -> None:
        self._sender = sender
        self._attempt = sender.attempt
        self._door = door
        self._next_job = door.next_job
        self._notify = self._ended
        self._policy = policy
        self._clock = clock
        self._bound = hold_bodies
        self._ready = self._body_wanted if hold_bodies is not None else None
        self._limit = limit or sender.capacity
        self._max_recording = max_recording or max(1000, 50 * self._limit)
        self._patience = patience
        self._on_server = on_server
        self._in_flight: set[Job] = set()
        self._recording = 0
        self._at_risk = 0
        self._held: deque[Job] = deque()
        self._stopping = False
        self._paused_until = 0.0
        self._waited = 0.0
        self._backoff = 0.0
        self.stopped_by: DeliveryError | None = None
        self.server_error: DeliveryError | None = None
        super().__init__(clock, defer.Deferred(self._cancelled))

    # ------------------------------------------------------------------ control

    def stop(self) -> None:
        """Start no more jobs; those in flight finish and are recorded, then :meth:`start`'s
        Deferred fires."""
        self._stopping = True
        self.pump()

    def abort(self) -> None:
        """Start no more jobs and cut off those in flight (their outcome: a drop)."""
        self._stopping = True
        for job in list(self._in_flight):
            handle = job._handle
            if handle is not None:
                handle.cancel()
        self._sender.abort()
        self.pump()

    def fail(self, failure: Failure) -> None:
        """End the run with ``failure`` (a door whose store broke); in-flight work is dropped."""
        self._fail(failure)

    @property
    def in_flight(self) -> int:
        """Attempts started and not yet ended."""
        return len(self._in_flight)

    # ------------------------------------------------------------------ the loop

    def _start_one(self) -> bool:
        if (
            self._stopping
            or len(self._in_flight) >= self._limit
            or self._recording >= self._max_recording
        ):
            return False
        if self._paused_until:
            if self._clock.seconds() < self._paused_until:
                return False
            self._paused_until = 0.0
        job = self._next_job()
        if job is None:
            return False
        in_flight = self._in_flight
        in_flight.add(job)
        handle = self._attempt(job.envelope, self._notify, job, self._ready)
        if job in in_flight:  # not already ended
            job._handle = handle
        return True

    def _body_wanted(self, job: Job) -> None:
        """The server asks for a message's data: send it if the duplicate bound allows."""
        bound = self._bound
        assert bound is not None
        if self._at_risk < bound:
            # _take_risk, inline: the path of every message a door with a store delivers.
            self._at_risk += 1
            job._at_risk = True
            handle = job._handle
            assert handle is not None  # `attempt` has returned by the server's reply
            handle.release_body()
        else:
            self._held.append(job)

    def _take_risk(self, job: Job) -> None:
        self._at_risk += 1
        job._at_risk = True
        handle = job._handle
        # A server's request for data is a reply: `attempt` has returned the handle by then.
        assert handle is not None
        handle.release_body()

    def _release_held(self) -> None:
        bound = self._bound
        assert bound is not None
        held = self._held
        while held and self._at_risk < bound:
            job = held.popleft()
            if job in self._in_flight and job._handle is not None:
                self._take_risk(job)

    def _ended(
        self, job: Job, result: TransactionResult | None, error: DeliveryError | None
    ) -> None:
        """An attempt ended: settle it (plan, record, mind the bound) and start what fits."""
        self._in_flight.discard(job)
        job._handle = None
        if self.ended:
            return
        try:
            if (
                error is not None
                and not error.attempted
                and (error.transient or error.session_setup)
            ):
                self._untried(job, error)
            else:
                if self.server_error is not None:
                    self._server_back()
                attempts = job.attempts = job.attempts + 1
                if result is not None and result.accepted_all and job.refused is None:
                    outcome = Plan("sent", attempts, result)  # what plan() says, without the call
                else:
                    outcome = plan(
                        job.envelope.recipients,
                        result,
                        error,
                        attempts,
                        self._policy,
                        refused_before=job.refused,
                    )
                recorded = self._door.record(job, outcome)
                if outcome.state == "deferred":
                    job.refused = outcome.refused
                    job.envelope = _deferred_only(job.envelope, outcome)
                if recorded is not None:
                    self._recording += 1
                    recorded.addCallbacks(self._committed, self._fail, callbackArgs=(job,))
                elif job._at_risk:
                    self._unrisk(job)
        except BaseException:  # a bug in a door: fail the run, not the connection calling us
            self._fail(Failure())
            return
        self._refill()

    def _refill(self) -> None:
        """An attempt ended: start the next job in its place.

        :meth:`pump`, by a shorter way in the usual case (a full loop with a place just freed
        and a job ready): one start, without the pump's second look for room and its idle
        check, which every message would otherwise pay for.
        """
        if self._pumping:
            self._again = True
            return
        in_flight = self._in_flight
        if (
            self._stopping
            or self._paused_until
            or len(in_flight) + 1 != self._limit
            or self._recording >= self._max_recording
        ):
            self.pump()
            return
        self._pumping = True
        try:
            job = self._next_job()
            if job is not None:
                in_flight.add(job)
                handle = self._attempt(job.envelope, self._notify, job, self._ready)
                if job in in_flight:  # not already ended
                    job._handle = handle
        except BaseException:
            self._pumping = False
            self._fail(Failure())
            return
        self._pumping = False
        if job is None or self._again:
            self.pump()

    def _committed(self, _: None, job: Job) -> None:
        self._recording -= 1
        if job._at_risk:  # _unrisk, inline
            job._at_risk = False
            self._at_risk -= 1
            if self._held:
                self._release_held()
        # With every place taken the pump could neither start a job nor finish: only an
        # attempt ending makes room, and it pumps then.
        if len(self._in_flight) < self._limit:
            self.pump()

    def _unrisk(self, job: Job) -> None:
        if job._at_risk:
            job._at_risk = False
            self._at_risk -= 1
            if self._held:
                self._release_held()

    # ------------------------------------------------------------------ untried attempts

    def _untried(self, job: Job, error: DeliveryError) -> None:
        """The server never saw this job's message: give it back, and mind the server."""
        self._unrisk(job)
        self._door.put_back(job)
        if not error.session_setup:
            return  # a connection broke before the message's turn: another one will take it
        if isinstance(error, PermanentError):
            # Refused credentials, a failed certificate check: no message can get through.
            if self.stopped_by is None:
                self.stopped_by = error
            self._stopping = True
            return
        self.server_error = error
        if self._paused_until and self._clock.seconds() < self._paused_until:
            return  # attempts started before the pause, failing with the same trouble
        self._backoff = (
            self.backoff_first if not self._backoff else min(self.backoff_max, 2 * self._backoff)
        )
        if self._waited >= self._patience:
            if self.stopped_by is None:
                self.stopped_by = error
            self._stopping = True
            return
        self._waited += self._backoff
        self._paused_until = self._clock.seconds() + self._backoff
        self._alarm.within(self._backoff)
        if self._on_server is not None:
            self._on_server(error, self._backoff)

    def _server_back(self) -> None:
        self.server_error = None
        self._backoff = 0.0
        self._waited = 0.0
        self._paused_until = 0.0
        if self._on_server is not None:
            self._on_server(None, 0.0)

    # ------------------------------------------------------------------ the end

    def _idle(self) -> None:
        busy = bool(self._in_flight or self._recording)
        if (
            len(self._in_flight) >= self._limit
            or self._recording >= self._max_recording
            or (busy and self._stopping)
        ):
            return  # what ends next pumps again
        if self._stopping:
            self._finish()
            return
        if self._paused_until:
            self._alarm.within(max(0.0, self._paused_until - self._clock.seconds()))
            return
        delay = self._door.wake_in()
        if delay is None:
            if not busy:
                self._finish()
        elif delay != math.inf:
            self._alarm.within(delay)

    def _cancelled(self, _: defer.Deferred[None]) -> None:
        # Ended first: what the cancellations report is then ignored, and Deferred.cancel
        # fails `done` with its CancelledError.
        self._end()
        self._abandon()

    def _abandon(self) -> None:
        # Data held back must not wait for commits that will not come: dropping those
        # connections makes the server discard the unfinished messages.
        for job in list(self._in_flight):
            handle = job._handle
            if handle is not None:
                handle.cancel()


def _deferred_only(envelope: Envelope, outcome: Plan) -> Envelope:
    """``envelope`` for the recipients ``outcome`` deferred (all of them: itself)."""
    keep = {o.recipient for o in outcome.outcomes if o.status == "deferred"}
    if len(keep) == len(envelope.recipients):
        return envelope
    return dataclasses.replace(
        envelope, recipients=tuple(r for r in envelope.recipients if str(r) in keep)
    )


def untried(message: str, host: str | None = None) -> ConnectionLostError:
    """The error of an attempt given up before it reached the server."""
    return ConnectionLostError(message, host=host, attempted=False)
