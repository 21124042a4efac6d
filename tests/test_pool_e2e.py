"""The connection layer against real servers that close early, refuse logins or limit
connections: nothing is lost, no attempt is spent on a message the server never saw, and the
server is never hammered."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable

import pytest
import pytest_twisted
from servers import CueServer

from twistmail.errors import AuthenticationError
from twistmail.mailer import Mailer
from twistmail.results import SendResult
from twistmail.smtp._protocol import MailerProtocol
from twistmail.testing import CaptureServer

Cue = Callable[..., CueServer]

_MAIL = re.compile(rb"MAIL FROM:<(s\d+)@")


def _messages(n: int) -> list[tuple[str, list[str], bytes]]:
    return [
        (f"s{i}@example.com", [f"u{i}@x.org"], b"Subject: %d\r\n\r\nbody\r\n" % i) for i in range(n)
    ]


@pytest.fixture
def written(monkeypatch: pytest.MonkeyPatch) -> Counter[bytes]:
    """How many times each message's MAIL command (by its sender's local part) was written."""
    counts: Counter[bytes] = Counter()
    flush = MailerProtocol._flush

    def spy(self: MailerProtocol) -> None:
        if self._out and self.transport is not None and not self.is_closed:
            for chunk in self._out:
                counts.update(_MAIL.findall(chunk))
        flush(self)

    monkeypatch.setattr(MailerProtocol, "_flush", spy)
    return counts


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("pipelining", [True, False])
async def test_a_server_closing_after_every_message_loses_nothing_and_no_attempt(
    cue_server: Cue, written: Counter[bytes], pipelining: bool
) -> None:
    server = cue_server(close_after=1, pipelining=pipelining)
    m = Mailer(f"smtp://127.0.0.1:{server.port}", retry_delay=0.05, timeout=5)
    results: dict[int, SendResult | Exception] = {}
    report = await m.send_many(_messages(200), on_result=results.__setitem__)
    await m.close()
    assert (report.sent, report.failed) == (200, 0)
    received = Counter(r.recipients[0] for r in server.received)
    assert received == Counter(f"u{i}@x.org" for i in range(200))  # each exactly once
    for i, result in results.items():
        assert isinstance(result, SendResult)
        # An attempt is counted for each time the message was written, never for one queued
        # behind a connection that died before it was written.
        assert result.attempts == written[b"s%d" % i], (i, result.attempts)
    assert m.pool.message_cap is not None
    assert m.pool.message_cap <= 2
    # Once the cap is learned, few messages are written to a connection about to close.
    assert sum(written.values()) - 200 <= m.concurrency * m.pool.depth + 10


@pytest_twisted.ensureDeferred
async def test_a_wrong_password_costs_one_connection_not_one_per_message(
    capture_server: Callable[..., CaptureServer],
) -> None:
    server = capture_server(credentials={"bob": "right"})
    m = Mailer(f"smtp://bob@127.0.0.1:{server.port}", password="wrong", timeout=5)
    report = await m.send_many(_messages(200))
    failures = report.failed
    # During the backoff every send fails at once with the refusal, without a connection.
    with pytest.raises(AuthenticationError) as info:
        await m.send(b"Subject: x\r\n\r\nx\r\n", sender="s@example.com", recipients=["u@x.org"])
    await m.close()
    assert failures == 200
    assert server.connections == 1
    assert info.value.attempted is False
    assert m.pool.breaker_error is not None
    assert "wrong" not in str(m.pool.breaker_error)


@pytest_twisted.ensureDeferred
async def test_a_server_limiting_connections_gets_few_refused_attempts(
    cue_server: Cue, written: Counter[bytes]
) -> None:
    server = cue_server(max_connections=3, pipelining=True)
    m = Mailer(f"smtp://127.0.0.1:{server.port}", concurrency=10, retry_delay=0.05, timeout=5)
    results: dict[int, SendResult | Exception] = {}
    report = await m.send_many(_messages(300), on_result=results.__setitem__)
    await m.close()
    assert (report.sent, report.failed) == (300, 0)
    assert len(server.received) == 300
    assert server.refused < 20
    assert m.pool.limit <= 3
    assert all(isinstance(r, SendResult) and r.attempts == 1 for r in results.values())
