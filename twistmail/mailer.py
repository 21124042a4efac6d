"""The Mailer: a long-lived, pooled sender bound to one SMTP server."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sized
from email.message import EmailMessage
from typing import Any, cast

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ._bulk import MessageLike, OnResult, _count_invalid, _count_result, _Delivery, _Run
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
from .smtp._protocol import MailerProtocol
from .smtp._transaction import TransactionResult
from .smtp.client import ServerConfig, connect, parse_url, tls_options
from .smtp.pool import ConnectionPool

__all__ = ["Mailer", "MessageLike", "OnResult", "send"]

log = Logger()


def _default_reactor() -> Any:
    from twisted.internet import reactor

    return reactor


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
            # The pool's connections take a token right before each MAIL they write.
            throttle=TokenBucket(self._clock, rate) if rate else None,
        )
        self._bucket: TokenBucket | None = None  # the rate is kept by the pool's throttle
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
        """Deliver every message of an iterable or generator over ``concurrency`` connections.

        Up to ``pipeline_depth`` messages are in flight on each connection (with PIPELINING).

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
        if isinstance(message, tuple) and len(message) == 3:  # the bulk case first
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
        envelope = delivery.start_attempt()
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
        retry_now = (
            not error.attempted
            and error.transient
            and self.pool.breaker_error is None
            and not self._closed
        )
        if retry_now:
            # The server never saw this message (queued on a connection that died): it costs
            # no attempt. Refusals by the server (the pool's breaker) still count.
            delivery.attempts -= 1
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
        if retry_now:
            delivery.retry_at = self._clock.seconds()
        elif error.transient:
            self._schedule_retry(delivery)
        return None

    def _schedule_retry(self, delivery: _Delivery) -> None:
        if self.retry.can_retry(delivery.attempts) and not self._closed:
            delivery.retry_at = self._clock.seconds() + self.retry.delay(delivery.attempts)
        else:
            delivery.settle_deferred()


# Sized batches up to this many go out through one DeferredList; larger ones and generators
# stream through one `_Run` (concurrency x pipeline depth attempts in flight).
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
