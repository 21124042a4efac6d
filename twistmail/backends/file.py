"""The ``file`` backend: one ``.eml`` file per message in a directory, written off the reactor."""

from __future__ import annotations

import itertools
import os
import secrets
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer, threads
from twisted.internet.interfaces import IReactorThreads

from twistmail._twisted import Reactor, default_reactor
from twistmail.message import Envelope, unstuff

from .base import BaseBackend

__all__ = ["FileBackend", "eml_name"]

_counter = itertools.count()


def eml_name() -> str:
    """A new file name that sorts by creation time and collides with no other, in any process.

    ``{time_ns:020d}-{pid}-{counter:08d}-{random}.eml``: the time orders the names, and the
    process id, a per-process counter and 32 random bits keep them apart.
    """
    return f"{time.time_ns():020d}-{os.getpid()}-{next(_counter):08d}-{secrets.token_hex(4)}.eml"


def _write(directory: Path, name: str, data: bytes) -> None:
    """Write ``data`` under a hidden temporary name, then rename it into place atomically."""
    temporary = directory / f".{name}.tmp"
    with open(temporary, "xb") as f:
        f.write(data)
    os.rename(temporary, directory / name)


def _make_directory(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)


class FileBackend(BaseBackend):
    """Writes each message to its own ``.eml`` file in ``file_path`` (created if missing).

    The file holds the message exactly as it would be sent (CRLF line ends, without SMTP
    dot-stuffing); the envelope is not kept, so Bcc recipients do not appear. Readers never see a
    partial file: each is written under a hidden ``.*.tmp`` name and renamed. Disk work runs in
    the reactor's thread pool (``reactor=`` chooses the reactor).
    """

    def __init__(
        self,
        fail_silently: bool = False,
        *,
        file_path: str | os.PathLike[str],
        reactor: Reactor | None = None,
    ) -> None:
        super().__init__(fail_silently)
        self.file_path = Path(file_path)
        self._reactor = reactor
        self._opened = False

    def open(self) -> defer.Deferred[None]:
        """Create the directory if it is missing."""
        d = self._in_thread(_make_directory, self.file_path)

        def opened(_: None) -> None:
            self._opened = True

        return d.addCallback(opened)

    def ready(self) -> defer.Deferred[None]:
        return defer.succeed(None) if self._opened else self.open()

    def deliver(self, envelope: Envelope) -> defer.Deferred[None]:
        """Write one message to a new file."""
        return self._in_thread(_write, self.file_path, eml_name(), unstuff(envelope.payload))

    def _in_thread(self, function: Any, *args: Any) -> defer.Deferred[None]:
        if self._reactor is None:
            self._reactor = default_reactor()
        reactor = IReactorThreads(self._reactor)
        d: defer.Deferred[None] = threads.deferToThreadPool(
            reactor, reactor.getThreadPool(), function, *args
        )
        return d
