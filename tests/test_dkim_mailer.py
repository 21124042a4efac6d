"""Mailer(dkim=...) signs what it sends: the bytes a real server received verify with dkimpy."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from email.message import EmailMessage
from typing import Any

import pytest
import pytest_twisted
from dkimcheck import DOMAIN, ed_key, rsa_key, verify
from servers import CueServer

from twistmail.dkim import DkimSigner, Unsigned
from twistmail.errors import PermanentError
from twistmail.mailer import Mailer, signing_threads
from twistmail.message import MessageLike, to_envelope

Cue = Callable[..., CueServer]


def message(author: str, body: str, cte: str | None = None) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = author
    msg["To"] = "ann@example.org"
    msg["Subject"] = "Grüße"
    if cte:
        msg.set_content(body, cte=cte)
    else:
        msg.set_content(body)
    return msg


def mailer(port: int, **kw: Any) -> Mailer:
    return Mailer(f"smtp://127.0.0.1:{port}", timeout=5, retry_delay=0.05, **kw)


# None: the default (a thread per CPU); 2: two signing threads; False: inline.
@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("threads", [None, 2, False])
async def test_send_many_signs_every_kind_of_message(cue_server: Cue, threads: int | None) -> None:
    server = cue_server()
    m = mailer(server.port, dkim=[rsa_key(), ed_key()], dkim_threads=threads)
    items: list[MessageLike] = []
    for i in range(110):  # over the small-batch size: the streaming delivery loop
        kind = i % 4
        if kind == 0:
            items.append(message(f"shop@{DOMAIN}", f"Hello {i}\n.dot\n"))
        elif kind == 1:
            items.append(message(f"shop@{DOMAIN}", f"Zürich {i}\n", cte="8bit"))
        elif kind == 2:
            items.append(message(f"josé@{DOMAIN}", f"utf8 {i}\n"))
        else:
            raw = f"From: shop@{DOMAIN}\r\nTo: b@example.org\r\n\r\n.x {i}\r\n".encode()
            items.append((f"shop@{DOMAIN}", ["b@example.org"], raw))
    report = await m.send_many(items)
    await m.close()
    assert report.sent == 110
    assert len(server.received) == 110
    for received in server.received:
        assert received.data.count(b"DKIM-Signature:") == 2
        assert verify(received.data, 0)
        assert verify(received.data, 1)


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("threads", [2, 0])
async def test_missing_key_sends_unsigned_or_refuses(cue_server: Cue, threads: int) -> None:
    server = cue_server()
    m = mailer(server.port, dkim=[rsa_key()], dkim_threads=threads)
    result = await m.send(message("x@elsewhere.test", "hi\n"))
    assert result.ok
    assert b"DKIM-Signature" not in server.received[0].data
    await m.close()

    strict = mailer(server.port, dkim=[rsa_key()], dkim_missing="refuse", dkim_threads=threads)
    with pytest.raises(PermanentError, match=r"no DKIM key for the From domain elsewhere\.test"):
        await strict.send(message("x@elsewhere.test", "hi\n"))
    signed = await strict.send(message(f"shop@{DOMAIN}", "hi\n"))
    await strict.close()
    assert signed.ok
    assert len(server.received) == 2  # the refused one never reached the server
    assert verify(server.received[1].data)


class GatedSigner(DkimSigner):
    """Makes signatures once ``gate`` is set; raises instead on call number ``explode_at``."""

    def __init__(self, explode_at: int = -1) -> None:
        super().__init__([rsa_key()])
        self.gate = threading.Event()
        self.gate.set()
        self.explode_at = explode_at
        self.calls = 0
        self.lock = threading.Lock()

    def make_signatures(self, unsigned: Unsigned) -> list[bytes]:
        assert self.gate.wait(10)
        with self.lock:
            self.calls += 1
            if self.calls == self.explode_at:
                raise RuntimeError("the signing device is on fire")
        return super().make_signatures(unsigned)


def signing_threads_alive() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("twistmail-dkim")]


@pytest_twisted.ensureDeferred
async def test_attempt_cancelled_while_signing_ends_untried(cue_server: Cue) -> None:
    server = cue_server()
    gated = GatedSigner()
    gated.gate.clear()  # the signing thread waits
    m = mailer(server.port, dkim=gated, dkim_threads=1)
    ended: list[Any] = []
    attempt = m.attempt(
        to_envelope(message(f"shop@{DOMAIN}", "hi\n")),
        lambda context, result, error: ended.append((context, result, error)),
        "ctx",
    )
    assert ended == []
    attempt.cancel()
    assert len(ended) == 1
    context, result, error = ended[0]
    assert context == "ctx"
    assert result is None
    assert error.attempted is False
    gated.gate.set()  # the signing ends now; its outcome is dropped
    await m.close()
    assert len(ended) == 1
    assert server.received == []


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("threads", [2, False])
async def test_a_message_that_cannot_be_signed_fails_alone(
    cue_server: Cue, threads: int | bool
) -> None:
    server = cue_server()
    m = mailer(server.port, dkim=GatedSigner(explode_at=8), dkim_threads=threads, max_attempts=1)
    items: list[MessageLike] = []
    for i in range(120):
        msg = message(f"shop@{DOMAIN}", f"Hello {i}\n")
        msg["Message-ID"] = f"<n{i}@example.com>"
        items.append(msg)
    outcomes: dict[int, Any] = {}
    report = await m.send_many(items, on_result=outcomes.__setitem__)
    await m.close()
    assert report.sent == 119
    assert report.failed == 1
    [failed] = [i for i, result in outcomes.items() if not result.ok]
    error = outcomes[failed].error
    assert isinstance(error, PermanentError)
    assert f"cannot DKIM-sign message <n{failed}@example.com> from <shop@{DOMAIN}>" in str(error)
    assert "the signing device is on fire" in str(error)
    assert len(server.received) == 119
    assert all(verify(received.data) for received in server.received)


@pytest_twisted.ensureDeferred
async def test_signing_threads_start_with_the_first_message_and_stop_with_close(
    cue_server: Cue,
) -> None:
    server = cue_server()
    m = mailer(server.port, dkim=[rsa_key()], dkim_threads=2)
    assert signing_threads_alive() == []
    await m.send(message(f"shop@{DOMAIN}", "hi\n"))
    assert sorted(signing_threads_alive()) == ["twistmail-dkim-0", "twistmail-dkim-1"]
    await m.close()
    assert signing_threads_alive() == []
    assert verify(server.received[0].data)


def test_with_signing_threads_the_engine_keeps_more_attempts_in_flight_than_connections() -> None:
    """So the threads sign ahead while the connections send (a signed attempt waits for its
    connection): without it they idled through every SMTP round trip."""
    url = "smtp://127.0.0.1:1"
    plain = Mailer(url, concurrency=3)
    inline = Mailer(url, concurrency=3, dkim=[rsa_key()], dkim_threads=False)
    threaded = Mailer(url, concurrency=3, dkim=[rsa_key()], dkim_threads=2)
    assert plain.capacity == inline.capacity == 3 * plain.pool.depth
    assert threaded._signing is not None
    ahead = 2 * threaded._signing.size * threaded._signing.max_batch
    assert threaded.capacity == 3 * threaded.pool.depth + ahead
    assert signing_threads_alive() == []  # nothing started yet


def test_signing_threads_by_default_one_per_cpu_and_inline_on_one() -> None:
    cpus = len(os.sched_getaffinity(0))
    assert signing_threads(None) == (cpus if cpus > 1 else 0)
    assert signing_threads(True) == signing_threads(None)
    assert signing_threads(False) == signing_threads(0) == 0
    assert signing_threads(3) == 3
    with pytest.raises(ValueError, match="dkim_threads"):
        signing_threads(-1)


@pytest_twisted.ensureDeferred
async def test_after_the_signing_threads_stop_with_the_reactor_messages_sign_inline(
    cue_server: Cue,
) -> None:
    server = cue_server()
    m = mailer(server.port, dkim=[rsa_key()], dkim_threads=2)
    await m.send(message(f"shop@{DOMAIN}", "first\n"))
    assert m._signing is not None
    m._signing.stop()  # what the reactor's shutdown trigger does, the Mailer still open
    assert signing_threads_alive() == []
    result = await m.send(message(f"shop@{DOMAIN}", "second\n"))
    await m.close()
    assert result.ok
    assert len(server.received) == 2
    assert all(verify(received.data) for received in server.received)
