"""A self-contained demonstration: send a batch through a Mailer to an in-process capture server.

Run ``python -m twistmail.demo [COUNT]``. Nothing leaves 127.0.0.1: the server is
:class:`twistmail.testing.CaptureServer` (Twisted's own ESMTP server) on a free port.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from email.message import EmailMessage
from typing import Any

from twisted.internet import defer, task

from .mailer import Mailer
from .testing import CaptureServer

__all__ = ["main", "run"]


def _messages(count: int) -> Iterator[EmailMessage]:
    for i in range(count):
        msg = EmailMessage()
        msg["From"] = "Demo <demo@example.com>"
        msg["To"] = f"Recipient {i} <user{i}@example.org>"
        msg["Subject"] = f"Hello #{i} — grüße"
        msg.set_content(f"Message {i} of {count}, sent by twistmail.\n")
        yield msg


async def run(reactor: Any, count: int = 200) -> int:
    """Send ``count`` messages to a fresh capture server; 0 when every one arrived intact."""
    server = CaptureServer(reactor)
    server.listen()
    mailer = Mailer(f"smtp://127.0.0.1:{server.port}", concurrency=10, reactor=reactor)
    try:
        report = await mailer.send_many(_messages(count))
    finally:
        await mailer.close()
        await server.stop()
    print(
        f"sent {report.sent} of {count} messages over {server.connections} connections "
        f"in {report.elapsed:.2f}s ({report.rate:.0f} messages/s); "
        f"the capture server received {len(server.messages)}"
    )
    if server.messages:
        first = server.messages[0]
        rcpts = " ".join(f"RCPT TO:<{rcpt.decode()}>" for rcpt in first.recipients)
        print(f"first message: MAIL FROM:<{first.sender.decode()}> {rcpts}")
        print(first.data.decode("utf-8", "replace").split("\r\n\r\n", 1)[0])
    return 0 if report.sent == count == len(server.messages) else 1


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m twistmail.demo``."""
    args = sys.argv[1:] if argv is None else argv
    count = int(args[0]) if args else 200

    async def go(reactor: Any) -> None:
        code = await run(reactor, count)
        if code:
            raise SystemExit(code)

    task.react(lambda reactor: defer.ensureDeferred(go(reactor)))


if __name__ == "__main__":
    main()
