"""The library door with a suppression list: ``Mailer(suppression=...)``'s ``send`` and
``send_many`` check every message's recipients first and add hard bounces to the list.

A suppressed recipient is left out and reported with status ``"suppressed"`` (its
:class:`~twistmail.results.RecipientOutcome`'s ``response`` says why); a message every recipient
of which is suppressed is not sent at all (its :class:`~twistmail.results.SendResult` has no
attempt). ``send_many`` checks a chunk of messages at once, the next chunk while one is being
sent.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from .._messages import OnResult, count_invalid
from ..errors import MessageError
from ..interfaces import ISuppressionList
from ..message import Envelope, MessageLike, to_envelope
from ..results import RecipientOutcome, SendReport, SendResult
from .policy import BounceGuard
from .records import Suppression, SuppressionError, suppressed_reply, suppression_key
from .screen import list_id_of

__all__ = ["CHUNK", "SuppressedSending"]

CHUNK = 500
"""Messages of ``send_many`` checked against the list at once."""

RunChunk = Callable[
    [Iterator[tuple[int, MessageLike]], SendReport, OnResult], "defer.Deferred[None]"
]
SendOne = Callable[[Envelope], "defer.Deferred[SendResult]"]


def _key(address: object) -> str:
    try:
        return suppression_key(str(address))
    except SuppressionError:
        return ""


class SuppressedSending:
    """A Mailer's sends checked against ``store`` (see the module docstring)."""

    def __init__(self, store: ISuppressionList, clock: IReactorTime) -> None:
        self.store = store
        self.guard = BounceGuard(store, clock)
        self._sending = 0

    def _screen(
        self, envelopes: list[Envelope]
    ) -> defer.Deferred[list[tuple[Envelope | None, list[RecipientOutcome]]]]:
        """Each envelope restricted to its recipients not suppressed (None: none left), with
        the outcomes of those left out."""
        lists = [list_id_of(e.payload) for e in envelopes]
        names = sorted(set(lists))
        checks = [
            self.store.check(
                [
                    str(r)
                    for e, lst in zip(envelopes, lists, strict=True)
                    if lst == name
                    for r in e.recipients
                ],
                name,
            )
            for name in names
        ]

        def split(
            results: list[dict[str, Suppression]],
        ) -> list[tuple[Envelope | None, list[RecipientOutcome]]]:
            hits = dict(zip(names, results, strict=True))
            out: list[tuple[Envelope | None, list[RecipientOutcome]]] = []
            for envelope, list_id in zip(envelopes, lists, strict=True):
                found = hits[list_id]
                left_out = [
                    RecipientOutcome(str(r), "suppressed", None, None, suppressed_reply(found[k]))
                    for r in envelope.recipients
                    if (k := _key(r)) in found
                ]
                if not left_out:
                    out.append((envelope, []))
                    continue
                kept = tuple(r for r in envelope.recipients if _key(r) not in found)
                out.append(
                    (dataclasses.replace(envelope, recipients=kept) if kept else None, left_out)
                )
            return out

        return defer.gatherResults(checks, consumeErrors=True).addCallback(split)

    async def send(self, envelope: Envelope, send_one: SendOne) -> SendResult:
        """:meth:`Mailer.send` of ``envelope`` through ``send_one``, checked first."""
        ((kept, left_out),) = await self._screen([envelope])
        if kept is None:
            return _not_sent(envelope, left_out)
        self._sending += 1
        try:
            result = await send_one(kept)
        except Exception as e:
            self._sending -= 1
            failed = getattr(e, "result", None)
            if isinstance(failed, SendResult):
                await self._noted(failed)
                failed.recipients.extend(left_out)
            raise
        self._sending -= 1
        await self._noted(result)
        result.recipients.extend(left_out)
        return result

    async def _noted(self, result: SendResult) -> None:
        """Feed the guard; with no other send in flight, the batch is decided and its hard
        bounces are stored before the caller hears of the result."""
        self.guard.note(result.recipients)
        if not self._sending:
            await self.guard.flush()

    async def send_many(
        self,
        messages: Iterable[MessageLike],
        report: SendReport,
        on_result: OnResult | None,
        run_chunk: RunChunk,
    ) -> None:
        """:meth:`Mailer.send_many`, a chunk of messages checked while the one before is sent."""
        chunks = _chunks(enumerate(messages), report, on_result)
        left_out: dict[int, list[RecipientOutcome]] = {}

        def seen(index: int, result: SendResult | Exception) -> None:
            if isinstance(result, SendResult):
                self.guard.note(result.recipients)
                result.recipients.extend(left_out.pop(index, ()))
                report.recipients_suppressed += sum(
                    1 for r in result.recipients if r.status == "suppressed"
                )
            if on_result is not None:
                on_result(index, result)

        chunk = next(chunks, None)
        checking = self._screen([e for _, e in chunk]) if chunk else None
        while chunk is not None and checking is not None:
            screened = await checking
            upcoming = next(chunks, None)
            checking = self._screen([e for _, e in upcoming]) if upcoming else None
            to_send = []
            for (index, envelope), (kept, out) in zip(chunk, screened, strict=True):
                if kept is None:
                    report.messages += 1
                    report.suppressed += 1
                    report.recipients_suppressed += len(out)
                    if on_result is not None:
                        on_result(index, _not_sent(envelope, out))
                    continue
                if out:
                    left_out[index] = out
                to_send.append((index, kept))
            if to_send:
                self._sending += 1
                try:
                    await run_chunk(iter(to_send), report, seen)
                finally:
                    self._sending -= 1
            chunk = upcoming
        await self.guard.flush()


def _chunks(
    items: Iterator[tuple[int, MessageLike]], report: SendReport, on_result: OnResult | None
) -> Iterator[list[tuple[int, Envelope]]]:
    chunk: list[tuple[int, Envelope]] = []
    for index, item in items:
        try:
            chunk.append((index, to_envelope(item)))
        except MessageError as e:
            count_invalid(report, index, e, on_result)
            continue
        if len(chunk) >= CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _not_sent(envelope: Envelope, left_out: list[RecipientOutcome]) -> SendResult:
    return SendResult(
        sender=str(envelope.sender),
        recipients=left_out,
        code=None,
        response="every recipient is suppressed: not sent",
        attempts=0,
        message_id=envelope.message_id,
    )
