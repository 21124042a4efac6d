"""The relay's log observer: twistd's text format, written once per reactor turn.

``twistd -n`` (and ``twistmail serve``) log to standard output through a text observer that
formats each event with the string module's ``Formatter`` and the date through ``datetime``,
then writes and flushes it: about 14 µs a line, and the relay logs two lines a message. The
:class:`TurnBufferedObserver` writes the very same text (``2026-12-02T14:23:39+0000
[twistmail.relay.service#info] queued 1 from=<...> ...``), but formats the relay's
pre-formatted lines (``log.info("{line}", line=...)``) directly, makes the time text once a
second, and writes what one reactor turn logged in one write. A warning or an error, and a
line logged outside the reactor thread, is written at once; what is still buffered is written
at exit. A SIGKILL can lose at most the lines of the turn it interrupts.

Only standard output is taken over: ``--logfile``, ``--syslog`` and ``--logger`` keep twistd's
own observers (see :func:`twistd_observer`).
"""

from __future__ import annotations

import atexit
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from twisted.logger import ILogObserver, LogLevel, formatEventAsClassicLogText, formatTime
from twisted.python import threadable
from zope.interface import implementer

from .._twisted import Reactor

__all__ = ["TurnBufferedObserver", "twistd_observer"]

_MAX_BUFFERED = 64 * 1024  # characters kept before a write, whatever the turn


@implementer(ILogObserver)
class TurnBufferedObserver:
    """Events as twistd's text observer writes them, to ``out``, one write per reactor turn
    (see the module's docstring); ``in_reactor_thread()`` tells whether the caller is the
    reactor's thread."""

    def __init__(
        self,
        out: TextIO,
        reactor: Reactor,
        in_reactor_thread: Callable[[], bool] = threadable.isInIOThread,
    ) -> None:
        self._out = out
        self._reactor = reactor
        self._in_reactor_thread = in_reactor_thread
        self._lines: list[str] = []
        self._size = 0
        self._lock = threading.Lock()
        self._flush_pending = False
        self._second = -1
        self._time_text = ""
        atexit.register(self.flush)

    def __call__(self, event: dict[str, Any]) -> None:
        text = self._format(event)
        if not text:
            return
        with self._lock:
            self._lines.append(text)
            self._size += len(text)
            size = self._size
        level = event.get("log_level")
        urgent = level is not None and level not in (LogLevel.info, LogLevel.debug)
        if urgent or size > _MAX_BUFFERED or not self._in_reactor_thread():
            self.flush()
        elif not self._flush_pending:
            self._flush_pending = True
            self._reactor.callLater(0, self._turn_ended)

    def _turn_ended(self) -> None:
        self._flush_pending = False
        self.flush()

    def flush(self) -> None:
        """Write what is buffered."""
        with self._lock:
            lines, self._lines, self._size = self._lines, [], 0
        if lines:
            try:
                self._out.write("".join(lines))
                self._out.flush()
            except (OSError, ValueError):  # a closed or broken output: nothing to say it on
                pass

    def _format(self, event: dict[str, Any]) -> str | None:
        """The text twistd's observer writes for ``event`` (``formatEventAsClassicLogText``)."""
        line = event.get("line")
        if (
            event.get("log_format") != "{line}"
            or type(line) is not str
            or not line
            or "log_failure" in event
        ):
            return formatEventAsClassicLogText(event)
        when = event.get("log_time")
        if when is None:
            return formatEventAsClassicLogText(event)
        second = int(when)
        if second != self._second:
            # The format has whole seconds: one text serves the whole second.
            self._time_text = formatTime(second)
            self._second = second
        system = event.get("log_system")
        if system is None:
            level = event.get("log_level")
            name = level.name if level is not None else "-"
            system = f"{event.get('log_namespace', '-')}#{name}"
        if "\n" in line:
            line = line.replace("\n", "\n\t")
        return f"{self._time_text} [{system}] {line}\n"


def twistd_observer(twistd_options: Mapping[str, Any] | None, reactor: Reactor) -> Any:
    """A :class:`TurnBufferedObserver` on standard output when twistd would log there (``-n``
    without ``--logfile``, ``--syslog`` or ``--logger``); None otherwise (twistd's own)."""
    if twistd_options is None:
        return None
    if twistd_options.get("logger") or twistd_options.get("syslog"):
        return None
    if not twistd_options.get("nodaemon") or twistd_options.get("logfile") not in (None, "", "-"):
        return None
    return TurnBufferedObserver(sys.stdout, reactor)
