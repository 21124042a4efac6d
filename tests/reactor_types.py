"""Type-checked, never run: what each ``reactor=`` parameter accepts (see test_reactor_types.py).

Every reactor parameter takes the global reactor and a ``MemoryReactorClock``; parameters that
only need a clock also take a ``task.Clock``, and the others refuse one (the ``type: ignore``
comments below must stay needed: mypy --strict reports an unused one).
"""

from __future__ import annotations

from twisted.internet import reactor, task
from twisted.internet.asyncioreactor import AsyncioSelectorReactor
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.pollreactor import PollReactor
from twisted.internet.selectreactor import SelectReactor
from twisted.internet.testing import MemoryReactorClock

from twistmail import SMTP, Mailer
from twistmail._twisted import Reactor, default_reactor, install_signal_handlers
from twistmail.backends.file import FileBackend
from twistmail.backends.spool import SpoolBackend
from twistmail.interfaces import IQueue
from twistmail.merge.journal import Journal
from twistmail.queue import SqliteQueue
from twistmail.queue.worker import Drain
from twistmail.retry import RetryPolicy
from twistmail.testing import CaptureServer

URL = "smtp://127.0.0.1:2525"


def every_reactor_class() -> list[Reactor]:
    return [EPollReactor(), PollReactor(), SelectReactor(), AsyncioSelectorReactor()]


def global_reactor() -> None:
    r = reactor
    Mailer(URL, reactor=r)
    SMTP(reactor=r)
    CaptureServer(r)
    FileBackend(file_path="out", reactor=r)
    SpoolBackend("spool.db", reactor=r)
    SqliteQueue.open("spool.db", reactor=r)
    Journal.open("j.db", template_fingerprint="t", reactor=r)
    install_signal_handlers(r, lambda: None)
    install_signal_handlers(default_reactor(), lambda: None)


def memory_reactor(r: MemoryReactorClock) -> None:
    Mailer(URL, reactor=r)
    SMTP(reactor=r)
    CaptureServer(r)
    FileBackend(file_path="out", reactor=r)
    SpoolBackend("spool.db", reactor=r)
    SqliteQueue.open("spool.db", reactor=r)
    Journal.open("j.db", template_fingerprint="t", reactor=r)


def clocks(queue: IQueue, mailer: Mailer, clock: task.Clock, memory: MemoryReactorClock) -> None:
    Drain(queue, mailer, retry=RetryPolicy(), reactor=reactor)
    Drain(queue, mailer, retry=RetryPolicy(), reactor=memory)
    Drain(queue, mailer, retry=RetryPolicy(), reactor=clock)


def a_clock_is_not_a_reactor(clock: task.Clock) -> None:
    Mailer(URL, reactor=clock)  # type: ignore[arg-type]
    CaptureServer(clock)  # type: ignore[arg-type]
    SqliteQueue.open("spool.db", reactor=clock)  # type: ignore[arg-type]
