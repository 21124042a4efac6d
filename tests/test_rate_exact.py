"""``rate=R``: at most ceil(R*w) + 1 MAIL commands in any window of w >= 1 s, on the clock."""

from __future__ import annotations

from test_mailer_clock import DATA, FakeServer
from test_policy import _assert_rate_bound
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from twistmail.mailer import Mailer


class _Server(FakeServer):
    """Answers whatever arrives, MAIL by MAIL, and notes when each MAIL arrived."""

    def __init__(self, reactor: MemoryReactorClock, index: int, mails: list[float]) -> None:
        super().__init__(reactor, index)
        self.reactor = reactor
        self.mails = mails
        self.in_data = False
        self.handshake()

    def serve(self) -> None:
        replies = []
        for line in self.take().split(b"\r\n"):
            if self.in_data:
                if line == b".":
                    self.in_data = False
                    replies.append(b"250 queued\r\n")
            elif line.startswith(b"MAIL FROM"):
                self.mails.append(self.reactor.seconds())
                replies.append(b"250 ok\r\n")
            elif line.startswith(b"RCPT TO"):
                replies.append(b"250 ok\r\n")
            elif line == b"DATA":
                self.in_data = True
                replies.append(b"354 go\r\n")
        if replies:
            self.say(b"".join(replies))


class RateTests(SynchronousTestCase):
    def check(self, rate: float, concurrency: int, count: int) -> None:
        reactor = MemoryReactorClock()
        mailer = Mailer(
            "smtp://127.0.0.1:2525", concurrency=concurrency, rate=rate, reactor=reactor
        )
        d = mailer.send_many(("s@example.com", [f"r{i}@x.org"], DATA) for i in range(count))
        mails: list[float] = []
        servers: list[_Server] = []
        while not d.called:
            while len(servers) < len(reactor.tcpClients):
                servers.append(_Server(reactor, len(servers), mails))
            for server in servers:
                server.serve()
            reactor.advance(0.003)
        self.assertEqual(self.successResultOf(d).sent, count)
        self.assertEqual(len(mails), count)
        self.assertGreater(len(servers), 1)
        _assert_rate_bound(mails, rate)
        # and the rate is used, not just respected (wake-ups are up to one step late)
        self.assertLess(mails[-1] - mails[0], (count - 1) / rate * 1.2)

    def test_pipelined_connections_share_one_exact_rate(self) -> None:
        self.check(rate=40, concurrency=3, count=160)

    def test_a_slow_rate(self) -> None:
        self.check(rate=2.5, concurrency=4, count=20)
