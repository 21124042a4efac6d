"""The Mailer: a long-lived, pooled sender bound to one SMTP server."""

from __future__ import annotations

import dataclasses
import heapq
import os
from collections.abc import Callable, Iterable, Iterator, Sized
from email.message import EmailMessage
from typing import Any, TypeAlias, cast

from twisted.internet import defer, task
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from .errors import (
    ConnectionLostError,
    DeliveryError,
    MessageError,
    PermanentError,
    for_reply,
)
from .message import Envelope, envelope_from_bytes, envelope_from_message
from .ratelimit import DomainLimiter, TokenBucket
from .results import RecipientOutcome, RecipientStatus, SendReport, SendResult
from .retry import RetryPolicy
from .smtp._protocol import MailerProtocol, TransactionResult, _Txn
from .smtp.client import ServerConfig, connect, parse_url, tls_options
from .smtp.pool import ConnectionPool

__all__ = ["Mailer", "MessageLike", "OnResult", "send"]

log = Logger()

MessageLike: TypeAlias = EmailMessage | Envelope | tuple[str, Iterable[str], bytes]
OnResult: TypeAlias = Callable[[int, SendResult | Exception], None]


def _default_reactor() -> Any:
    from twisted.internet import reactor

    return reactor


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


class Mailer:
    """A pooled sender for one SMTP server, shared by any number of callers.

    ``url`` is ``smtp://[user[:password]@]host[:port]`` (plain), ``smtp+tls://...`` (STARTTLS
    required) or ``smtp+ssl://...`` (implicit TLS, port 465 by default). A password missing from
    the URL comes from ``password=`` or the ``TWISTMAIL_SMTP_PASSWORD`` environment variable.

    ``concurrency`` is the number of connections. With a server that offers PIPELINING, each
    connection carries up to ``pipeline_depth`` transactions at once (the next message's
    MAIL/RCPT/DATA go out with the previous message's body); ``pipelining=False`` sends in
    lock step.
    """

    def __init__(
        self,
        url: str,
        *,
        concurrency: int = 10,
        rate: float | None = None,
        per_domain: int | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        insecure: bool = False,
        password: str | None = None,
        timeout: float = 60.0,
        connect_timeout: float | None = None,
        data_timeout: float = 600.0,
        idle_timeout: float = 30.0,
        max_attempts: int = 5,
        retry_delay: float = 5.0,
        max_retry_delay: float = 600.0,
        local_hostname: str | None = None,
        pipelining: bool = True,
        pipeline_depth: int = 3,
        retry_policy: RetryPolicy | None = None,
        reactor: Any = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._reactor = reactor if reactor is not None else _default_reactor()
        self._clock: IReactorTime = self._reactor
        self.server: ServerConfig = parse_url(url, password=password)
        self.concurrency = concurrency
        self.retry = retry_policy or RetryPolicy(
            max_attempts=max_attempts, initial_delay=retry_delay, max_delay=max_retry_delay
        )
        tls = None
        if self.server.security != "plain":
            tls = tls_options(self.server.host, ca_file=ca_file, insecure=insecure)
        server = self.server
        ctimeout = connect_timeout if connect_timeout is not None else timeout

        def open_connection() -> defer.Deferred[MailerProtocol]:
            return connect(
                self._reactor,
                server,
                tls_creator=tls,
                connect_timeout=ctimeout,
                reply_timeout=timeout,
                data_timeout=data_timeout,
                local_hostname=local_hostname,
                use_pipelining=pipelining,
            )

        self.pool = ConnectionPool(
            open_connection,
            size=concurrency,
            clock=self._clock,
            idle_timeout=idle_timeout,
            depth=pipeline_depth if pipelining else 1,
        )
        self._bucket = TokenBucket(self._clock, rate) if rate else None
        self._domains = DomainLimiter(per_domain) if per_domain else None
        self._active: set[defer.Deferred[Any]] = set()
        self._closed = False

    def __repr__(self) -> str:
        return f"<Mailer {self.server.security} {self.server.label} concurrency={self.concurrency}>"

    # ------------------------------------------------------------------ public API

    def send(
        self,
        message: MessageLike | bytes,
        *,
        sender: str | None = None,
        recipients: Iterable[str] | None = None,
    ) -> defer.Deferred[SendResult]:
        """Deliver one message, retrying temporary failures; fires with a :class:`SendResult`.

        Fails with the delivery error (which carries ``.result``) when no recipient was
        accepted, or with a :class:`~twistmail.errors.MessageError` for a message that cannot be
        sent as given. Partial acceptance succeeds: look at ``result.rejected``.
        """
        try:
            envelope = self._prepare(message, sender, recipients)
        except MessageError as e:
            return defer.fail(e)
        if self._closed:
            return defer.fail(ConnectionLostError("the mailer is closed"))
        d = self._complete(_Delivery(envelope))
        d.addCallback(_raise_if_nothing_accepted)
        return self._track(d)

    def send_many(
        self,
        messages: Iterable[MessageLike],
        *,
        on_result: OnResult | None = None,
    ) -> defer.Deferred[SendReport]:
        """Deliver every message of an iterable or generator, ``concurrency`` at a time.

        Items are ``EmailMessage`` objects, :class:`~twistmail.message.Envelope` objects or
        ``(sender, recipients, data_bytes)`` triples. The iterable is consumed lazily, and
        outcomes go to ``on_result(index, result_or_error)`` and into the report's counters, so
        memory does not grow with the number of messages.
        """
        report = SendReport()
        started = self._clock.seconds()
        if self._closed:
            return defer.fail(ConnectionLostError("the mailer is closed"))

        def finish(_: object) -> SendReport:
            report.elapsed = self._clock.seconds() - started
            return report

        d: defer.Deferred[Any]
        if isinstance(messages, Sized) and len(messages) <= _SMALL_BATCH:
            d = defer.gatherResults(
                [self._one_of_many(i, m, report, on_result) for i, m in enumerate(messages)],
                consumeErrors=True,
            )
            d.addErrback(_first_error)
        else:
            d = _Run(self, enumerate(messages), report, on_result).start()
        d.addCallback(finish)
        return self._track(d)

    def close(self) -> defer.Deferred[None]:
        """Stop taking work, wait for what is in flight, then QUIT every connection."""
        self._closed = True
        pending = list(self._active)
        d = defer.DeferredList(pending, consumeErrors=True)
        d.addCallback(lambda _: self.pool.close())
        return d.addCallback(lambda _: None)

    # ------------------------------------------------------------------ engine

    def _track(self, d: defer.Deferred[Any]) -> defer.Deferred[Any]:
        self._active.add(d)

        def untrack(result: object) -> object:
            self._active.discard(d)
            return result

        return d.addBoth(untrack)

    def _prepare(
        self,
        message: MessageLike | bytes,
        sender: str | None = None,
        recipients: Iterable[str] | None = None,
    ) -> Envelope:
        if type(message) is tuple and len(message) == 3:  # the bulk case first
            s, r, data = message
            return envelope_from_bytes(s, r, data)
        if isinstance(message, Envelope):
            return message
        if isinstance(message, EmailMessage):
            return envelope_from_message(message, sender=sender, recipients=recipients)
        if isinstance(message, bytes | bytearray):
            if sender is None or recipients is None:
                raise MessageError("raw bytes need an explicit sender= and recipients=")
            return envelope_from_bytes(sender, recipients, bytes(message))
        if isinstance(message, tuple) and len(message) == 3:
            s, r, data = message
            return envelope_from_bytes(s, r, data)
        raise MessageError(
            f"cannot send {type(message).__name__}: give an EmailMessage, an Envelope "
            "or a (sender, recipients, bytes) triple"
        )

    def _complete(self, delivery: _Delivery) -> defer.Deferred[SendResult]:
        """Attempt until every recipient is settled or attempts run out."""
        d = self._attempt(delivery)

        def first_done(_: None) -> SendResult | defer.Deferred[SendResult]:
            if delivery.done:
                return delivery.result()
            return defer.Deferred.fromCoroutine(self._retry(delivery))

        return d.addCallback(first_done)

    async def _retry(self, delivery: _Delivery) -> SendResult:
        """Wait for each retry time and attempt again, until every recipient is settled."""
        while not delivery.done:
            delay = max(0.0, delivery.retry_at - self._clock.seconds())
            await task.deferLater(self._clock, delay, lambda: None)
            await self._attempt(delivery)
        return delivery.result()

    def _one_of_many(
        self, index: int, item: MessageLike, report: SendReport, on_result: OnResult | None
    ) -> defer.Deferred[None]:
        try:
            envelope = self._prepare(item)
        except MessageError as e:
            _count_invalid(report, index, e, on_result)
            return defer.succeed(None)
        d = self._complete(_Delivery(envelope))
        return d.addCallback(_count_result, index, report, on_result)

    def _attempt(self, delivery: _Delivery) -> defer.Deferred[None]:
        """One attempt at the recipients not yet settled; fires once ``delivery`` is updated."""
        delivery.attempts += 1
        envelope = delivery.envelope if delivery.attempts == 1 else delivery.pending_envelope()
        d: defer.Deferred[Any]
        if self._bucket is None and self._domains is None:
            proto = self.pool.acquire_now()
            if proto is not None:
                # The common case: a free connection, one Deferred and one callback pair.
                d = proto.send(envelope)
                d.addCallbacks(
                    self._sent,
                    self._not_sent,
                    callbackArgs=(proto, delivery),
                    errbackArgs=(proto, delivery),
                )
                return cast("defer.Deferred[None]", d)
            d = self.pool.acquire()
        else:
            domains: list[str] = []
            d = self._gate(envelope, domains)
        d.addCallback(self._send_on, envelope)
        if self._domains is not None:
            d.addBoth(self._release_domains, domains)
        d.addCallbacks(
            self._on_transaction,
            self._on_failure,
            callbackArgs=(delivery,),
            errbackArgs=(delivery,),
        )
        return cast("defer.Deferred[None]", d)

    def _sent(
        self,
        result: TransactionResult,
        proto: MailerProtocol,
        delivery: _Delivery,
    ) -> None:
        self.pool.release(proto)
        self._on_transaction(result, delivery)

    def _not_sent(
        self,
        failure: Failure,
        proto: MailerProtocol,
        delivery: _Delivery,
    ) -> Failure | None:
        self.pool.release(proto)
        return self._on_failure(failure, delivery)

    def _gate(self, envelope: Envelope, held: list[str]) -> defer.Deferred[MailerProtocol]:
        async def gate() -> MailerProtocol:
            if self._bucket is not None:
                await self._bucket.acquire()
            if self._domains is not None:
                for domain in sorted({r.ascii_domain for r in envelope.recipients}):
                    await self._domains.acquire(domain)
                    held.append(domain)
            return await self.pool.acquire()

        return defer.Deferred.fromCoroutine(gate())

    def _release_domains(self, result: object, held: list[str]) -> object:
        assert self._domains is not None
        for domain in held:
            self._domains.release(domain)
        held.clear()
        return result

    def _send_on(
        self, proto: MailerProtocol, envelope: Envelope
    ) -> defer.Deferred[TransactionResult]:
        d = proto.send(envelope)

        def release(result: object) -> object:
            self.pool.release(proto)
            return result

        return d.addBoth(release)

    def _on_transaction(self, result: TransactionResult, delivery: _Delivery) -> None:
        delivery.final = result
        delivery.error = None
        if result.accepted_all and delivery.attempts == 1:
            delivery.sent_all = True  # the outcomes are made only if someone asks for them
            return
        outcomes = delivery.outcomes
        replies = iter(result.recipients)
        deferred = False
        for i, o in enumerate(outcomes):
            if o is not None and o.status != "deferred":
                continue
            reply = next(replies)
            code = reply.code
            status: RecipientStatus
            if 200 <= code < 300:
                status = "sent"
            elif 400 <= code < 500:
                status = "deferred"
                deferred = True
            else:
                status = "failed"
            outcomes[i] = RecipientOutcome(
                str(reply.recipient), status, code, reply.enhanced, reply.text, delivery.attempts
            )
        if deferred:
            self._schedule_retry(delivery)

    def _on_failure(self, failure: Failure, delivery: _Delivery) -> Failure | None:
        if failure.check(defer.CancelledError):
            return failure
        error = failure.value
        if not isinstance(error, DeliveryError):
            log.failure("unexpected error while sending", failure)
            error = PermanentError(f"internal error: {error!r}")
        delivery.error = error
        status: RecipientStatus = "deferred" if error.transient else "failed"
        outcomes = delivery.outcomes
        for i, (rcpt, o) in enumerate(zip(delivery.envelope.recipients, outcomes, strict=True)):
            if o is None or o.status == "deferred":
                outcomes[i] = RecipientOutcome(
                    str(rcpt),
                    status,
                    error.code,
                    error.enhanced,
                    error.response,
                    delivery.attempts,
                )
        if error.transient:
            self._schedule_retry(delivery)
        return None

    def _schedule_retry(self, delivery: _Delivery) -> None:
        if self.retry.can_retry(delivery.attempts) and not self._closed:
            delivery.retry_at = self._clock.seconds() + self.retry.delay(delivery.attempts)
        else:
            delivery.settle_deferred()


# Sized batches up to this many go out through one DeferredList; larger ones and generators
# go through `concurrency` cooperative workers sharing one iterator.
_SMALL_BATCH = 100


def _first_error(failure: Failure) -> Failure:
    if isinstance(failure.value, defer.FirstError):
        sub: Failure = failure.value.subFailure
        return sub
    return failure


def _raise_if_nothing_accepted(result: SendResult) -> SendResult:
    if result.accepted:
        return result
    first = result.recipients[0] if result.recipients else None
    error = result.error
    if error is None:
        assert first is not None
        error = for_reply(first.code)(
            "no recipient was accepted",
            code=first.code,
            enhanced=first.enhanced,
            response=first.response,
            recipient=first.recipient,
        )
    error.result = result  # type: ignore[attr-defined]
    raise error


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


class _Run:
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
        self.txns: dict[_Delivery, tuple[MailerProtocol, _Txn]] = {}
        self.slow: set[defer.Deferred[None]] = set()
        self.done: defer.Deferred[None] = defer.Deferred(self._cancel)
        self.ended = False
        self._pumping = False
        self._again = False
        self._wake: IDelayedCall | None = None
        self._fast = mailer._bucket is None and mailer._domains is None

    def start(self) -> defer.Deferred[None]:
        self.pump()
        return self.done

    def pump(self) -> None:
        """Start attempts while there is room and work; end the run when nothing is left."""
        if self._pumping:
            self._again = True  # an attempt ended synchronously: the running loop goes on
            return
        self._pumping = True
        started = 0
        try:
            while not self.ended:
                self._again = False
                while self.in_flight < self.limit and not self.ended:
                    delivery = self._next()
                    if delivery is None:
                        break
                    self.in_flight += 1
                    self._attempt(delivery)
                    started += 1
                    if started >= _BURST:
                        # Attempts that end at once (a dead server) must not starve the reactor.
                        self._wake_in(0.0)
                        return
                if not self._again:
                    break
        except BaseException:
            self._fail(Failure())
            return
        finally:
            self._pumping = False
        self._idle_check()

    def _attempt(self, delivery: _Delivery) -> None:
        mailer = self.mailer
        if self._fast:
            proto = mailer.pool.acquire_now()
            if proto is not None:
                delivery.attempts += 1
                envelope = (
                    delivery.envelope if delivery.attempts == 1 else delivery.pending_envelope()
                )
                self.txns[delivery] = (proto, _PLACEHOLDER)
                txn = proto.submit(envelope, self._submitted, delivery)
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

    def _idle_check(self) -> None:
        """Finish when everything is settled; else wake up for the next parked retry."""
        if self.ended or self.in_flight >= self.limit:
            return
        if self.parked:
            if self._wake is None:
                delay = self.parked[0][0] - self.mailer._clock.seconds()
                self._wake_in(max(0.0, delay))
        elif self.exhausted and self.in_flight == 0:
            self._end()
            self.done.callback(None)

    def _wake_in(self, delay: float) -> None:
        if self._wake is None:
            self._wake = self.mailer._clock.callLater(delay, self._woken)

    def _woken(self) -> None:
        self._wake = None
        self.pump()

    def _end(self) -> None:
        self.ended = True
        if self._wake is not None:
            if self._wake.active():
                self._wake.cancel()
            self._wake = None

    def _fail(self, failure: Failure) -> None:
        if self.ended:
            return
        self._end()
        self.done.errback(failure)

    def _cancel(self, _: defer.Deferred[None]) -> None:
        # Ended first: what the cancellations below report is then ignored, and Deferred.cancel
        # fails `done` with its CancelledError.
        self._end()
        for proto, txn in list(self.txns.values()):
            if txn is not _PLACEHOLDER:
                proto.cancel(txn)
        for d in list(self.slow):
            d.cancel()


# Attempts a run may start back to back before the reactor gets a turn.
_BURST = 100
# Stands for a transaction being submitted (the connection may end it before submit returns).
_PLACEHOLDER: Any = object()


def send(
    message: MessageLike | bytes,
    url: str,
    *,
    sender: str | None = None,
    recipients: Iterable[str] | None = None,
    **options: Any,
) -> defer.Deferred[SendResult]:
    """Send one message through a Mailer made for the purpose, then close it."""
    mailer = Mailer(url, concurrency=1, **options)
    d = mailer.send(message, sender=sender, recipients=recipients)

    def close(result: object) -> defer.Deferred[object]:
        return mailer.close().addCallback(lambda _: result)

    return d.addBoth(close)
