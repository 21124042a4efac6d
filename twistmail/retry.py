"""Retry policy: which failures are retried, and how long to wait before the next attempt."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["RetryPolicy"]


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
