"""The relay as a Twisted service: one queue, the submission listener and the delivery worker.

:meth:`RelayService.make` takes the queue's delivery lock (a second relay on the same queue
file is refused there, before anything starts); starting opens the queue, gives back the claims
of earlier relays on this file (they are dead: the lock was free), starts the worker and then
listens. Stopping (SIGTERM under ``twistd``) stops listening, ends idle sessions with 421 and
lets messages in DATA finish, lets deliveries in flight finish within ``shutdown_timeout``
seconds (then cuts them off: they stay queued), and closes the queue.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import signal
import socket
import time
from typing import Any

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from .._twisted import Reactor, default_reactor
from ..errors import QueueError
from ..message import Envelope
from ..queue.records import ClaimedMessage, Outcome
from ..queue.sqlite import SqliteQueue, read_queue_status
from .config import RelayConfig
from .submission import SubmissionFactory
from .worker import RelayWorker

__all__ = ["OWNER_PREFIX", "DeliveryLock", "RelayService", "StartError"]

log = Logger()

OWNER_PREFIX = "relay:"
"""Queue claims of a relay carry owner tokens starting with this."""


class StartError(Exception):
    """The relay cannot start (the queue is locked by another relay, or is not a queue)."""


class DeliveryLock:
    """The one-deliverer-per-queue lock: ``PATH.deliver.lock``, held with ``flock``.

    The kernel drops it when the process dies, so a lock found free means every earlier
    holder is gone. Writers (the spool backend) never take it.
    """

    def __init__(self, queue_path: str) -> None:
        self.path = queue_path + ".deliver.lock"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise StartError(
                f"{queue_path}: another process (pid {holder}) is already delivering from this "
                f"queue; stop it first (lock {self.path})"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd: int | None = fd

    def release(self) -> None:
        """Drop the lock (idempotent)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class RelayService(MultiService):
    """The running relay; see the module's docstring."""

    def __init__(self, config: RelayConfig, lock: DeliveryLock, reactor: Reactor) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.lock = lock
        self.queue: SqliteQueue | None = None
        self.worker: RelayWorker | None = None
        self.submission: SubmissionFactory | None = None
        self.ports: list[IListeningPort] = []
        self.owner = f"{OWNER_PREFIX}{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._starting: defer.Deferred[None] | None = None
        self._worker_done: defer.Deferred[Any] | None = None
        self._mailer: Any = None

    @classmethod
    def make(cls, config: RelayConfig, reactor: Reactor | None = None) -> RelayService:
        """The relay for ``config``, holding its queue's delivery lock.

        :raises StartError: the queue is another relay's, or the file is not a queue.
        """
        if os.path.exists(config.queue_path):
            try:
                read_queue_status(config.queue_path, limit=0)
            except QueueError as e:
                raise StartError(str(e)) from None
        lock = DeliveryLock(config.queue_path)
        return cls(config, lock, reactor if reactor is not None else default_reactor())

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
        self.queue = queue = await SqliteQueue.open(
            config.queue_path, reactor=self.reactor, close_at_shutdown=False
        )
        taken = await queue.take_back(OWNER_PREFIX)
        if taken:
            log.info("took back {n} messages claimed by a relay that died", n=taken)
        self._mailer = config.mailer(self.reactor)
        self.worker = RelayWorker(
            queue,
            self._mailer,
            retry=config.retry_policy(),
            owner=self.owner,
            max_age=config.max_age,
            age=self._age,
            reactor=self.reactor,  # type: ignore[arg-type]
            on_outcome=self._log_outcome,
        )
        self._worker_done = self.worker.run()
        self._worker_done.addErrback(lambda f: log.failure("the delivery worker failed", f))
        if config.submission is not None:
            self.submission = SubmissionFactory(config, self._accept, clock=self.reactor)
            endpoint = serverFromString(self.reactor, config.submission)
            port = await endpoint.listen(self.submission)
            self.ports.append(port)
            host = port.getHost()
            log.info(
                "SMTP submission listening on {host}:{port}",
                host=getattr(host, "host", host),
                port=getattr(host, "port", ""),
            )
        log.info(
            "relaying to {upstream} from queue {queue}",
            upstream=self._mailer.server.label,
            queue=config.queue_path,
        )

    def _age(self, claimed: ClaimedMessage) -> defer.Deferred[float | None]:
        assert self.queue is not None
        return self.queue.queued_at(claimed.id).addCallback(
            lambda at: None if at is None else time.time() - at
        )

    # ------------------------------------------------------------------ messages

    def _accept(self, envelope: Envelope, client: str) -> defer.Deferred[int]:
        assert self.queue is not None
        assert self.worker is not None
        worker = self.worker

        def queued(ids: list[int]) -> int:
            (queue_id,) = ids
            log.info(
                "queued {queue_id} from=<{sender}> size={size} nrcpt={nrcpt} client={client}",
                queue_id=queue_id,
                sender=str(envelope.sender),
                size=envelope.size,
                nrcpt=len(envelope.recipients),
                client=client,
            )
            worker.wake()
            return queue_id

        return self.queue.enqueue([envelope]).addCallback(queued)

    def _log_outcome(self, claimed: ClaimedMessage, outcome: Outcome) -> None:
        upstream = self._mailer.server.label if self._mailer is not None else "?"
        for (_, state, code, text), rcpt in zip(
            outcome.recipients, claimed.envelope.recipients, strict=False
        ):
            log.info(
                "delivery {queue_id} to=<{rcpt}> relay={upstream} attempt={attempt} "
                "status={status} reply={code} {text}",
                queue_id=outcome.id,
                rcpt=str(rcpt),
                upstream=upstream,
                attempt=outcome.attempts,
                status="deferred" if state == "pending" else state,
                code=code if code is not None else "-",
                text=text,
            )

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
            timer = self.reactor.callLater(config.shutdown_timeout, worker.abort)
            await self._worker_done
            if timer.active():
                timer.cancel()
        if self._mailer is not None:
            await self._mailer.close()
        if self.queue is not None:
            await self.queue.close()
        self.lock.release()
        # twistd re-raises the signal that stopped the reactor once it has run down (so the exit
        # status says "killed by SIGTERM"); a relay that stopped cleanly exits 0 instead, as
        # service managers and scripts expect of a graceful stop.
        if getattr(self.reactor, "_exitSignal", None) == signal.SIGTERM:
            self.reactor._exitSignal = None  # type: ignore[attr-defined]
        log.info("stopped")
