"""The relay as a Twisted service: one queue, the submission listener and the delivery worker.

The queue's store says how deliverers share it (:mod:`twistmail.queue.sharing`):
:meth:`RelayService.make` becomes one of its deliverers before anything starts (a SQLite
file has one: a second relay on the same file is refused there; a PostgreSQL queue has any
number, on any machines). Starting opens the queue, gives back what dead relays held (on
SQLite at once; on PostgreSQL their leases run out), starts the worker (woken by every
commit to the queue, ours or another process's) and then listens. Stopping (SIGTERM under
``twistd``) stops listening, ends idle sessions with 421 and lets messages in DATA finish,
lets deliveries in flight finish within ``shutdown_timeout`` seconds (then cuts them off:
they stay queued), and closes the queue.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any, cast

from twisted.application.service import MultiService
from twisted.internet import defer, ssl
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.logger import ILogObserver, Logger
from twisted.python.components import Componentized

from .._twisted import Reactor, default_reactor
from ..errors import QueueError
from ..interfaces import IQueue, ISuppressionList
from ..message import Envelope
from ..queue.records import ClaimedMessage, Idempotent, Outcome
from ..queue.sharing import Deliverers, deliverers_for
from ..suppression import open_suppression_for_queue
from ..unsubscribe.web import make_public_site
from .auth import MECHANISMS, FailureLimiter, auth_portal
from .bounces import notification
from .config import RelayConfig
from .http import Access, Key, make_http, make_site
from .listener import SubmissionFactory
from .metrics import QueueSizes, RelayMetrics
from .sessions import Sessions
from .statuspage import DeliveryHistory, StatusPage
from .tokens import TokenChecker
from .worker import RelayWorker

__all__ = ["OWNER_PREFIX", "RelayService", "StartError"]

log = Logger()

OWNER_PREFIX = "relay:"
"""Queue claims of a relay carry owner tokens starting with this."""

HEALTH_TIMEOUT = 5.0
"""Seconds ``/healthz`` waits for its write to the queue before calling it not writable."""

CLOSE_GRACE = 5.0
"""Seconds after ``--shutdown-timeout`` when a stopping relay whose worker has not ended (the
queue cannot be reached) closes the queue under it."""


class StartError(Exception):
    """The relay cannot start (the queue is locked by another relay, or is not a queue)."""


def _tls_context(config: RelayConfig) -> Any:
    """The STARTTLS context of ``--tls-cert``/``--tls-key``, or None."""
    if not config.tls_cert or not config.tls_key:
        return None
    with open(config.tls_cert, "rb") as cert, open(config.tls_key, "rb") as key:
        pem = cert.read() + b"\n" + key.read()
    return ssl.PrivateCertificate.loadPEM(pem).options()


class RelayService(MultiService):
    """The running relay; see the module's docstring."""

    def __init__(self, config: RelayConfig, deliverers: Deliverers, reactor: Reactor) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.deliverers = deliverers
        self.queue: IQueue | None = None
        self.suppression: ISuppressionList | None = None
        self.worker: RelayWorker | None = None
        self.submission: SubmissionFactory | None = None
        self.ports: list[IListeningPort] = []
        self.owner = f"{OWNER_PREFIX}{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._starting: defer.Deferred[None] | None = None
        self._worker_done: defer.Deferred[Any] | None = None
        self._mailer: Any = None
        self.metrics = RelayMetrics(self._queue_sizes)
        self.history = DeliveryHistory()  # the status page's deliveries per minute
        self._unwatch: Callable[[], None] | None = None
        self._accepted_at: dict[int, float] = {}  # queue id -> when this process accepted it

    log_observer: Any = None
    """The log observer twistd should use for this relay (see :mod:`.logs`), or None for
    twistd's own: it is offered to the application this service is added to."""

    def setServiceParent(self, parent: Any) -> None:
        super().setServiceParent(parent)
        if (
            self.log_observer is not None
            and isinstance(parent, Componentized)
            and parent.getComponent(ILogObserver) is None
        ):
            parent.setComponent(ILogObserver, self.log_observer)

    @classmethod
    def make(cls, config: RelayConfig, reactor: Reactor | None = None) -> RelayService:
        """The relay for ``config``, one of its queue's deliverers.

        :raises StartError: the queue has its one deliverer already, or is not a queue.
        """
        deliverers = deliverers_for(config.queue_url)
        try:
            deliverers.hold()
        except QueueError as e:
            raise StartError(str(e)) from None
        return cls(config, deliverers, reactor if reactor is not None else default_reactor())

    # ------------------------------------------------------------------ start

    def startService(self) -> None:
        super().startService()
        self._starting = defer.Deferred.fromCoroutine(self._start())
        self._starting.addErrback(self._start_failed)

    def _start_failed(self, failure: Any) -> None:
        log.failure("the relay could not start", failure)
        self.reactor.callLater(0, getattr(self.reactor, "stop", lambda: None))

    async def _start(self) -> None:
        config = self.config
        # Closed by stopService, after the outcomes of deliveries in flight are recorded.
        self.queue = queue = await self.deliverers.open(self.reactor)
        taken = await self.deliverers.recover(OWNER_PREFIX)
        if taken:
            log.info("took back {n} messages claimed by a relay that died", n=taken)
        # Closed by stopService too: the worker adds hard bounces until it has stopped.
        self.suppression = await open_suppression_for_queue(
            config.queue_url, queue_ready=True, reactor=self.reactor, close_at_shutdown=False
        )
        throttle = None
        if config.rate:  # the rate of all the queue's deliverers together
            throttle = self.deliverers.throttle(config.rate, IReactorTime(self.reactor))
        domains = None
        if config.per_domain:  # the caps of all the queue's deliverers together
            domains = self.deliverers.domain_limiter(
                config.per_domain, IReactorTime(self.reactor), self.owner, config.lease
            )
        self._mailer = config.mailer(self.reactor, throttle, domains)
        sender: Any = self._mailer
        if config.verp is not None and config.verp_send:
            from ..bounces.sending import VerpSender

            sender = VerpSender(self._mailer, config.verp)
        self.worker = RelayWorker(
            queue,
            sender,
            retry=config.retry_policy(),
            owner=self.owner,
            lease=config.lease,
            max_age=config.max_age,
            age=self._age,
            reactor=self.reactor,  # type: ignore[arg-type]
            on_outcome=self._outcome,
            suppression=self.suppression,
        )
        self._unwatch = self.deliverers.watch(self._wake, self.reactor)
        self._worker_done = self.worker.run()
        self._worker_done.addErrback(lambda f: log.failure("the delivery worker failed", f))
        if config.http is not None:
            tokens = (
                TokenChecker(config.api_token_file, self.reactor)  # type: ignore[arg-type]
                if config.api_token_file
                else None
            )
            hosts = frozenset({config.hostname.lower(), *config.http_hosts})
            # One limiter for the API and the status page's login: both take the same tokens.
            access = Access(tokens, hosts, FailureLimiter(IReactorTime(self.reactor)))
            # The status page's sessions are signed with a key drawn now: a restart ends them.
            page = StatusPage(
                queue,
                self.health,
                self.history,
                access=access,
                sessions=Sessions(),
                wake=self._wake,
            )
            app = make_http(
                self.health,
                self.metrics,
                access=access,
                submit=self._submit,
                queue=self.queue,
                wake=self._wake,
                max_message_size=config.max_message_size,
                pages=page.routes(),
                unsubscribe=config.unsubscribe,
            )
            # Room for base64 attachments (4/3) and the JSON around them.
            site = make_site(app, max_body=config.max_message_size * 4 // 3 + 64 * 1024)
            port = await serverFromString(self.reactor, config.http).listen(site)
            self.ports.append(port)
            self._log_listening("HTTP (API, status page, health and metrics)", port)
        if config.public_http is not None and config.unsubscribe_tokens is not None:
            site = make_public_site(config.unsubscribe_tokens, self.suppression)
            port = await serverFromString(self.reactor, config.public_http).listen(site)
            self.ports.append(port)
            self._log_listening("one-click unsubscribe (public)", port)
        if config.submission is not None:
            clock = IReactorTime(self.reactor)
            gate = await self._bounce_gate()
            self.submission = SubmissionFactory(
                config,
                self._accept,
                clock=self.reactor,
                portal=auth_portal(config.users_file, clock) if config.users_file else None,
                mechanisms=MECHANISMS,
                tls=_tls_context(config),
                limiter=FailureLimiter(clock),
                on_session=self._sessions_changed,
                bounces=gate,
            )
            endpoint = serverFromString(self.reactor, config.submission)
            port = await endpoint.listen(self.submission)
            self.ports.append(port)
            self._log_listening("SMTP submission", port)
        log.info(
            "relaying to {upstream} from queue {queue}",
            upstream=self._mailer.server.label,
            queue=self.deliverers.where,
        )

    async def _bounce_gate(self) -> Any:
        """The ``--bounce-domain`` gate over this queue and its suppression list, or None."""
        if self.config.verp is None:
            return None
        from ..bounces.intake import BounceIntake, BounceQueue
        from ..bounces.smtp import BounceGate

        # Both stores a relay runs on (SQLite, PostgreSQL) record bounces.
        queue = cast("BounceQueue", self.queue)
        intake = BounceIntake(
            self.suppression, queue=queue, verp=self.config.verp, reactor=self.reactor
        )
        log.info("taking bounces at {domain}", domain=self.config.verp.domain)
        return BounceGate(self.config.verp, intake, self.metrics.bounce)

    @staticmethod
    def _log_listening(what: str, port: IListeningPort) -> None:
        host = port.getHost()
        log.info(
            "{what} listening on {host}:{port}",
            what=what,
            host=getattr(host, "host", host),
            port=getattr(host, "port", ""),
        )

    def _age(self, claimed: ClaimedMessage) -> defer.Deferred[float | None]:
        assert self.queue is not None
        return self.queue.queued_at(claimed.id).addCallback(
            lambda at: None if at is None else time.time() - at
        )

    # ------------------------------------------------------------------ messages

    def _accept(self, envelope: Envelope, client: str) -> defer.Deferred[int]:
        assert self.queue is not None

        def queued(ids: list[int]) -> int:
            (queue_id,) = ids
            self._queued(queue_id, envelope, client)
            return queue_id

        return self.queue.enqueue([envelope]).addCallback(queued)

    def _submit(
        self, envelope: Envelope, client: str, key: Key | None
    ) -> defer.Deferred[Idempotent]:
        """The HTTP door: :meth:`_accept`, or with an Idempotency-Key the queue's
        ``enqueue_once`` (the key committed with the message)."""
        if key is None:
            return self._accept(envelope, client).addCallback(
                lambda queue_id: Idempotent(queue_id, envelope.message_id, "queued")
            )
        assert self.queue is not None
        scope, name, fingerprint = key

        def done(result: Idempotent) -> Idempotent:
            if result.outcome == "queued":
                self._queued(result.id, envelope, client)
            return result

        return self.queue.enqueue_once(scope, name, fingerprint, envelope).addCallback(done)

    def _wake(self) -> None:
        if self.worker is not None:
            self.worker.wake()

    def _queued(self, queue_id: int, envelope: Envelope, client: str) -> None:
        """A message committed to the queue by either door: log it, count it, wake the worker."""
        sender = str(envelope.sender)
        nrcpt = len(envelope.recipients)
        # One pre-formatted field is cheaper for twisted.logger's text formatting; the
        # values stay in the event as fields for structured observers.
        log.info(
            "{line}",
            line=f"queued {queue_id} from=<{sender}> size={envelope.size} nrcpt={nrcpt} "
            f"client={client}",
            queue_id=queue_id,
            sender=sender,
            size=envelope.size,
            nrcpt=nrcpt,
            client=client,
        )
        self.metrics.accepted()
        self._accepted_at[queue_id] = time.time()
        if self.worker is not None:
            self.worker.wake()

    def _outcome(self, claimed: ClaimedMessage, outcome: Outcome) -> None:
        """One attempt recorded: log it, count it, and bounce a failed message."""
        self._log_outcome(claimed, outcome)
        self.metrics.delivered(outcome.state, outcome.code)
        self.history.add(outcome.state)
        if outcome.state == "deferred":
            return
        accepted = self._accepted_at.pop(outcome.id, None)
        if outcome.state == "sent" and accepted is not None:
            self.metrics.observe_latency(time.time() - accepted)
        if outcome.state == "failed" and self.config.bounces:
            self._bounce(claimed, outcome, accepted)
        elif self.worker is not None:
            self.worker.enhanced.pop(outcome.id, None)

    def _bounce(self, claimed: ClaimedMessage, outcome: Outcome, accepted: float | None) -> None:
        try:
            enhanced = self.worker.enhanced.pop(outcome.id, None) if self.worker else None
            report = notification(
                claimed, outcome, self.config.hostname, accepted or time.time(), enhanced
            )
        except ValueError as e:
            log.error("no notification for {queue_id}: {error}", queue_id=outcome.id, error=e)
            return
        if report is None:
            log.info("no notification for {queue_id} (its sender is <>)", queue_id=outcome.id)
            return
        assert self.queue is not None
        worker = self.worker

        def queued(ids: list[int]) -> None:
            log.info(
                "notification {dsn} queued for {queue_id} to=<{sender}>",
                dsn=ids[0],
                queue_id=outcome.id,
                sender=str(claimed.envelope.sender),
            )
            if worker is not None:
                worker.wake()

        self.queue.enqueue([report]).addCallbacks(
            queued,
            lambda f: log.failure("could not queue the notification for {id}", f, id=outcome.id),
        )

    def _log_outcome(self, claimed: ClaimedMessage, outcome: Outcome) -> None:
        upstream = self._mailer.server.label if self._mailer is not None else "?"
        for (_, state, code, text), rcpt in zip(
            outcome.recipients, claimed.envelope.recipients, strict=False
        ):
            status = "deferred" if state == "pending" else state
            reply = code if code is not None else "-"
            log.info(
                "{line}",
                line=f"delivery {outcome.id} to=<{rcpt}> relay={upstream} "
                f"attempt={outcome.attempts} status={status} reply={reply} {text}",
                queue_id=outcome.id,
                rcpt=str(rcpt),
                upstream=upstream,
                attempt=outcome.attempts,
                status=status,
                code=code,
                text=text,
            )

    # ------------------------------------------------------------------ health and metrics

    def _sessions_changed(self, change: int) -> None:
        if change > 0:
            self.metrics.session_opened()
        else:
            self.metrics.session_closed()

    def _queue_sizes(self) -> defer.Deferred[QueueSizes]:
        if self.queue is None:
            return defer.succeed(({}, None))
        queue = self.queue
        sizes = queue.summary()

        def with_age(summary: Any) -> defer.Deferred[QueueSizes]:
            def aged(oldest: float | None) -> QueueSizes:
                return summary.counts, None if oldest is None else time.time() - oldest

            return queue.oldest_waiting().addCallback(aged)

        return sizes.addCallback(with_age)

    def health(self) -> defer.Deferred[Mapping[str, Any]]:
        """The relay's state for ``/healthz``: a write to the queue is tried (a lease renewal
        of this relay's own claims), the worker and the upstream are reported."""
        worker = self.worker
        state: dict[str, Any] = {
            "worker_running": worker is not None and worker.running,
            "upstream": "unknown",
        }
        if worker is not None:
            problem = worker.upstream_error
            state["upstream"] = "ok" if problem is None else f"unreachable: {problem}"
        if self.queue is None:
            return defer.succeed({**state, "queue_writable": False})

        def written(_: object) -> Mapping[str, Any]:
            return {**state, "queue_writable": True}

        def failed(failure: Any) -> Mapping[str, Any]:
            if failure.check(defer.TimeoutError):
                error = (
                    f"no answer within {HEALTH_TIMEOUT:g} s: the queue is locked by another "
                    "process or cannot be reached"
                )
                log.warn("the queue cannot be written: {error}", error=error)
            else:
                error = str(failure.value)
                log.failure("the queue cannot be written", failure)
            return {**state, "queue_writable": False, "queue_error": error}

        # A database that went away is waited for by the queue (tried again with backoff):
        # the check answers "not writable" after HEALTH_TIMEOUT seconds instead of hanging.
        renewed = self.queue.renew(self.owner, self.config.lease)
        clock = IReactorTime(self.reactor)
        return renewed.addTimeout(HEALTH_TIMEOUT, clock).addCallbacks(written, failed)

    # ------------------------------------------------------------------ stop

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        config = self.config
        if self._starting is not None:
            await self._starting
        for port in self.ports:
            await defer.maybeDeferred(port.stopListening)
        self.ports.clear()
        if self.submission is not None:
            await self.submission.shut_down(config.shutdown_timeout)
        if self.worker is not None and self._worker_done is not None:
            self.worker.stop()
            worker = self.worker
            queue = self.queue

            def give_up() -> None:
                # A queue that cannot be reached (a database away) would hold the worker's
                # claim or records for ever: closed, they fail and the worker ends. What it
                # held returns to the queue (its lease runs out, or the next start takes it).
                if queue is not None:
                    queue.close()

            timers = [
                self.reactor.callLater(config.shutdown_timeout, worker.abort),
                self.reactor.callLater(config.shutdown_timeout + CLOSE_GRACE, give_up),
            ]
            await self._worker_done
            for timer in timers:
                if timer.active():
                    timer.cancel()
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        if self._mailer is not None:
            await self._mailer.close()
        if self.suppression is not None:
            await self.suppression.close()
        if self.queue is not None:
            await self.queue.close()
        self.deliverers.release()
        # twistd re-raises the signal that stopped the reactor once it has run down (so the exit
        # status says "killed by SIGTERM"); a relay that stopped cleanly exits 0 instead, as
        # service managers and scripts expect of a graceful stop.
        if getattr(self.reactor, "_exitSignal", None) == signal.SIGTERM:
            self.reactor._exitSignal = None  # type: ignore[attr-defined]
        log.info("stopped")
