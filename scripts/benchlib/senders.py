"""One benchmark sender per subprocess: ``python senders.py NAME --port P --count N ...``.

Each sender delivers ``count`` pre-formatted ~2.3 KB CRLF messages to 127.0.0.1:PORT over
``connections`` connections and prints one JSON object on stdout: how many the client believes
were accepted, the wall time of the sending window, and the CPU used during that window
(``resource.getrusage(RUSAGE_SELF)``, which covers every thread). Peak RSS is taken by the driver
from the child's rusage, so it includes interpreter start-up and imports.

Only the standard library is imported at module level; each sender imports its own stack, so
one sender's imports do not inflate another's RSS.

New senders register themselves in ``SENDERS``. A later "CLI from CSV" sender (twistmail's
command line fed a CSV file) belongs here as ``send_twistmail_cli_csv``; see ``driver.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import measure
from measure import mark as _mark
from measure import react as _react
from measure import window as _window
from messagesenders import MESSAGE_SENDERS

SENDER = "bench@sender.example"
RECIPIENT_DOMAIN = "rcpt.example"
TARGET_SIZE = 2300


@dataclass
class Options:
    """What every sender is asked to do."""

    host: str
    port: int
    count: int
    connections: int
    profile_out: str | None


# ---------------------------------------------------------------------- messages


def _template() -> bytes:
    """A realistic-looking plain text message padded to ~2.3 KB, with a ``%d`` slot."""
    head = (
        "From: Bench Sender <bench@sender.example>\r\n"
        "To: user%(n)d@rcpt.example\r\n"
        "Subject: Benchmark message %(n)d\r\n"
        "Date: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
        "Message-ID: <bench.%(n)d@sender.example>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 7bit\r\n"
        "\r\n"
        "Hello user %(n)d,\r\n\r\n"
    )
    line = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.\r\n"
    body = ""
    tail = "-- \r\nThe benchmark\r\n"
    while len(head) + len(body) + len(line) + len(tail) < TARGET_SIZE:
        body += line
    short = TARGET_SIZE - len(head) - len(body) - len(tail) - 2
    if short > 0:
        body += "x" * short + "\r\n"
    return (head + body + tail).encode("ascii")


TEMPLATE = _template()


def message(n: int) -> bytes:
    """Message number ``n`` as CRLF bytes (about 2.3 KB)."""
    return TEMPLATE % {b"n": n}


def recipient(n: int) -> str:
    return f"user{n}@{RECIPIENT_DOMAIN}"


def triples(count: int) -> Iterator[tuple[str, list[str], bytes]]:
    """Lazily, ``(sender, [recipient], data)`` for every message."""
    for n in range(count):
        yield SENDER, [recipient(n)], message(n)


# ---------------------------------------------------------------------- senders


def send_twistmail(opts: Options) -> dict[str, object]:
    """twistmail ``Mailer.send_many`` on Twisted's default reactor (epoll on Linux)."""
    from twistmail.mailer import Mailer

    out: dict[str, object] = {}

    async def main(reactor: object) -> None:
        mailer = Mailer(
            f"smtp://{opts.host}:{opts.port}", concurrency=opts.connections, reactor=reactor
        )
        t0, c0 = _mark()
        report = await mailer.send_many(triples(opts.count))
        await mailer.close()
        out.update(_window(t0, c0))
        out["sent"] = report.sent
        out["failed"] = report.failed + report.partial + report.invalid
        out["errors"] = [list(e) for e in report.errors[:5]]
        out["connections_opened"] = mailer.pool.connections_opened
        out["reactor"] = type(reactor).__name__

    _react(main)
    return out


def _send_aiosmtplib(opts: Options, *, use_uvloop: bool) -> dict[str, object]:
    import asyncio

    import aiosmtplib

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
                        errors, _ = await smtp.sendmail(SENDER, [recipient(n)], message(n))
                    except aiosmtplib.SMTPException as e:
                        failed.append(repr(e))
                        continue
                    if errors:
                        failed.append(repr(errors))
                    else:
                        sent += 1
            finally:
                await smtp.quit()

        t0, c0 = _mark()
        await asyncio.gather(*(worker() for _ in range(opts.connections)))
        out.update(_window(t0, c0))
        out["sent"] = sent
        out["failed"] = len(failed)
        out["errors"] = failed[:5]
        out["loop"] = type(asyncio.get_running_loop()).__module__

    if use_uvloop:
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())
    return out


def send_aiosmtplib_uvloop(opts: Options) -> dict[str, object]:
    """aiosmtplib, one persistent connection per task, on uvloop."""
    return _send_aiosmtplib(opts, use_uvloop=True)


def send_aiosmtplib_asyncio(opts: Options) -> dict[str, object]:
    """aiosmtplib, one persistent connection per task, on the stock asyncio loop."""
    return _send_aiosmtplib(opts, use_uvloop=False)


def send_smtplib_threads(opts: Options) -> dict[str, object]:
    """Standard library smtplib: N threads, each holding one connection."""
    import smtplib

    items = iter(range(opts.count))
    lock = threading.Lock()
    sent = [0] * opts.connections
    failed: list[str] = []

    def worker(slot: int) -> None:
        smtp = smtplib.SMTP(opts.host, opts.port, timeout=60)
        try:
            while True:
                with lock:
                    n = next(items, None)
                if n is None:
                    break
                try:
                    refused = smtp.sendmail(SENDER, [recipient(n)], message(n))
                except smtplib.SMTPException as e:
                    with lock:
                        failed.append(repr(e))
                    continue
                if refused:
                    with lock:
                        failed.append(repr(refused))
                else:
                    sent[slot] += 1
        finally:
            smtp.quit()

    t0, c0 = _mark()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(opts.connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = _window(t0, c0)
    out["sent"] = sum(sent)
    out["failed"] = len(failed)
    out["errors"] = failed[:5]
    return out


def send_twisted_naive(opts: Options) -> dict[str, object]:
    """``twisted.mail.smtp.sendmail()`` per message (one connection each), 20 in flight.

    Fed LF line ends: ``SMTPClient.transformChunk`` turns every LF into CRLF, so giving it
    CRLF data would put ``\\r\\r\\n`` on the wire.
    """
    from twisted.internet import defer
    from twisted.mail import smtp

    out: dict[str, object] = {}

    async def main(reactor: object) -> None:
        sem = defer.DeferredSemaphore(opts.connections)
        sent = 0
        failed: list[str] = []

        def one(n: int) -> defer.Deferred[object]:
            data = message(n).replace(b"\r\n", b"\n")
            return smtp.sendmail(
                opts.host, SENDER, [recipient(n)], data, port=opts.port, reactor=reactor
            )

        def ok(result: tuple[int, list[object]]) -> None:
            nonlocal sent
            accepted, _ = result
            if accepted:
                sent += 1
            else:
                failed.append(repr(result))

        def bad(reason: object) -> None:
            failed.append(str(reason)[:300])

        t0, c0 = _mark()
        ds = [sem.run(one, n).addCallbacks(ok, bad) for n in range(opts.count)]
        await defer.DeferredList(ds)
        out.update(_window(t0, c0))
        out["sent"] = sent
        out["failed"] = len(failed)
        out["errors"] = failed[:5]
        out["reactor"] = type(reactor).__name__

    _react(main)
    return out


def send_twisted_bare(opts: Options) -> dict[str, object]:
    """A floor, not a peer: a bare Twisted ``Protocol`` pipelining like twistmail does.

    MAIL, RCPT and DATA in one write; after the 354, the body and the next message's commands
    in one write (RFC 2920). No address or byte checks, no per-recipient outcomes, no timeouts,
    retries or pool: what Python and Twisted's reactor cost on this machine for the same
    exchange, so a reader can see how much of twistmail's time its features take.
    """
    from twisted.internet import defer, protocol

    out: dict[str, object] = {}

    async def main(reactor: Any) -> None:
        items = iter(range(opts.count))
        done: defer.Deferred[None] = defer.Deferred()
        tally = {"sent": 0, "failed": 0, "open": opts.connections}
        failed: list[str] = []

        class Bare(protocol.Protocol):
            def connectionMade(self) -> None:
                self.transport.setTcpNoDelay(True)
                self.buf = b""
                self.stage = 0  # 0: greeting, 1: EHLO, 2: sending
                self.expect: list[tuple[bytes, int]] = []  # (what, message number)

            def dataReceived(self, data: bytes) -> None:
                lines = (self.buf + data).split(b"\r\n")
                self.buf = lines.pop()
                out: list[bytes] = []
                for line in lines:
                    if line[3:4] == b"-":
                        continue
                    if self.stage < 2:
                        self.stage += 1
                        if self.stage == 1:
                            out.append(b"EHLO bench.example\r\n")
                        elif not self.queue_next(out):
                            out.append(b"QUIT\r\n")
                        continue
                    if not self.expect:
                        continue  # the reply to QUIT
                    what, n = self.expect.pop(0)
                    code = line[:3]
                    if what == b"DATA":
                        if code == b"354":
                            out.append(message(n) + b".\r\n")
                            self.expect.append((b".", n))
                        else:
                            failed.append(line.decode(errors="replace"))
                        if not self.queue_next(out):
                            out.append(b"QUIT\r\n")
                    elif what == b".":
                        if code == b"250":
                            tally["sent"] += 1
                        else:
                            failed.append(line.decode(errors="replace"))
                    elif code != b"250":
                        failed.append(line.decode(errors="replace"))
                if out:
                    self.transport.write(b"".join(out))

            def queue_next(self, out: list[bytes]) -> bool:
                n = next(items, None)
                if n is None:
                    return False
                out.append(
                    b"MAIL FROM:<%s>\r\nRCPT TO:<%s>\r\nDATA\r\n"
                    % (SENDER.encode(), recipient(n).encode())
                )
                self.expect += [(b"MAIL", n), (b"RCPT", n), (b"DATA", n)]
                return True

            def connectionLost(self, reason: object) -> None:
                tally["open"] -= 1
                if tally["open"] == 0:
                    done.callback(None)

        factory = protocol.ClientFactory()
        factory.protocol = Bare
        t0, c0 = _mark()
        for _ in range(opts.connections):
            reactor.connectTCP(opts.host, opts.port, factory)
        await done
        out.update(_window(t0, c0))
        out["sent"] = tally["sent"]
        out["failed"] = len(failed)
        out["errors"] = failed[:5]
        out["reactor"] = type(reactor).__name__

    _react(main)
    return out


SENDERS: dict[str, Callable[[Options], dict[str, object]]] = {
    "twistmail": send_twistmail,
    "aiosmtplib-uvloop": send_aiosmtplib_uvloop,
    "aiosmtplib-asyncio": send_aiosmtplib_asyncio,
    "smtplib-threads": send_smtplib_threads,
    "twisted-naive": send_twisted_naive,
    "twisted-bare": send_twisted_bare,
    **MESSAGE_SENDERS,
}


# ---------------------------------------------------------------------- measuring


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("sender", choices=sorted(SENDERS))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--profile-out", help="run under cProfile and dump stats here")
    ns = parser.parse_args(argv)
    opts = Options(ns.host, ns.port, ns.count, ns.connections, ns.profile_out)
    fn = SENDERS[ns.sender]
    if opts.profile_out:
        measure.start_profiling()
    result = fn(opts)
    if opts.profile_out:
        measure.dump_profile(opts.profile_out)
    result["sender"] = ns.sender
    result["count"] = opts.count
    result["connections"] = opts.connections
    result["message_bytes"] = len(message(0))
    result["pid"] = os.getpid()
    result["python"] = sys.version.split()[0]
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
