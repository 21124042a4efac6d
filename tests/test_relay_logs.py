"""The relay's log observer: twistd's text, one write per reactor turn, on standard output only
when twistd would log there."""

from __future__ import annotations

import gc
import io
import sys
from pathlib import Path
from typing import Any

import pytest
from twisted.application.service import Application
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, Logger, LogLevel, formatEventAsClassicLogText
from twisted.python.failure import Failure
from twisted.scripts.twistd import ServerOptions

from twistmail import _dispatch as dispatch
from twistmail.relay.logs import TurnBufferedObserver, twistd_observer


class Output(io.StringIO):
    """Standard output as the observer sees it: what was written, and each write."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def _events() -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    log = Logger(namespace="twistmail.relay.service", observer=events.append)
    log.info("{line}", line="queued 1 from=<a@example.com> size=10 nrcpt=1 client=127.0.0.1")
    log.info("{line}", line="two\nlines")
    log.info("relaying to {upstream} from queue {queue}", upstream="127.0.0.1:25", queue="q")
    log.info("{line}", line="")
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        log.failure("{line}", Failure(), line="it failed")
    events.append({"log_format": "{line}", "line": "legacy", "log_system": "-", "log_time": 1.5})
    events.append({"log_format": "{line}", "line": "no time"})
    return events


def test_the_text_is_twistds_own() -> None:
    reactor = MemoryReactorClock()
    out = Output()
    observer = TurnBufferedObserver(out, reactor, lambda: True)
    events = _events()
    for event in events:
        observer(event)
    observer.flush()
    expected = "".join(formatEventAsClassicLogText(e) or "" for e in events)
    assert "two\n\tlines" in expected
    assert out.getvalue() == expected


def test_a_turns_lines_are_one_write_once_the_turn_ends() -> None:
    reactor = MemoryReactorClock()
    out = Output()
    observer = TurnBufferedObserver(out, reactor, lambda: True)
    log = Logger(namespace="relay", observer=observer)
    for n in range(5):
        log.info("{line}", line=f"queued {n}")
    assert out.getvalue() == ""
    reactor.advance(0)
    assert out.writes == 1
    assert [line.split("] ", 1)[1] for line in out.getvalue().splitlines()] == [
        f"queued {n}" for n in range(5)
    ]
    log.info("{line}", line="next turn")
    reactor.advance(0)
    assert out.writes == 2


@pytest.mark.parametrize("level", [LogLevel.warn, LogLevel.error, LogLevel.critical])
def test_a_warning_or_error_is_written_at_once_with_what_came_before(level: LogLevel) -> None:
    out = Output()
    observer = TurnBufferedObserver(out, MemoryReactorClock(), lambda: True)
    log = Logger(namespace="relay", observer=observer)
    log.info("{line}", line="before")
    log.emit(level, "{line}", line="bad")
    assert out.writes == 1
    assert out.getvalue().endswith("] before\n" + out.getvalue().splitlines()[1] + "\n")
    assert f"[relay#{level.name}] bad" in out.getvalue()


def test_a_line_from_another_thread_is_written_at_once() -> None:
    out = Output()
    observer = TurnBufferedObserver(out, MemoryReactorClock(), lambda: False)
    Logger(namespace="relay", observer=observer).info("{line}", line="from a thread")
    assert out.getvalue().endswith("[relay#info] from a thread\n")


def test_many_lines_in_one_turn_are_written_before_the_turn_ends() -> None:
    out = Output()
    observer = TurnBufferedObserver(out, MemoryReactorClock(), lambda: True)
    log = Logger(namespace="relay", observer=observer)
    for n in range(2000):
        log.info("{line}", line=f"queued {n} " + "x" * 60)
    assert out.writes >= 1
    assert out.getvalue().count("\n") >= 500


def _twistd_options(argv: list[str]) -> dict[str, Any]:
    options = ServerOptions()
    options.parseOptions(
        [*argv, "twistmail", "--smtp", "smtp://127.0.0.1:2", "--queue", "sqlite:q.db"]
    )
    return dict(options)


@pytest.mark.parametrize(
    ("argv", "taken"),
    [
        (["-n"], True),
        (["-n", "--logfile", "-"], True),
        (["-n", "--logfile", "relay.log"], False),
        (["-n", "--syslog"], False),
        (["-n", "--logger", "twisted.logger.textFileLogObserver"], False),
        ([], False),  # a daemon never logs to stdout
    ],
)
def test_only_standard_output_is_taken_over(argv: list[str], taken: bool) -> None:
    observer = twistd_observer(_twistd_options(argv), MemoryReactorClock())
    assert (observer is not None) == taken
    if observer is not None:
        assert observer._out is sys.stdout


def test_twistd_logs_the_relay_through_it(tmp_path: Path) -> None:
    threshold = gc.get_threshold()  # makeService settles the heap of twistd's process
    options = ServerOptions()
    queue = f"sqlite:{tmp_path / 'q.db'}"
    options.parseOptions(["-n", "twistmail", "--smtp", "smtp://127.0.0.1:2", "--queue", queue])
    plugin = options.loadedPlugins["twistmail"]
    relay: Any = plugin.makeService(options.subOptions)
    try:
        application = Application("twistmail")
        relay.setServiceParent(application)
        observer = application.getComponent(ILogObserver)
        assert isinstance(observer, TurnBufferedObserver)
        assert gc.get_freeze_count() > 0
        # twistd's epoll reactor dispatches socket events without a log context per event.
        assert "doIteration" in vars(relay.reactor)
    finally:
        relay.deliverers.release()
        dispatch.uninstall(relay.reactor)
        gc.unfreeze()
        gc.set_threshold(*threshold)
