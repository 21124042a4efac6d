"""Socket-event dispatch for reactors we own: Twisted's epoll loop without a log context per event.

Twisted's epoll reactor runs every socket event inside ``log.callWithLogger``: it asks the
selectable for its log prefix, copies the legacy log context and pushes and pops it, so that a
legacy ``log.msg`` made while handling the event is tagged with the connection. The relay
handles about ten socket events per message and logs through ``twisted.logger`` (which never
reads that context): the wrapping was about 4 % of the relay's instructions, and 2-3 % of a
drain's CPU.

:func:`install` replaces the loop's iteration on an epoll reactor with
:func:`_poll`, which calls ``doRead``/``doWrite`` directly and treats the outcomes exactly as
``twisted.internet.posixbase._PollLikeMixin._doReadOrWrite`` does (hang-up, an exception, a
reason to disconnect: that selectable, and only it, is disconnected). Where something is
logged or a connection is lost, the legacy context is set as before, so an error's log line
still names its connection. Only the processes that own their reactor install it: the relay
(its ``makeService``) and the command line's commands that run one (``send``, ``drain``,
``worker``, ``bounces``); a library user's reactor is never changed.
"""

from __future__ import annotations

import errno
from typing import Any

from twisted.internet import error
from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST
from twisted.python import log

__all__ = ["install", "uninstall"]

_NO_FILEDESC = error.ConnectionFdescWentAway("File descriptor lost")


def install(reactor: Any) -> bool:
    """Make ``reactor`` (Twisted's epoll reactor) dispatch socket events without a log context
    per event; True if it did, False for another kind of reactor (left as it is)."""
    from twisted.internet.epollreactor import EPollReactor

    if type(reactor) is not EPollReactor:
        return False

    def poll(timeout: float | None) -> None:
        _poll(reactor, timeout)

    reactor.doIteration = reactor.doPoll = poll  # type: ignore[method-assign]
    return True


def _poll(reactor: Any, timeout: float | None) -> None:
    """One wait for socket events and their handling (``EPollReactor.doPoll``)."""
    try:
        events = reactor._poller.poll(-1 if timeout is None else timeout, len(reactor._selectables))
    except OSError as err:
        if err.errno == errno.EINTR:
            return
        raise
    selectables = reactor._selectables
    reads = reactor._reads
    hang_up = reactor._POLL_DISCONNECTED
    readable = reactor._POLL_IN
    writable = reactor._POLL_OUT
    for fd, event in events:
        selectable = selectables.get(fd)
        if selectable is None:  # removed by an earlier event of this turn
            continue
        in_read = False
        why: Any
        if event & hang_up and not event & readable:
            # A hang-up once all pending input was read: a clean close of a descriptor being
            # read (perhaps a half-close), an error otherwise.
            if fd in reads:
                in_read, why = True, CONNECTION_DONE
            else:
                why = CONNECTION_LOST
        else:
            try:
                if selectable.fileno() == -1:
                    why = _NO_FILEDESC
                else:
                    why = None
                    if event & readable:
                        why = selectable.doRead()
                        in_read = True
                    if not why and event & writable:
                        why = selectable.doWrite()
                        in_read = False
            except BaseException as e:
                # Logged under the connection's name, then that connection is closed.
                why = e
                log.callWithLogger(selectable, log.err)
        if why:
            log.callWithLogger(selectable, reactor._disconnectSelectable, selectable, why, in_read)


def uninstall(reactor: Any) -> None:
    """Give ``reactor`` back Twisted's own dispatch (undoes :func:`install`)."""
    for name in ("doIteration", "doPoll"):
        vars(reactor).pop(name, None)
