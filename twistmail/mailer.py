"""The Mailer: a long-lived, pooled sender bound to one SMTP server."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sized
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import _cpu
from ._batchpool import BatchPool, Job
from ._messages import MessagesDoor, OnResult, count_invalid, count_result
from ._twisted import Reactor, default_reactor
from .engine import DeliveryLoop, Notify, untried
from .errors import ConnectionLostError, DeliveryError, MessageError, PermanentError, for_reply
from .message import Envelope, MessageLike, to_envelope
from .ratelimit import DomainLimiter, SharedDomainLimiter, TokenBucket
from .results import SendReport, SendResult
from .retry import RetryPolicy
from .smtp._protocol import MailerProtocol, Throttle
from .smtp._transaction import TransactionResult, _Txn
from .smtp.client import ServerConfig, connect, parse_url, tls_options
from .smtp.pool import ConnectionPool

if TYPE_CHECKING:  # cryptography is imported only by a Mailer that signs
    from .dkim import DkimKey, DkimSigner, Missing, Unsigned
    from .interfaces import ISuppressionList
    from .suppression.sending import SuppressedSending

__all__ = ["Attempt", "Mailer", "MessageLike", "OnResult", "send"]

log = Logger()


class Mailer:
    """A pooled sender for one SMTP server, shared by any number of callers.

    ``url`` is ``smtp://[user[:password]@]host[:port]`` (plain), ``smtp+tls://...`` (STARTTLS
    required) or ``smtp+ssl://...`` (implicit TLS, port 465 by default). A password missing from
    the URL comes from ``password=`` or the ``TWISTMAIL_SMTP_PASSWORD`` environment variable.

    ``concurrency`` is the number of connections. With a server that offers PIPELINING, each
    connection carries up to ``pipeline_depth`` transactions at once (the next message's
    MAIL/RCPT/DATA go out with the previous message's body); ``pipelining=False`` sends in
    lock step. With a ``rate``, each connection takes a token right before it writes a MAIL;
    ``throttle`` paces the MAIL commands instead of ``rate``'s own token bucket (e.g. a
    :class:`~twistmail.ratelimit.SharedRate`: one rate for many processes), and
    ``domain_limiter`` keeps the per-domain caps instead of a local one of ``per_domain``.

    :meth:`send` and :meth:`send_many` retry by ``retry_policy`` (or ``max_attempts``,
    ``retry_delay``, ``max_retry_delay``); :meth:`attempt`, :attr:`capacity` and :meth:`abort`
    are the seam the delivery loop (:mod:`twistmail.engine`) drives.

    ``dkim`` signs every attempt: a :class:`~twistmail.dkim.DkimSigner`, or the
    :class:`~twistmail.dkim.DkimKey` objects to build one with ``dkim_missing`` (``"send"``:
    a From domain with no key goes unsigned, logged once per domain; ``"refuse"``: it fails,
    unsent). Messages are signed on ``dkim_threads`` threads of the Mailer's own: by default
    (None or True) one per CPU the process may use, so every core signs (``cryptography``
    releases the GIL while it makes the RSA signature); with one CPU, or ``dkim_threads=0``
    or False, inline on the reactor thread. The threads start with the first message and stop
    with :meth:`close` or the reactor's shutdown.

    ``suppression`` (an :class:`~twistmail.interfaces.ISuppressionList`) is checked before
    every message: suppressed recipients are left out and reported ``"suppressed"``, a message
    with none left is not sent, and hard bounces about a recipient are added to it
    (:mod:`twistmail.suppression.sending`).
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
        dkim: DkimSigner | Iterable[DkimKey] | None = None,
        dkim_missing: Missing = "send",
        dkim_threads: int | bool | None = None,
        suppression: ISuppressionList | None = None,
        throttle: Throttle | None = None,
        domain_limiter: DomainLimiter | SharedDomainLimiter | None = None,
        reactor: Reactor | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if dkim is not None:
            from .dkim import DkimSigner

            if not isinstance(dkim, DkimSigner):
                dkim = DkimSigner(dkim, missing=dkim_missing)
        self.dkim: DkimSigner | None = dkim
        self._reactor = reactor if reactor is not None else default_reactor()
        self._clock = IReactorTime(self._reactor)
        self._signing: BatchPool[Unsigned, list[bytes]] | None = None
        signers = signing_threads(dkim_threads)
        from_threads = IReactorFromThreads(self._reactor, None)
        if dkim is not None and signers and from_threads is not None:  # else sign inline
            # The threads make only the signatures (without the GIL); the reactor thread does
            # the rest of the signing, so it seldom waits for a signing thread to let go of it.
            self._signing = BatchPool(
                from_threads,
                dkim.make_signatures,
                self._signed,
                threads=signers,
                name="twistmail-dkim",
            )
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
            # The pool's connections take a token right before each MAIL they write, so the
            # rate holds at the server even with pipelined transactions.
            throttle=throttle or (TokenBucket(self._clock, rate) if rate else None),
        )
        self._domains = domain_limiter or (DomainLimiter(per_domain) if per_domain else None)
        # No signing and no per-domain cap: an attempt takes a free connection at once.
        self._fast = self._domains is None and dkim is None
        # max_attempts=1: the caller owns retries, so temporary failures stay "deferred".
        self._door_policy = self.retry if self.retry.max_attempts > 1 else None
        self._active: set[defer.Deferred[Any]] = set()
        self._closed = False
        self._suppressing: SuppressedSending | None = None
        if suppression is not None:
            from .suppression.sending import SuppressedSending

            self._suppressing = SuppressedSending(suppression, self._clock)

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
        sent as given. Partial acceptance succeeds: look at ``result.rejected``. With
        ``max_attempts=1`` the caller owns retries: recipients refused temporarily (4xx, a drop,
        a timeout) come back ``"deferred"``.
        """
        try:
            envelope = to_envelope(message, sender=sender, recipients=recipients)
        except MessageError as e:
            return defer.fail(e)
        if self._closed:
            return defer.fail(ConnectionLostError("the mailer is closed"))
        if self._suppressing is not None:
            checked = self._suppressing.send(envelope, self._send_one)
            return self._track(defer.Deferred.fromCoroutine(checked))
        return self._track(self._send_one(envelope))

    def _send_one(self, envelope: Envelope) -> defer.Deferred[SendResult]:
        door = MessagesDoor.single(envelope, self._clock, self._door_policy)
        d = self._run(door).addCallback(lambda _: door.single_result())
        return d.addCallback(_raise_if_nothing_accepted)

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
        if self._suppressing is not None:
            checked = self._suppressing.send_many(messages, report, on_result, self._run_chunk)
            d = defer.Deferred.fromCoroutine(checked)
        elif isinstance(messages, Sized) and len(messages) <= _SMALL_BATCH:
            d = defer.gatherResults(
                [self._one_of_many(i, m, report, on_result) for i, m in enumerate(messages)],
                consumeErrors=True,
            )
            d.addErrback(_first_error)
        else:
            d = self._run_chunk(enumerate(messages), report, on_result)
        d.addCallback(finish)
        return self._track(d)

    def _run_chunk(
        self,
        items: Iterator[tuple[int, MessageLike]],
        report: SendReport,
        on_result: OnResult | None,
    ) -> defer.Deferred[None]:
        """Deliver ``(index, message)`` items through one delivery loop."""
        door = MessagesDoor(
            items,
            to_envelope,
            report,
            on_result,
            self._clock,
            self._door_policy,
            max_parked=max(1000, 50 * self.concurrency),
        )
        return self._run(door)

    def close(self) -> defer.Deferred[None]:
        """Stop taking work, wait for what is in flight, then QUIT every connection."""
        self._closed = True
        pending = list(self._active)
        d = defer.DeferredList(pending, consumeErrors=True)
        d.addCallback(lambda _: self.pool.close())
        d.addBoth(self._stop_signing)
        return d.addCallback(lambda _: None)

    def _stop_signing(self, result: object) -> object:
        signing, self._signing = self._signing, None
        if signing is not None:  # attempts made from now on sign inline
            signing.stop()
        return result

    # ------------------------------------------------------------------ the engine's seam

    @property
    def capacity(self) -> int:
        """Attempts worth having in flight at once: connections times pipeline depth, and
        with signing threads as many more as they sign in two batches, so that they sign
        ahead while the connections send (a signed attempt waits for its connection)."""
        ahead = 0 if self._signing is None else 2 * self._signing.size * self._signing.max_batch
        return self.concurrency * self.pool.depth + ahead

    def attempt(
        self,
        envelope: Envelope,
        notify: Notify,
        context: Any,
        ready: Callable[[Any], None] | None = None,
    ) -> Attempt:
        """Make one attempt at ``envelope``; ``notify(context, result, error)`` ends it.

        No retry: ``notify`` gets the server's replies (a
        :class:`~twistmail.smtp.TransactionResult`) or the
        :class:`~twistmail.errors.DeliveryError` that ended the attempt (``attempted`` is False
        when the server never saw the message; ``session_setup`` when no session could be set
        up). It may be called before this returns. With ``ready``, the message's data is held
        back when the server asks for it: ``ready(context)`` is called, and the data goes out
        on :meth:`Attempt.release_body`. The rate limit and per-domain cap apply. With
        ``dkim``, the message is signed first.
        """
        if not self._fast:  # signing, or a per-domain cap
            return self._attempt_slow(envelope, notify, context, ready)
        attempt = Attempt(self, envelope, notify, context, ready)
        proto = self.pool.acquire_now()
        if proto is not None:
            # Attempt._submit, inline: this is the path of nearly every message.
            attempt._proto = proto
            txn = proto.submit(
                envelope, Attempt._end, attempt, ready=_body_wanted if ready else None
            )
            if not attempt.ended:
                attempt._txn = txn
            return attempt
        return self._wait_for_connection(attempt)

    def _attempt_slow(
        self,
        envelope: Envelope,
        notify: Notify,
        context: Any,
        ready: Callable[[Any], None] | None,
    ) -> Attempt:
        """:meth:`attempt` with signing or a per-domain cap."""
        attempt = Attempt(self, envelope, notify, context, ready)
        dkim = self.dkim
        if dkim is not None:
            if self._signing is not None and self._signing.stopped:  # the reactor shut down
                self._signing = None  # what it still sends is signed inline
            try:
                if self._signing is None:
                    attempt.envelope = dkim.sign(envelope)
                else:
                    unsigned = dkim.prepare(envelope)
                    if unsigned is not None:  # the signatures are made on a signing thread
                        attempt._signing = self._signing.submit(unsigned, attempt)
                        return attempt  # on to _signed
            except Exception as e:  # DkimError: no key for the From domain
                attempt._end(None, _not_signed(envelope, e))
                return attempt
        self._go(attempt)
        return attempt

    def _signed(
        self, attempt: Attempt, signatures: list[bytes], error: BaseException | None
    ) -> None:
        """Go on with an attempt whose signatures a signing thread made (on the reactor
        thread)."""
        job = attempt._signing
        assert job is not None
        assert self.dkim is not None
        attempt._signing = None
        if error is None:
            try:
                attempt.envelope = self.dkim.finish(attempt.envelope, job.item, signatures)
            except Exception as e:
                error = e
        if error is not None:
            attempt._end(None, _not_signed(attempt.envelope, error))
            return
        self._go(attempt)

    def _go(self, attempt: Attempt) -> None:
        """Submit ``attempt`` on a free connection, or once it has one and its domain's slot."""
        if self._domains is None:
            proto = self.pool.acquire_now()
            if proto is not None:
                attempt._submit(proto)
                return
        self._wait_for_connection(attempt)

    def _wait_for_connection(self, attempt: Attempt) -> Attempt:
        """Submit ``attempt`` once it has a connection and its domain's slot."""
        attempt._gate = gate = defer.Deferred.fromCoroutine(self._gate(attempt))
        gate.addCallbacks(attempt._submit, attempt._not_started)
        return attempt

    def abort(self) -> None:
        """Drop every connection now: what is in flight on them fails as a drop."""
        self.pool.abort()

    # ------------------------------------------------------------------ internals

    def _run(self, door: MessagesDoor) -> defer.Deferred[None]:
        """Deliver what ``door`` holds through one delivery loop."""
        # A server that cannot be reached is waited for (with backoff) only when the Mailer
        # retries; with max_attempts=1 the caller owns retries and hears of it at once.
        patience = 60.0 if door.policy is not None else 0.0
        loop = DeliveryLoop(self, door, door.policy, clock=self._clock, patience=patience)
        return loop.start().addCallback(lambda _: door.stopped(loop.stopped_by))

    def _track(self, d: defer.Deferred[Any]) -> defer.Deferred[Any]:
        self._active.add(d)

        def untrack(result: object) -> object:
            self._active.discard(d)
            return result

        return d.addBoth(untrack)

    def _one_of_many(
        self, index: int, item: MessageLike, report: SendReport, on_result: OnResult | None
    ) -> defer.Deferred[None]:
        try:
            envelope = to_envelope(item)
        except MessageError as e:
            count_invalid(report, index, e, on_result)
            return defer.succeed(None)
        door = MessagesDoor.single(envelope, self._clock, self._door_policy, index=index)
        d = self._run(door)
        return d.addCallback(lambda _: count_result(door.single_result(), index, report, on_result))

    async def _gate(self, attempt: Attempt) -> MailerProtocol:
        """Wait for a per-domain slot, then a connection (the rate limit is kept by the
        connections themselves: each takes a token right before it writes a MAIL)."""
        domains = self._domains
        if domains is not None:
            held = attempt._domains = []
            for domain in sorted({r.ascii_domain for r in attempt.envelope.recipients}):
                await domains.acquire(domain)
                held.append(domain)
        return await self.pool.acquire()

    def _release_domains(self, held: list[str]) -> None:
        assert self._domains is not None
        for domain in held:
            self._domains.release(domain)
        held.clear()


class Attempt:
    """One attempt in progress (see :meth:`Mailer.attempt`)."""

    __slots__ = (
        "_domains",
        "_gate",
        "_mailer",
        "_proto",
        "_signing",
        "_txn",
        "context",
        "ended",
        "envelope",
        "notify",
        "ready",
    )

    def __init__(
        self,
        mailer: Mailer,
        envelope: Envelope,
        notify: Notify,
        context: Any,
        ready: Callable[[Any], None] | None,
    ) -> None:
        self._mailer = mailer
        self.envelope = envelope
        self.notify = notify
        self.context = context
        self.ready = ready
        self.ended = False
        self._proto: MailerProtocol | None = None
        self._txn: _Txn | None = None
        self._gate: defer.Deferred[Any] | None = None  # waiting for a connection
        self._signing: Job[Unsigned] | None = None  # its signatures being made on a thread
        self._domains: list[str] | None = None  # per-domain slots held (made when needed)

    def release_body(self) -> None:
        """Send the data held back for this attempt; nothing if it is not held."""
        proto, txn = self._proto, self._txn
        if proto is not None and txn is not None:
            proto.release_body(txn)

    def cancel(self) -> None:
        """Give up: an attempt that reached the server ends as a drop (its connection is
        dropped, so the server discards the unfinished message)."""
        if self.ended:
            return
        signing = self._signing
        if signing is not None:
            signing.cancel()
            self._signing = None
            self._end(None, untried("the attempt was cancelled before it reached the server"))
            return
        gate = self._gate
        if gate is not None:
            gate.cancel()
            return
        txn = self._txn
        if self._proto is not None and txn is not None:
            self._proto.cancel(txn)
            if not txn.started and not txn.settled:
                # Taken off the connection's queue before its turn: it ends here, untried.
                self._end(None, untried("the attempt was cancelled before it reached the server"))

    def _submit(self, proto: MailerProtocol) -> None:
        self._gate = None
        self._proto = proto
        txn = proto.submit(
            self.envelope, Attempt._end, self, ready=_body_wanted if self.ready else None
        )
        if not self.ended:
            self._txn = txn

    def _not_started(self, failure: Failure) -> None:
        self._gate = None
        error = failure.value
        if isinstance(error, DeliveryError):
            # The pool could not give a connection: about the server, not this message.
            error.attempted = False
            error.session_setup = True
        elif failure.check(defer.CancelledError):
            error = untried("the attempt was cancelled before it reached the server")
        else:
            log.failure("unexpected error while connecting", failure)
            error = untried(f"internal error: {error!r}")
        self._end(None, error)

    def _end(self, result: TransactionResult | None, error: DeliveryError | None) -> None:
        self.ended = True
        mailer = self._mailer
        proto = self._proto
        if proto is not None:
            self._proto = self._txn = None
            mailer.pool.release(proto)
        if self._domains:
            mailer._release_domains(self._domains)
        self.notify(self.context, result, error)


def signing_threads(setting: int | bool | None) -> int:
    """How many threads sign for ``Mailer(dkim_threads=setting)``; 0: inline."""
    if setting is False:
        return 0
    if setting is None or setting is True:
        cpus = _cpu.cpus()
        return cpus if cpus > 1 else 0  # one CPU: a thread would only add the hand-off
    if setting < 0:
        raise ValueError(f"dkim_threads must be None, True, False or at least 0, not {setting}")
    return setting


def _not_signed(envelope: Envelope, error: BaseException) -> PermanentError:
    """The error ending an attempt at ``envelope`` that could not be signed."""
    if isinstance(error, MessageError):  # DkimError: no key for the From domain, "refuse"
        return PermanentError(str(error), attempted=False)
    log.failure(
        "DKIM signing failed for {message_id}",
        Failure(error, type(error), error.__traceback__),
        message_id=envelope.message_id,
    )
    what = f"message {envelope.message_id}" if envelope.message_id else "a message"
    return PermanentError(
        f"cannot DKIM-sign {what} from <{envelope.sender}>: {error!r}", attempted=False
    )


def _body_wanted(attempt: Attempt) -> None:
    ready = attempt.ready
    assert ready is not None
    ready(attempt.context)


# Sized batches up to this many go out through one DeferredList of single deliveries; larger
# ones and generators stream through one DeliveryLoop.
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
    error.result = result
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
