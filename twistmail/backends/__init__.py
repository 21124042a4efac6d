"""Delivery backends: Django's mail backend contract (:class:`~twistmail.interfaces.IBackend`)
with Deferreds.

``get_backend("smtp" | "console" | "file" | "locmem" | "dummy" | "spool" | "pkg.mod.Class",
**options)`` makes one; :func:`send_mail` sends a simple message through one (by default the
backend chosen with :func:`configure`). Each backend lives in its own module:
:mod:`~twistmail.backends.smtp`, :mod:`~twistmail.backends.console`,
:mod:`~twistmail.backends.file`, :mod:`~twistmail.backends.locmem`,
:mod:`~twistmail.backends.dummy` and :mod:`~twistmail.backends.spool`.
"""

from .api import (
    ALIASES,
    UnknownBackendError,
    configure,
    default_backend,
    get_backend,
    send_mail,
)
from .base import BaseBackend, to_envelope
from .console import ConsoleBackend
from .dummy import DummyBackend
from .file import FileBackend
from .locmem import LocmemBackend, OutboxMessage, outbox
from .smtp import SMTPBackend

__all__ = [
    "ALIASES",
    "BaseBackend",
    "ConsoleBackend",
    "DummyBackend",
    "FileBackend",
    "LocmemBackend",
    "OutboxMessage",
    "SMTPBackend",
    "UnknownBackendError",
    "configure",
    "default_backend",
    "get_backend",
    "outbox",
    "send_mail",
    "to_envelope",
]
