"""Waiting for a condition in a test: on the real reactor (servers, subprocesses), or blocking
in a test that drives a subprocess (the relay) without a reactor.

A wait ends when the condition holds, never after a fixed time; ``seconds`` only turns a hang
into a failure naming what was awaited.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from twisted.internet import reactor, task


async def until(condition: Callable[[], object], what: str = "", seconds: float = 60.0) -> None:
    """Return once ``condition()`` is true, checking after each short turn of the reactor."""
    deadline = reactor.seconds() + seconds
    while not condition():
        if reactor.seconds() > deadline:
            raise AssertionError(f"never happened: {what or condition}")
        await task.deferLater(reactor, 0.02, lambda: None)


def wait_until(condition: Callable[[], object], timeout: float = 60.0, what: str = "") -> None:
    """Return once ``condition()`` is true, checking every 20 ms; for tests without a reactor."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what or condition}"
        time.sleep(0.02)
