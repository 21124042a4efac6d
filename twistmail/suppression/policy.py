"""Which refusals suppress an address, and the guard against suppressing a whole list.

A hard bounce suppresses its recipient only when it is about that recipient: enhanced status
5.1.1 (no such mailbox), 5.1.3 (bad address syntax), 5.1.6 (mailbox moved) or 5.1.10 (the
recipient's domain accepts no mail, a null MX, RFC 7505; Microsoft 365 also writes it for an
address that does not exist), whether a server refused it at RCPT or a DSN reported it.
5.1.0, 5.1.7 and 5.1.8 are about our sender; a reply without an enhanced status code says too
little. Nor does a reply that answered the whole transaction rather than the recipient
(:attr:`~twistmail.results.RecipientOutcome.shared`): a refused MAIL FROM is about the sender,
and the one reply to the data of a message with several recipients cannot say which of them
it means. Either way nothing is suppressed.

:class:`BounceGuard` holds those hard bounces until the batch they came in is complete, and
drops them all when most of the batch was refused at once: a server refusing everyone (a bad
``--from``, a misconfigured upstream) must not suppress a whole list. A batch is ``window``
consecutive recipient outcomes (accepted or refused), or what came before the sender went
idle (:meth:`BounceGuard.close_batch`), within ``max_wait`` seconds, or what is left when the
run ends (:meth:`BounceGuard.flush`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Final

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..interfaces import ISuppressionList
from ..results import RecipientOutcome
from .records import HARD_BOUNCE, Suppression

__all__ = [
    "RECIPIENT_HARD_BOUNCES",
    "SENDER_PROBLEMS",
    "BounceGuard",
    "is_recipient_hard_bounce",
    "suppresses",
]

log = Logger()

RECIPIENT_HARD_BOUNCES: Final = frozenset({"5.1.1", "5.1.3", "5.1.6", "5.1.10"})
"""Enhanced status codes saying the recipient's address is bad (RFC 3463, RFC 7505): the one
list for refusals at RCPT and for DSNs."""
SENDER_PROBLEMS: Final = frozenset({"5.1.0", "5.1.7", "5.1.8"})
"""Enhanced status codes about our sender address: never suppress anyone for them."""


def is_recipient_hard_bounce(code: int | None, enhanced: str | None) -> bool:
    """Whether a refusal (reply ``code``, ``enhanced`` status) says the recipient's address is
    bad, so that mail to it must stop."""
    return code is not None and 500 <= code < 600 and enhanced in RECIPIENT_HARD_BOUNCES


def suppresses(outcome: RecipientOutcome) -> bool:
    """Whether ``outcome`` is a hard bounce about its recipient's own address: a refusal that
    answered that recipient alone (not a refused MAIL FROM, not the one reply to the data of
    a message with several recipients) with a recipient status."""
    return (
        outcome.status == "failed"
        and not outcome.shared
        and is_recipient_hard_bounce(outcome.code, outcome.enhanced)
    )


class BounceGuard:
    """Adds recipients' hard bounces to ``store``, batch by batch (see the module docstring).

    A batch whose refusals (5xx replies of any kind) are more than half of it, and at least
    ``minimum``, adds nothing. ``on_suppressed(entries)`` hears of what was added.
    """

    def __init__(
        self,
        store: ISuppressionList,
        clock: IReactorTime,
        *,
        window: int = 20,
        minimum: int = 3,
        max_wait: float = 60.0,
        on_suppressed: Callable[[list[Suppression]], None] | None = None,
    ) -> None:
        self._store = store
        self._clock = clock
        self.window = window
        self.minimum = minimum
        self.max_wait = max_wait
        self._on_suppressed = on_suppressed
        self._outcomes = 0
        self._refused = 0
        self._held: list[Suppression] = []
        self._timer: IDelayedCall | None = None
        self._adding: set[defer.Deferred[Any]] = set()
        self.suppressed = 0
        """Addresses added so far."""
        self.withheld = 0
        """Hard bounces not added because most of their batch was refused."""

    def accepted(self, count: int = 1) -> None:
        """``count`` recipients were accepted."""
        self._outcomes += count
        if self._outcomes >= self.window:
            self._close()

    def note(self, outcomes: Iterable[RecipientOutcome]) -> None:
        """The recipients' outcomes of one attempt (deferred ones do not count)."""
        for o in outcomes:
            if o.status == "sent":
                self._outcomes += 1
            elif o.status == "failed" and o.code is not None and 500 <= o.code < 600:
                self._outcomes += 1
                self._refused += 1
                if suppresses(o):
                    detail = f"{o.code} {o.enhanced} {o.response}".strip()
                    self._held.append(Suppression(o.recipient, HARD_BOUNCE, detail=detail))
                    if self._timer is None:
                        self._timer = self._clock.callLater(self.max_wait, self._close)
        if self._outcomes >= self.window:
            self._close()

    def close_batch(self) -> None:
        """The batch in progress is complete (nothing is in flight): decide it now."""
        self._close()

    def flush(self) -> defer.Deferred[None]:
        """Decide the batch in progress; fires once every addition made so far is stored."""
        self._close()
        return defer.DeferredList(list(self._adding), consumeErrors=True).addCallback(
            lambda _: None
        )

    def _close(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        held, refused, outcomes = self._held, self._refused, self._outcomes
        self._held, self._refused, self._outcomes = [], 0, 0
        if not held:
            return
        if refused >= self.minimum and 2 * refused > outcomes:
            self.withheld += len(held)
            log.warn(
                "{refused} of {outcomes} recipients refused at once: not suppressing the "
                "{held} that looked like bad addresses (the server, or our sender, is the "
                "likelier problem)",
                refused=refused,
                outcomes=outcomes,
                held=len(held),
            )
            return
        d = self._store.add(held)
        self._adding.add(d)

        def added(new: int) -> None:
            self.suppressed += new
            if self._on_suppressed is not None:
                self._on_suppressed(held)

        def failed(failure: Failure) -> None:
            log.failure("could not add hard bounces to the suppression list", failure)

        d.addCallbacks(added, failed).addBoth(lambda _: self._adding.discard(d))
