"""The ``console`` backend: each message written to a stream, for development."""

from __future__ import annotations

import sys
from typing import TextIO

from twistmail.message import Envelope, unstuff

from .base import BaseBackend

__all__ = ["SEPARATOR", "ConsoleBackend"]

SEPARATOR = "-" * 79 + "\n"
"""The line written after each message (Django's console backend writes the same)."""


class ConsoleBackend(BaseBackend):
    """Writes each message as it would go on the wire (LF line ends) to ``stream``.

    ``stream`` is a text stream, ``sys.stdout`` (looked up at each write) by default. Each
    message and its :data:`SEPARATOR` go out in one ``write`` call, so messages never
    interleave. The envelope is not shown: Bcc recipients do not appear.
    """

    def __init__(self, fail_silently: bool = False, *, stream: TextIO | None = None) -> None:
        super().__init__(fail_silently)
        self.stream = stream

    def deliver(self, envelope: Envelope) -> None:
        """Write one message and its separator."""
        text = unstuff(envelope.payload).decode("utf-8", "replace").replace("\r\n", "\n")
        stream = self.stream if self.stream is not None else sys.stdout
        stream.write(f"{text}\n{SEPARATOR}" if not text.endswith("\n") else text + SEPARATOR)
        stream.flush()
