"""The ``dummy`` backend: validates and counts messages, delivers nothing."""

from __future__ import annotations

from twistmail.message import Envelope

from .base import BaseBackend

__all__ = ["DummyBackend"]


class DummyBackend(BaseBackend):
    """Accepts every valid message and drops it; the count is what would have been sent."""

    def deliver(self, envelope: Envelope) -> None:
        """Drop ``envelope``."""
