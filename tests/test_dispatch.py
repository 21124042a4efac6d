"""The socket-event dispatch of the relay and the commands (``twistmail._dispatch``) on the real
epoll reactor:
data flows, an exception in one connection's handler closes that connection only (and is
logged under its name), and a peer's close reaches ``connectionLost``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, protocol
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.task import deferLater
from twisted.logger import globalLogPublisher

from twistmail import _dispatch as dispatch


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


class Echo(protocol.Protocol):
    """Echoes what it gets; ``boom`` raises in ``dataReceived``."""

    def dataReceived(self, data: bytes) -> None:
        if b"boom" in data:
            raise ValueError("boom in dataReceived")
        self.transport.write(data)


class Client(protocol.Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.waiting: defer.Deferred[None] | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.waiting is not None:
            waiting, self.waiting = self.waiting, None
            waiting.callback(None)

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)

    def echoed(self, data: bytes) -> defer.Deferred[None]:
        self.waiting = defer.Deferred()
        self.transport.write(data)
        return self.waiting


@pytest.fixture
def installed() -> Iterator[Any]:
    reactor = _reactor()
    if type(reactor) is not EPollReactor:
        pytest.skip("the dispatch replaces the epoll reactor's loop only")
    assert dispatch.install(reactor)
    try:
        yield reactor
    finally:
        dispatch.uninstall(reactor)


def test_other_reactors_are_left_alone() -> None:
    from twisted.internet.testing import MemoryReactorClock

    reactor = MemoryReactorClock()
    assert not dispatch.install(reactor)
    assert "doIteration" not in vars(reactor)


@pytest_twisted.ensureDeferred
async def test_an_error_closes_only_its_connection(installed: Any) -> None:
    reactor = installed
    errors: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("isError"):
            errors.append(event)

    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        protocol.Factory.forProtocol(Echo)
    )
    globalLogPublisher.addObserver(observe)
    try:
        connect = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        good: Client = await connectProtocol(connect, Client())
        bad: Client = await connectProtocol(connect, Client())
        await good.echoed(b"one")
        assert good.received == b"one"

        bad.transport.write(b"boom")
        await bad.lost.addTimeout(
            10, reactor
        )  # the server closed the connection whose handler raised

        await good.echoed(b"two")  # the other one carries on
        assert good.received == b"onetwo"
        assert not good.lost.called
        good.transport.loseConnection()
        await good.lost
    finally:
        globalLogPublisher.removeObserver(observe)
        await port.stopListening()
        await deferLater(reactor, 0, lambda: None)
    assert len(errors) == 1
    failure = errors[0]["failure"]
    assert failure.check(ValueError)
    # Logged under the connection's name, as Twisted's own loop does.
    assert errors[0]["system"].startswith("Echo,")


def test_the_commands_reactor_dispatches_through_it_and_a_library_users_is_left_alone() -> None:
    # The command line runs its commands under _react_exit, on the process's own reactor.
    import subprocess
    import sys

    script = (
        "from twisted.internet import defer\n"
        "from twistmail.cli import _react_exit\n"
        "def command(reactor):\n"
        "    return defer.succeed(0 if reactor.doIteration.__module__ == 'twistmail._dispatch'"
        " else 3)\n"
        "_react_exit(command)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    # This test process's reactor (a library user's, for twistmail) kept Twisted's own loop.
    assert "doIteration" not in vars(_reactor())
