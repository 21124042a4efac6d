"""Senders of ``--mode messages``: each builds its messages inside the measured window.

The message is the one the issue measured: From and To with display names, a Subject and a
2 KB plain-text body (no Date or Message-ID: twistmail adds both, aiosmtplib neither).

* ``twistmail-compose``: ``Mailer.send_many`` of :func:`twistmail.compose` envelopes.
* ``twistmail-emailmsg``: ``Mailer.send_many`` of ``EmailMessage`` objects.
* ``aiosmtplib-uvloop-emailmsg``: aiosmtplib's ``send_message`` of the same ``EmailMessage``
  objects, one persistent connection per task, on uvloop.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from measure import mark, react, window

if TYPE_CHECKING:
    from email.message import EmailMessage

    from senders import Options

COMPOSE = "twistmail-compose"
EMAILMSG = "twistmail-emailmsg"
PEER = "aiosmtplib-uvloop-emailmsg"

FROM = "Bench Sender <bench@sender.example>"
_LINE = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.\n"
BODY = _LINE * 27 + "-- \nThe benchmark\n"  # 2 KB, lines of at most 78 characters


def to(n: int) -> str:
    return f"User {n} <user{n}@rcpt.example>"


def subject(n: int) -> str:
    return f"Benchmark message {n}"


def email_message(n: int) -> EmailMessage:
    """Message ``n`` built the ordinary way."""
    from email.message import EmailMessage

    msg = EmailMessage()
    msg["From"] = FROM
    msg["To"] = to(n)
    msg["Subject"] = subject(n)
    msg.set_content(BODY)
    return msg


def _send_many(opts: Options, items: Iterator[Any]) -> dict[str, object]:
    from twistmail.mailer import Mailer

    out: dict[str, object] = {}

    async def main(reactor: object) -> None:
        mailer = Mailer(
            f"smtp://{opts.host}:{opts.port}", concurrency=opts.connections, reactor=reactor
        )
        t0, c0 = mark()
        report = await mailer.send_many(items)
        await mailer.close()
        out.update(window(t0, c0))
        out["sent"] = report.sent
        out["failed"] = report.failed + report.partial + report.invalid
        out["errors"] = [list(e) for e in report.errors[:5]]

    react(main)
    return out


def send_compose(opts: Options) -> dict[str, object]:
    """twistmail ``send_many`` of messages made by :func:`twistmail.compose`."""
    from twistmail import compose

    return _send_many(
        opts,
        (compose(FROM, [to(n)], subject=subject(n), text=BODY) for n in range(opts.count)),
    )


def send_emailmessage(opts: Options) -> dict[str, object]:
    """twistmail ``send_many`` of ``EmailMessage`` objects."""
    return _send_many(opts, (email_message(n) for n in range(opts.count)))


def send_aiosmtplib_emailmessage(opts: Options) -> dict[str, object]:
    """aiosmtplib ``send_message`` of the same ``EmailMessage`` objects, on uvloop."""
    import asyncio

    import aiosmtplib
    import uvloop

    out: dict[str, object] = {}

    async def main() -> None:
        items = iter(range(opts.count))
        sent = 0
        failed: list[str] = []

        async def worker() -> None:
            nonlocal sent
            smtp = aiosmtplib.SMTP(hostname=opts.host, port=opts.port, start_tls=False)
            await smtp.connect()
            try:
                for n in items:
                    try:
                        errors, _ = await smtp.send_message(email_message(n))
                    except aiosmtplib.SMTPException as e:
                        failed.append(repr(e))
                        continue
                    if errors:
                        failed.append(repr(errors))
                    else:
                        sent += 1
            finally:
                await smtp.quit()

        t0, c0 = mark()
        await asyncio.gather(*(worker() for _ in range(opts.connections)))
        out.update(window(t0, c0))
        out["sent"] = sent
        out["failed"] = len(failed)
        out["errors"] = failed[:5]

    uvloop.run(main())
    return out


MESSAGE_SENDERS = {
    COMPOSE: send_compose,
    EMAILMSG: send_emailmessage,
    PEER: send_aiosmtplib_emailmessage,
}
