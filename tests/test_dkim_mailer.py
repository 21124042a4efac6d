"""Mailer(dkim=...) signs what it sends: the bytes a real server received verify with dkimpy."""

from __future__ import annotations

from collections.abc import Callable
from email.message import EmailMessage
from typing import Any

import pytest
import pytest_twisted
from dkimcheck import DOMAIN, ed_key, rsa_key, verify
from servers import CueServer

from twistmail.errors import PermanentError
from twistmail.mailer import Mailer
from twistmail.message import MessageLike

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


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("threads", [True, False])
async def test_send_many_signs_every_kind_of_message(cue_server: Cue, threads: bool) -> None:
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
@pytest.mark.parametrize("threads", [True, False])
async def test_missing_key_sends_unsigned_or_refuses(cue_server: Cue, threads: bool) -> None:
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


@pytest_twisted.ensureDeferred
async def test_attempt_cancelled_while_signing_ends_untried(cue_server: Cue) -> None:
    from twisted.python.threadpool import ThreadPool

    from twistmail.message import to_envelope

    server = cue_server()
    m = mailer(server.port, dkim=[rsa_key()], dkim_threads=True)
    idle = ThreadPool(minthreads=0, maxthreads=1)  # not started: the signing waits
    m._sign_pool = idle
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
    idle.start()  # the signing runs now; its result is dropped
    idle.stop()
    await m.close()
    assert server.received == []
