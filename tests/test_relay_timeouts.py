"""The submission sessions' idle and DATA timeouts, on an injected clock: deadlines checked by
the factory's sweep (no DelayedCall per session), closing with 421 at most a quarter of the
shortest timeout late, and no sweep left once the sessions are gone."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from twistmail.relay.config import RelayConfig
from twistmail.relay.listener import SubmissionFactory


def _session(clock: Clock, **config: Any) -> tuple[Any, StringTransport]:
    factory = SubmissionFactory(
        RelayConfig(smtp_url="smtp://127.0.0.1:2", **config),
        lambda envelope, client: defer.succeed(1),
        clock=clock,
    )
    protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
    transport = StringTransport(
        hostAddress=IPv4Address("TCP", "127.0.0.1", 2525),
        peerAddress=IPv4Address("TCP", "127.0.0.1", 5000),
    )
    protocol.makeConnection(transport)
    return protocol, transport


def _close(protocol: Any, transport: StringTransport) -> None:
    transport.loseConnection()
    protocol.connectionLost(None)


def test_a_silent_session_is_closed_after_the_idle_timeout_and_lines_keep_it_open() -> None:
    clock = Clock()
    protocol, transport = _session(clock, idle_timeout=8.0)
    assert transport.value().startswith(b"220 ")
    clock.advance(7)
    protocol.dataReceived(b"EHLO a.test\r\n")  # a line: idle again from now
    clock.advance(7)
    assert not transport.disconnecting
    transport.clear()
    clock.advance(3)  # 10 s after the line: past 8 s, within the sweep's 1 s
    assert transport.value().startswith(b"421 4.4.2")
    assert transport.disconnecting
    _close(protocol, transport)
    assert clock.getDelayedCalls() == []  # the sweep stopped with the last session


def test_data_that_takes_too_long_is_closed_although_lines_keep_coming() -> None:
    clock = Clock()
    protocol, transport = _session(clock, idle_timeout=4.0, data_timeout=10.0)
    protocol.dataReceived(b"EHLO a\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n")
    protocol.dataReceived(b"DATA\r\n")
    assert transport.value().endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n")
    transport.clear()
    for _ in range(9):
        clock.advance(1)
        protocol.dataReceived(b"a line\r\n")
    assert not transport.disconnecting
    clock.advance(2)
    assert b"421 4.4.2" in transport.value()
    assert b"DATA took too long" in transport.value()
    assert transport.disconnecting
    transport.clear()
    clock.advance(10)  # past the idle timeout too: one 421 was enough
    assert transport.value() == b""
    _close(protocol, transport)
    assert clock.getDelayedCalls() == []


def test_a_session_that_ends_leaves_no_timer() -> None:
    clock = Clock()
    protocol, transport = _session(clock)
    protocol.dataReceived(b"QUIT\r\n")
    assert transport.value().endswith(b"221 2.0.0 Bye\r\n")
    _close(protocol, transport)
    assert clock.getDelayedCalls() == []
