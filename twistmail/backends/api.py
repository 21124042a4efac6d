"""Choosing a backend by name, the process-wide default, and Django's ``send_mail``."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Sequence
from typing import Any, cast

from twisted.internet import defer
from twisted.python.failure import Failure

from twistmail.address import check_header_value, parse_address
from twistmail.composer import compose
from twistmail.errors import MessageError, UnknownBackendError
from twistmail.interfaces import IBackend
from twistmail.message import Envelope

__all__ = [
    "ALIASES",
    "UnknownBackendError",
    "configure",
    "default_backend",
    "get_backend",
    "send_mail",
]

ALIASES = {
    "smtp": "twistmail.backends.smtp.SMTPBackend",
    "console": "twistmail.backends.console.ConsoleBackend",
    "file": "twistmail.backends.file.FileBackend",
    "locmem": "twistmail.backends.locmem.LocmemBackend",
    "dummy": "twistmail.backends.dummy.DummyBackend",
    "spool": "twistmail.backends.spool.SpoolBackend",
}
"""Short backend names and the classes they stand for."""

_ENV_BACKEND = "TWISTMAIL_BACKEND"


def backend_factory(name: str) -> Callable[..., Any]:
    """The class (or factory) that ``name`` (an alias or a dotted path) stands for."""
    path = ALIASES.get(name, name)
    module_name, _, attribute = path.rpartition(".")
    if not module_name:
        raise UnknownBackendError(
            f"unknown backend {name!r}: give one of {', '.join(sorted(ALIASES))} "
            "or a dotted path such as 'package.module.Class'"
        )
    shown = name if path == name else f"{name!r} ({path})"
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise UnknownBackendError(
            f"cannot load backend {shown}: importing {module_name!r} failed: {error}",
            name=error.name,
        ) from error
    try:
        factory = getattr(module, attribute)
    except AttributeError:
        raise UnknownBackendError(
            f"cannot load backend {shown}: module {module_name!r} has no attribute {attribute!r}",
            name=module_name,
        ) from None
    if not callable(factory):
        raise UnknownBackendError(f"cannot load backend {shown}: {path} is not a class")
    return cast(Callable[..., Any], factory)


def get_backend(name: str, /, **options: Any) -> IBackend:
    """A new backend: ``name`` is an alias from :data:`ALIASES` or a dotted class path.

    ``options`` (``fail_silently`` and the backend's own) go to its constructor. Raises
    :class:`UnknownBackendError` when ``name`` cannot be loaded, ``TypeError`` for an option the
    backend does not take or a class that does not provide :class:`~twistmail.interfaces.IBackend`.
    """
    backend = backend_factory(name)(**options)
    if not IBackend.providedBy(backend):
        raise TypeError(f"backend {name!r} made {backend!r}, which does not provide IBackend")
    return IBackend(backend)


# The default backend -------------------------------------------------------------------------

_Default = tuple[str, dict[str, Any]] | IBackend | None
_default: list[_Default] = [None]


def configure(backend: str | IBackend | None, /, **options: Any) -> None:
    """Choose what :func:`send_mail` uses when it is given no ``backend=``.

    A name (with ``options``) makes a new backend for each such call, closed afterwards; an
    :class:`~twistmail.interfaces.IBackend` instance is shared and never closed by
    ``send_mail``; None goes back to the ``TWISTMAIL_BACKEND`` environment variable, else
    ``"smtp"`` (``TWISTMAIL_SMTP_URL``, else ``smtp://localhost:25``). A name is checked now.
    """
    if isinstance(backend, str):
        backend_factory(backend)
        _default[0] = (backend, dict(options))
    elif backend is None or IBackend.providedBy(backend):
        if options:
            raise TypeError("options only go with a backend name")
        _default[0] = backend
    else:
        raise TypeError(f"configure() takes a backend name or an IBackend, not {backend!r}")


def _swap_default(new: _Default) -> _Default:
    """Replace the default configuration, returning the previous one (for test fixtures)."""
    previous, _default[0] = _default[0], new
    return previous


def default_backend(*, fail_silently: bool = False) -> tuple[IBackend, bool]:
    """The default backend and whether the caller owns it (must close it), per :func:`configure`."""
    config = _default[0]
    if config is None:
        config = (os.environ.get(_ENV_BACKEND) or "smtp", {})
    if isinstance(config, tuple):
        name, options = config
        return get_backend(name, **{"fail_silently": fail_silently, **options}), True
    return config, False


# send_mail -----------------------------------------------------------------------------------


def send_mail(
    subject: str,
    body: str,
    from_email: str,
    recipient_list: Sequence[str],
    *,
    html: str | None = None,
    backend: IBackend | None = None,
    fail_silently: bool = False,
) -> defer.Deferred[int]:
    """Send one message with a text body (and an HTML alternative when ``html`` is given).

    Every address of ``recipient_list`` goes in the To header; an empty list sends nothing
    (fires with 0). ``backend`` defaults to the one chosen by :func:`configure`. Fires with 1
    once sent; with ``fail_silently`` errors (including an invalid address or header) give 0.
    """
    try:
        message = build_message(subject, body, from_email, recipient_list, html=html)
    except MessageError:
        if fail_silently:
            return defer.succeed(0)
        return defer.fail()
    if message is None:
        return defer.succeed(0)
    owned = False
    if backend is None:
        backend, owned = default_backend(fail_silently=fail_silently)
    chosen = backend
    d = chosen.send_messages([message])
    if owned:

        def close(result: object) -> defer.Deferred[object]:
            return chosen.close().addBoth(lambda _: result)

        d.addBoth(close)
    if fail_silently:

        def swallow(failure: Failure) -> int:
            return 0

        d.addErrback(swallow)
    return d


def build_message(
    subject: str,
    body: str,
    from_email: str,
    recipient_list: Sequence[str],
    *,
    html: str | None = None,
) -> Envelope | None:
    """The message :func:`send_mail` sends (by :func:`twistmail.compose`, with Date and
    Message-ID), or None for an empty ``recipient_list`` once the rest is checked."""
    if isinstance(recipient_list, str):
        raise TypeError("recipient_list must be a list of addresses, not a single str")
    if not recipient_list:
        check_header_value("Subject", subject)
        parse_address(from_email, field="From")
        return None
    return compose(from_email, list(recipient_list), subject=subject, text=body, html=html)
