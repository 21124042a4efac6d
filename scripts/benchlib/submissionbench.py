"""The relay's SMTP submission protocol alone: CPU µs per session, in process.

One session per message as smtp-source sends it (greeting, EHLO, MAIL, RCPT, DATA with a
~2.3 KB message, QUIT) fed to :class:`twistmail.relay.submission.Submission` through a
``StringTransport``, with the message "queued" at once and the (not running) global reactor
as the clock. No sockets, no queue, no delivery: what the submission side itself costs, for
A/B comparisons of its code that the loaded machine's noise would hide in ``--mode relay``.

Run with the project's virtualenv, from the tree to measure::

    PYTHONPATH=. .venv/bin/python scripts/benchlib/submissionbench.py [SESSIONS]

Prints the best of five rounds of the reactor thread's CPU time (``time.thread_time``).
"""

from __future__ import annotations

import sys
import time
from typing import Any


def main(argv: list[str]) -> int:
    from twisted.internet import defer
    from twisted.internet import reactor as clock
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    from twistmail.relay.config import RelayConfig
    from twistmail.relay.listener import SubmissionFactory

    sessions = int(argv[0]) if argv else 5000
    body = (
        b"From: app@example.com\r\nTo: user@example.org\r\nSubject: x\r\n\r\n"
        + (b"x" * 70 + b"\r\n") * 30
        + b".\r\n"
    )
    factory = SubmissionFactory(
        RelayConfig(smtp_url="smtp://127.0.0.1:2"),
        lambda envelope, client: defer.succeed(1),
        clock=clock,
    )
    peer = IPv4Address("TCP", "127.0.0.1", 5000)
    host = IPv4Address("TCP", "127.0.0.1", 2525)
    commands = [
        b"EHLO client.example\r\n",
        b"MAIL FROM:<app@example.com>\r\n",
        b"RCPT TO:<user@example.org>\r\n",
        b"DATA\r\n",
        body,
        b"QUIT\r\n",
    ]

    def one() -> None:
        protocol: Any = factory.buildProtocol(peer)
        protocol.makeConnection(StringTransport(hostAddress=host, peerAddress=peer))
        for data in commands:
            protocol.dataReceived(data)
        protocol.connectionLost(None)
        clock.runUntilCurrent()  # type: ignore[attr-defined]

    for _ in range(2000):  # warm up
        one()
    best = float("inf")
    for _ in range(5):
        started = time.thread_time()
        for _ in range(sessions):
            one()
        best = min(best, (time.thread_time() - started) / sessions * 1e6)
    print(f"{best:.2f} us CPU per session (best of 5 rounds of {sessions})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
