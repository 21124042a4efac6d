"""The ``smtp`` backend: a pooled :class:`twistmail.Mailer` behind the backend contract."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

from twistmail.mailer import Mailer
from twistmail.message import Envelope

from .base import BaseBackend

__all__ = ["DEFAULT_URL", "SMTPBackend"]

DEFAULT_URL = "smtp://localhost:25"
"""Where mail goes when neither ``url=`` nor ``TWISTMAIL_SMTP_URL`` says (Django's default)."""


class SMTPBackend(BaseBackend):
    """Delivers through one :class:`~twistmail.Mailer` whose connections are reused across calls.

    ``url`` defaults to the ``TWISTMAIL_SMTP_URL`` environment variable, else
    :data:`DEFAULT_URL`; every other keyword option (``concurrency``, ``rate``, ``ca_file``,
    ``timeout``, ``max_attempts``, ``reactor`` ...) is passed to the Mailer. Connections are
    opened by :meth:`open` or the first send and kept until :meth:`close`; sending after
    ``close()`` starts a new pool. A message counts as sent when the server accepted at least
    one of its recipients, as with Django's SMTP backend.
    """

    def __init__(self, fail_silently: bool = False, *, url: str | None = None, **options: Any):
        super().__init__(fail_silently)
        # Kept private: the URL may carry a password.
        self._url = url if url is not None else os.environ.get("TWISTMAIL_SMTP_URL", DEFAULT_URL)
        self._options = options
        # Made now so that a bad URL or an unknown option is refused at construction.
        self._mailer: Mailer | None = Mailer(self._url, **options)

    def __repr__(self) -> str:
        return f"<SMTPBackend {self._mailer!r}>" if self._mailer else "<SMTPBackend (closed)>"

    @property
    def mailer(self) -> Mailer:
        """The Mailer in use (a new one after :meth:`close`), e.g. for ``send_many``."""
        if self._mailer is None:
            self._mailer = Mailer(self._url, **self._options)
        return self._mailer

    def open(self) -> defer.Deferred[None]:
        """Make sure a connection is up (a failure is swallowed when ``fail_silently``)."""
        pool = self.mailer.pool
        d: defer.Deferred[None] = pool.acquire().addCallback(pool.release)

        def failed(failure: Failure) -> Failure | None:
            return None if self.fail_silently else failure

        d.addErrback(failed)
        return d

    def close(self) -> defer.Deferred[None]:
        """Wait for messages in flight, then QUIT every connection."""
        mailer, self._mailer = self._mailer, None
        if mailer is None:
            return defer.succeed(None)
        return mailer.close()

    def ready(self) -> defer.Deferred[None]:
        # The pool connects on demand: no need to open a connection before sending.
        return defer.succeed(None)

    def deliver(self, envelope: Envelope) -> defer.Deferred[None]:
        """Send one envelope, retrying temporary failures as the Mailer does."""
        return self.mailer.send(envelope).addCallback(lambda _: None)
