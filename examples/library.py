"""The README's library example: one message, then a thousand from a generator."""

from email.message import EmailMessage
from typing import Any

from twisted.internet import defer, task

from twistmail import Mailer
from twistmail.testing import CaptureServer


async def main(reactor: Any) -> None:
    server = CaptureServer(reactor)
    server.listen()  # stands in for your SMTP server
    mailer = Mailer(f"smtp://127.0.0.1:{server.port}", concurrency=20, reactor=reactor)
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "me@example.com", "you@example.org", "Hi"
    msg.set_content("Hello from Twisted.\n")
    result = await mailer.send(msg)
    print(result.ok, result.code, result.response)
    report = await mailer.send_many(
        ("me@example.com", [f"user{i}@example.org"], b"Subject: x\r\n\r\nhi\r\n")
        for i in range(1000)
    )
    print(report.sent, "sent,", report.failed, "failed")
    await mailer.close()
    await server.stop()


task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
