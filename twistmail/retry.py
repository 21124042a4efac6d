"""Retry policy: which failures are retried, and how long to wait before the next attempt."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from .results import RecipientOutcome, RecipientStatus

if TYPE_CHECKING:
    from .address import Address
    from .errors import DeliveryError
    from .smtp._transaction import TransactionResult

__all__ = ["Plan", "PlanState", "RetryPolicy", "plan"]


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, up to ``max_attempts`` attempts in all.

    The wait after attempt ``n`` (1-based) is ``initial_delay * multiplier ** (n - 1)``, capped
    at ``max_delay``, then multiplied by a random factor in ``[1 - jitter, 1 + jitter]`` so that
    many messages deferred together do not come back together.
    """

    max_attempts: int = 5
    initial_delay: float = 5.0
    max_delay: float = 600.0
    multiplier: float = 2.0
    jitter: float = 0.2
    rng: Callable[[], float] = field(default=random.random, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.initial_delay < 0 or self.max_delay < 0:
            raise ValueError("retry delays cannot be negative")
        if not 0 <= self.jitter < 1:
            raise ValueError("jitter must be in [0, 1)")

    def can_retry(self, attempts_made: int) -> bool:
        """Whether another attempt is allowed after ``attempts_made`` attempts."""
        return attempts_made < self.max_attempts

    def delay(self, attempts_made: int) -> float:
        """Seconds to wait after ``attempts_made`` attempts before the next one."""
        base = min(
            self.max_delay, self.initial_delay * self.multiplier ** max(0, attempts_made - 1)
        )
        if not self.jitter:
            return base
        return base * (1 - self.jitter + 2 * self.jitter * self.rng())


PlanState = Literal["sent", "deferred", "failed"]


class Plan:
    """What one delivery attempt settled, decided once for every door (see :func:`plan`).

    ``state`` is ``"sent"`` (every recipient tried was accepted and nothing was refused
    before), ``"deferred"`` (some recipients are to be tried again in ``delay`` seconds: only
    those whose ``outcomes`` say ``"deferred"``) or ``"failed"`` (nothing is left to try and a
    recipient was refused, now or by an earlier attempt).

    ``outcomes`` gives each tried recipient's fate in this attempt, in envelope order; it is
    made only when asked for when every recipient was accepted.
    """

    __slots__ = ("_outcomes", "attempts", "delay", "error", "refused", "result", "state")

    def __init__(
        self,
        state: PlanState,
        attempts: int,
        result: TransactionResult | None = None,
        error: DeliveryError | None = None,
        outcomes: list[RecipientOutcome] | None = None,
        delay: float = 0.0,
        refused: RecipientOutcome | None = None,
    ) -> None:
        self.state = state
        self.attempts = attempts
        self.result = result
        self.error = error
        self._outcomes = outcomes
        self.delay = delay
        self.refused = refused
        """The first recipient refused for good (now or before), for a ``failed`` plan."""

    @property
    def outcomes(self) -> list[RecipientOutcome]:
        """Each tried recipient's outcome in this attempt, in the envelope's order."""
        if self._outcomes is None:
            result = self.result
            assert result is not None
            self._outcomes = [
                RecipientOutcome(
                    str(r.recipient), "sent", r.code, r.enhanced, r.text, self.attempts, r.shared
                )
                for r in result.recipients
            ]
        return self._outcomes

    @property
    def code(self) -> int | None:
        """The reply code worth reporting: the refusal, the deferral, or the final reply."""
        if self.state != "sent":  # a sent plan names no problem (one call fewer a message)
            problem = self.problem
            if problem is not None:
                return problem.code
        return self.result.code if self.result is not None else None

    @property
    def response(self) -> str:
        """The reply text worth reporting, naming the recipient for a refusal or deferral."""
        if self.state != "sent":
            problem = self.problem
            if problem is not None:
                return f"{problem.recipient}: {problem.response}" if problem.response else ""
        return self.result.text if self.result is not None else ""

    @property
    def problem(self) -> RecipientOutcome | None:
        """The recipient outcome a report names: the refusal of a failed plan, the first
        deferral of a deferred one; None for a sent one."""
        if self.state == "sent":
            return None
        if self.state == "failed":
            return self.refused
        return next((o for o in self.outcomes if o.status == "deferred"), None)

    def __repr__(self) -> str:
        return f"<Plan {self.state} attempts={self.attempts} delay={self.delay:g}>"


def plan(
    tried: Sequence[Address],
    result: TransactionResult | None,
    error: DeliveryError | None,
    attempts: int,
    policy: RetryPolicy | None,
    *,
    refused_before: RecipientOutcome | None = None,
) -> Plan:
    """Decide what one attempt at a message settled: sent, deferred until later, or failed.

    ``tried`` are the recipients of the attempt; ``result`` is the server's per-recipient
    replies to them, or ``error`` the failure that ended the
    attempt (a drop, a timeout, a refused connection: it applies to every recipient tried).
    ``attempts`` counts this attempt. A 2xx reply sends a recipient; a 4xx reply or a
    transient error defers it while ``policy`` allows another attempt (after
    ``policy.delay(attempts)`` seconds) and fails it once attempts run out; a 5xx reply or a
    permanent error fails it. With ``policy=None`` the caller owns retries: temporary failures
    stay ``deferred`` whatever the count. ``refused_before`` is a recipient an earlier attempt
    refused for good: the message then ends ``failed`` once nothing is left to try.
    """
    if result is not None and result.accepted_all and refused_before is None:
        return Plan("sent", attempts, result=result)
    can_retry = policy is None or policy.can_retry(attempts)
    outcomes: list[RecipientOutcome] = []
    deferred = False
    refused = refused_before
    if result is not None:
        for reply in result.recipients:
            code = reply.code
            if 200 <= code < 300:
                status: RecipientStatus = "sent"
                text = reply.text
            elif 400 <= code < 500:
                status, text = _temporary(reply.text, can_retry, attempts)
            else:
                status, text = "failed", reply.text
            outcome = RecipientOutcome(
                str(reply.recipient), status, code, reply.enhanced, text, attempts, reply.shared
            )
            outcomes.append(outcome)
            deferred = deferred or status == "deferred"
            if status == "failed" and refused is None:
                refused = outcome
    else:
        assert error is not None
        # The error's description: what happened, the server's reply if any, and the host.
        reason = str(error)
        if error.transient:
            status, reason = _temporary(reason, can_retry, attempts)
        else:
            status = "failed"
        # An error ends the session: it is never one recipient's own answer.
        outcomes = [
            RecipientOutcome(str(rcpt), status, error.code, error.enhanced, reason, attempts, True)
            for rcpt in tried
        ]
        deferred = status == "deferred"
        if status == "failed" and refused is None and outcomes:
            refused = outcomes[0]
    if deferred:
        delay = policy.delay(attempts) if policy is not None else 0.0
        return Plan(
            "deferred",
            attempts,
            result=result,
            error=error,
            outcomes=outcomes,
            delay=delay,
            refused=refused,
        )
    state: PlanState = "failed" if refused is not None else "sent"
    return Plan(state, attempts, result=result, error=error, outcomes=outcomes, refused=refused)


def _temporary(text: str, can_retry: bool, attempts: int) -> tuple[RecipientStatus, str]:
    if can_retry:
        return "deferred", text
    return "failed", f"{text} (gave up after {attempts} attempts)".lstrip()
