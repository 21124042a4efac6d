"""Bounces over SMTP: the relay's ``--bounce-domain`` gate.

With a :class:`BounceGate` the relay's SMTP listener accepts mail from anyone, without AUTH,
but only to correctly signed VERP return paths at the bounce domain: any other address there is
refused (550 5.1.1), and any address elsewhere still needs AUTH or ``--allow-from`` (530), so
the relay is no open relay. A message to return paths is given to the
:class:`~twistmail.bounces.intake.BounceIntake` and consumed: never queued, never relayed. Its
250 reply comes once what it changes is committed; a store that fails gets 451 (the sender's
server tries again later). Return paths and other recipients never share a message (452: the
client sends the rest in another transaction, as RFC 5321 lets it).
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet import defer
from twisted.logger import Logger

from ..message import Envelope, unstuff
from .intake import BounceIntake, Processed
from .verp import VerpSigner

__all__ = ["BounceGate"]

log = Logger()

Refusal = tuple[int, str]


class BounceGate:
    """Which recipients the relay takes as bounces, and what it does with them.

    ``counted(kind)`` hears of each reported recipient's event kind (``hard``, ``soft``...),
    and of ``not_report`` for a message that was none (the relay's metrics)."""

    def __init__(
        self,
        verp: VerpSigner,
        intake: BounceIntake,
        counted: Callable[[str], None] | None = None,
    ) -> None:
        self.verp = verp
        self.intake = intake
        self._counted = counted or (lambda kind: None)

    def recipient(
        self, address: str, *, trusted: bool, bounce: bool | None
    ) -> tuple[bool, Refusal | None]:
        """Whether ``address`` (a RCPT TO) is a return path, and the refusal it gets if any.

        ``trusted``: the client authenticated or is in ``--allow-from``. ``bounce``: whether the
        transaction's earlier recipients were return paths (None: it has none yet).
        """
        if self.verp.is_ours(address):
            if self.verp.verify(address) is None:
                return True, (550, "5.1.1 No such bounce address")
            if bounce is False:
                return True, (452, "4.5.3 Send to bounce addresses in a message of their own")
            return True, None
        if not trusted:
            return False, (530, "5.7.0 Authentication required")
        if bounce is True:
            return False, (452, "4.5.3 Send to other recipients in a message of their own")
        return False, None

    def consume(self, envelope: Envelope) -> defer.Deferred[str]:
        """Apply the bounce in ``envelope`` (as received, dot-stuffed); fires with the 250
        reply's text once applied."""
        data = unstuff(envelope.payload)
        to = [str(r) for r in envelope.recipients]
        return self.intake.process(data, to).addCallback(self._applied)

    def _applied(self, processed: Processed) -> str:
        if not processed.is_report:
            self._counted("not_report")
            log.info("a message to a bounce address was no bounce report: dropped")
            return "2.0.0 Ok: not a delivery report, dropped"
        for event in processed.events:
            self._counted(event.kind)
            ref = event.ref
            where = (
                "" if ref is None else f" ({ref.kind} {ref.message or ref.campaign}:{ref.number})"
            )
            log.info(
                "bounce{where}: {kind} {status}{suppressed}{failed}",
                where=where,
                kind=event.kind,
                status=event.status or "-",
                suppressed=", suppressed" if event.suppressed else "",
                failed=", recipient failed" if event.failed else "",
            )
        return f"2.0.0 Ok: {len(processed.events)} recipient reports applied"
