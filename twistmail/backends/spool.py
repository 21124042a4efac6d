"""The ``spool`` backend: enqueue messages durably now, deliver them later with ``twistmail drain``.

``send_messages`` validates each message exactly as :class:`twistmail.Mailer` would (through
:func:`~twistmail.backends.base.to_envelope`), stores the envelopes in a spool file (the SQLite
queue, :class:`~twistmail.queue.sqlite.SqliteQueue`) and fires once they are committed and
fsync'd, without talking to any server. ``twistmail drain --spool PATH --smtp URL`` (or
:class:`~twistmail.queue.worker.Drain`) delivers them.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable
from email.message import EmailMessage

from twisted.internet import defer
from twisted.python.failure import Failure

from twistmail._twisted import Reactor
from twistmail.errors import MessageError
from twistmail.message import Envelope, MessageLike
from twistmail.queue.sqlite import SqliteQueue

from .base import BaseBackend, to_envelope

__all__ = ["SpoolBackend"]


class SpoolBackend(BaseBackend):
    """Enqueues messages into the spool file at ``path`` (created if missing).

    The count is the number of messages enqueued: messages without recipients are skipped and
    not counted; an invalid message (bad address, CR/LF in a header) is not enqueued, and once
    the valid ones are committed the Deferred fails with the first such error, naming the
    message's position, unless ``fail_silently``. The queue opens on :meth:`open` or the first
    send and stays open until :meth:`close` (or reactor shutdown).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        fail_silently: bool = False,
        *,
        reactor: Reactor | None = None,
    ) -> None:
        super().__init__(fail_silently)
        self.path = os.fspath(path)
        self._reactor = reactor
        self._queue: SqliteQueue | None = None
        self._opening: defer.Deferred[None] | None = None
        self._waiting: list[defer.Deferred[None]] = []

    def __repr__(self) -> str:
        return f"<SpoolBackend {self.path!r}>"

    @property
    def queue(self) -> SqliteQueue | None:
        """The open queue, or None before :meth:`open` / after :meth:`close`."""
        return self._queue

    def open(self) -> defer.Deferred[None]:
        """Open (and create) the spool file; idempotent, concurrent calls share the work."""
        if self._queue is not None:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._waiting.append(waiter)
        if self._opening is None:
            self._opening = SqliteQueue.open(self.path, reactor=self._reactor).addBoth(self._opened)
        return waiter

    def _opened(self, result: SqliteQueue | Failure) -> None:
        self._opening = None
        waiting, self._waiting = self._waiting, []
        if isinstance(result, Failure):
            for waiter in waiting:
                waiter.errback(result)
            return
        self._queue = result
        for waiter in waiting:
            waiter.callback(None)

    def close(self) -> defer.Deferred[None]:
        """Wait for enqueues in flight, then close the file; idempotent, safe without open()."""
        if self._opening is not None:
            return self.open().addBoth(lambda _: self.close())
        queue, self._queue = self._queue, None
        if queue is None:
            return defer.succeed(None)
        return queue.close()

    def send_messages(self, messages: Iterable[MessageLike]) -> defer.Deferred[int]:
        """Enqueue ``messages``; a Deferred firing with the number enqueued once committed."""
        if isinstance(messages, EmailMessage | Envelope | bytes | str):
            raise TypeError("send_messages takes an iterable of messages: wrap one in a list")
        envelopes: list[Envelope] = []
        first_error: Exception | None = None
        for index, message in enumerate(messages):
            try:
                envelope = to_envelope(message)
            except MessageError as error:
                if first_error is None:
                    first_error = _naming(error, index)
                continue
            if envelope is not None:
                envelopes.append(envelope)
        refusal = None if self.fail_silently else first_error
        if not envelopes:
            return defer.fail(refusal) if refusal is not None else defer.succeed(0)

        def counted(ids: list[int]) -> int:
            if refusal is not None:
                raise refusal
            return len(ids)

        return self._enqueue(envelopes).addCallback(counted)

    def _enqueue(self, envelopes: list[Envelope]) -> defer.Deferred[list[int]]:
        queue = self._queue
        if queue is not None:
            return queue.enqueue(envelopes)

        def opened(_: None) -> defer.Deferred[list[int]]:
            return self._enqueue(envelopes)

        return self.open().addCallback(opened)


def _naming(error: Exception, index: int) -> Exception:
    """``error`` (same class and attributes) with its text prefixed by the message position."""
    if not error.args or not isinstance(error.args[0], str):
        return error
    named = copy.copy(error)
    named.args = (f"message {index}: {error.args[0]}", *error.args[1:])
    named.__cause__ = None
    return named
