"""Every zope.interface of twistmail, in one place."""

from __future__ import annotations

from zope.interface import Attribute, Interface

__all__ = ["IBackend"]


class IBackend(Interface):
    """A delivery backend: Django's mail backend contract, returning Deferreds.

    ``messages`` passed to :meth:`send_messages` are anything :class:`twistmail.Mailer`
    accepts: ``email.message.EmailMessage`` objects, :class:`twistmail.Envelope` objects or
    ``(sender, recipients, data_bytes)`` triples. A message with no recipients is skipped and not
    counted, as in Django.

    Implementations: :mod:`twistmail.backends` (``get_backend(...)`` makes one by name). For
    static typing annotate with :class:`twistmail.backends.Backend`, whose methods are typed
    with the Deferreds described here.
    """

    fail_silently = Attribute(
        "When true, delivery errors are swallowed and only the count reflects them."
    )

    def open() -> object:
        """Prepare for sending (connect, create a directory...); idempotent.

        Returns a Deferred firing with None once ready.
        """

    def close() -> object:
        """Release what :meth:`open` or sending acquired; idempotent, safe without open().

        Returns a Deferred firing with None once released.
        """

    def send_messages(messages: object) -> object:
        """Deliver ``messages`` (an iterable); a Deferred firing with the number delivered.

        With ``fail_silently`` false, the Deferred fails with the first delivery error, after
        every message has been tried.
        """
