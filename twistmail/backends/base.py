"""What every delivery backend shares: turning messages into envelopes, and Django's counting.

:func:`to_envelope` converts a message exactly as :class:`twistmail.Mailer` does (the same
:func:`twistmail.message.to_envelope`), so a test written against the ``locmem`` backend accepts
and refuses what ``smtp`` would; only a message without recipients is skipped, as in Django.
:class:`BaseBackend` implements :class:`~twistmail.interfaces.IBackend` around one hook,
:meth:`BaseBackend.deliver`.
"""

from __future__ import annotations

from collections.abc import Iterable
from email.message import EmailMessage
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure
from zope.interface import implementer

from twistmail import message as _message
from twistmail._twisted import when_done
from twistmail.errors import MessageError
from twistmail.interfaces import IBackend
from twistmail.message import Envelope, MessageLike

__all__ = ["BaseBackend", "to_envelope"]

_RECIPIENT_HEADERS = ("To", "Cc", "Bcc")


def to_envelope(message: MessageLike) -> Envelope | None:
    """The envelope for ``message``, or None when it has no recipients (Django skips those).

    "No recipients" means: an ``EmailMessage`` without a non-blank To, Cc or Bcc header, a
    triple whose recipient list is empty, or an :class:`Envelope` without recipients. Anything
    else is converted by :func:`twistmail.message.to_envelope`, as :class:`twistmail.Mailer`
    does: a message that cannot be sent raises :class:`~twistmail.errors.MessageError`
    (``AddressError``, ``HeaderInjectionError`` ...).
    """
    if isinstance(message, Envelope):
        if not message.recipients:
            return None
    elif isinstance(message, EmailMessage):
        if not any(
            str(value).strip()
            for name in _RECIPIENT_HEADERS
            for value in message.get_all(name) or ()
        ):
            return None
    elif isinstance(message, tuple) and len(message) == 3:
        sender, recipients, data = message
        if isinstance(recipients, Iterable) and not isinstance(recipients, str):
            recipient_list = list(recipients)
            if not recipient_list:
                return None
            message = (sender, recipient_list, data)
    return _message.to_envelope(message)


@implementer(IBackend)
class BaseBackend:
    """A backend that delivers one envelope at a time through :meth:`deliver`.

    ``send_messages`` validates every message first, skips those without recipients, delivers
    the rest concurrently and fires with how many were delivered. An invalid message or a
    failed delivery does not stop the others; once all were tried the Deferred fails with the
    first error (in message order) unless ``fail_silently`` is true.
    """

    def __init__(self, fail_silently: bool = False) -> None:
        self.fail_silently = fail_silently
        self._in_flight: set[defer.Deferred[Any]] = set()

    def open(self) -> defer.Deferred[None]:
        """Nothing to prepare by default."""
        return defer.succeed(None)

    def close(self) -> defer.Deferred[None]:
        """Fires once every ``send_messages`` call in flight has finished."""
        return self.settled()

    def settled(self) -> defer.Deferred[None]:
        """Fires (with None) once the ``send_messages`` calls now in flight have finished."""
        return defer.gatherResults([when_done(d) for d in self._in_flight]).addCallback(
            lambda _: None
        )

    def send_messages(self, messages: Iterable[MessageLike]) -> defer.Deferred[int]:
        """Deliver ``messages``; a Deferred firing with the number delivered."""
        if isinstance(messages, EmailMessage | Envelope | bytes | str):
            raise TypeError("send_messages takes an iterable of messages: wrap one in a list")
        prepared: list[Envelope | Exception] = []
        for message in messages:
            try:
                envelope = to_envelope(message)
            except MessageError as error:
                prepared.append(error)
                continue
            if envelope is not None:
                prepared.append(envelope)
        if not prepared:
            return defer.succeed(0)
        ready = self.ready() if any(isinstance(p, Envelope) for p in prepared) else None
        if ready is None:
            ready = defer.succeed(None)
        d: defer.Deferred[Any] = ready.addCallbacks(
            lambda _: self._deliver_all(prepared),
            lambda failure: self._fail_all(prepared, failure),
        )
        d.addCallback(self._count)
        self._in_flight.add(d)

        def done(result: object) -> object:
            self._in_flight.discard(d)
            return result

        return d.addBoth(done)

    # Hooks for subclasses.

    def ready(self) -> defer.Deferred[None]:
        """Fires once the backend can deliver; by default :meth:`open`."""
        return self.open()

    def deliver(self, envelope: Envelope) -> defer.Deferred[None] | None:
        """Deliver one envelope (may return a Deferred, or raise / fail on error)."""
        raise NotImplementedError

    # Internals.

    def _deliver_all(
        self, prepared: list[Envelope | Exception]
    ) -> defer.Deferred[list[tuple[bool, Any]]]:
        attempts: list[defer.Deferred[Any]] = [
            defer.fail(item)
            if isinstance(item, Exception)
            else defer.maybeDeferred(self.deliver, item)
            for item in prepared
        ]
        return defer.DeferredList(attempts, consumeErrors=True)

    @staticmethod
    def _fail_all(prepared: list[Envelope | Exception], failure: Failure) -> list[tuple[bool, Any]]:
        # Could not get ready (connect, create the directory): every message failed with that.
        return [
            (False, Failure(item) if isinstance(item, Exception) else failure) for item in prepared
        ]

    def _count(self, outcomes: list[tuple[bool, Any]]) -> int | Failure:
        sent = sum(1 for ok, _ in outcomes if ok)
        if not self.fail_silently:
            for ok, failure in outcomes:
                if not ok:
                    return failure  # type: ignore[no-any-return]
        return sent
