"""``Mailer(suppression=...)``: the library door checks every message against the list (a real
SQLite file) and adds hard bounces to it; a real aiosmtpd server on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import pytest_twisted
from servers import CueServer
from twisted.internet import reactor

from twistmail import Mailer
from twistmail.errors import PermanentError
from twistmail.results import SendResult
from twistmail.suppression import (
    HARD_BOUNCE,
    MANUAL,
    UNSUBSCRIBED,
    SqliteSuppressionList,
    Suppression,
)

Cue = Callable[..., CueServer]


def triple(n: int, *to: str, headers: str = "") -> tuple[str, list[str], bytes]:
    data = f"From: a@example.com\r\n{headers}Subject: {n}\r\n\r\nbody {n}\r\n".encode()
    return ("a@example.com", list(to), data)


@pytest_twisted.ensureDeferred
async def test_send_leaves_out_suppressed_recipients_and_suppresses_hard_bounces(
    cue_server: Cue, tmp_path: Path
) -> None:
    server = cue_server(rcpt_replies={"gone": "550 5.1.1 no such user"})
    store = await SqliteSuppressionList.open(tmp_path / "s.db")
    await store.add(
        [
            Suppression("blocked@example.org", MANUAL),
            Suppression("reader@example.org", UNSUBSCRIBED, "news.example.org"),
        ]
    )
    mailer = Mailer(f"smtp://127.0.0.1:{server.port}", suppression=store, reactor=reactor)
    try:
        alone = await mailer.send(triple(1, "Blocked@example.org"))
        assert alone.attempts == 0
        assert [(r.recipient, r.status) for r in alone.recipients] == [
            ("Blocked@example.org", "suppressed")
        ]
        assert alone.recipients[0].response == "suppressed: manual"
        both = await mailer.send(triple(2, "ok@example.org", "blocked@example.org"))
        assert both.ok
        assert [r.recipient for r in both.suppressed] == ["blocked@example.org"]
        news = "List-Id: News <news.example.org>\r\n"
        unsubscribed = await mailer.send(triple(3, "reader@example.org", headers=news))
        assert unsubscribed.recipients[0].status == "suppressed"
        reset = await mailer.send(triple(4, "reader@example.org"))  # no list: goes
        assert reset.ok
        with pytest.raises(PermanentError):
            await mailer.send(triple(5, "gone@example.org"))
        (entry,) = [e for e in await store.entries() if e.address == "gone@example.org"]
        assert entry.reason == HARD_BOUNCE
        again = await mailer.send(triple(6, "gone@example.org"))
        assert again.recipients[0].status == "suppressed"
    finally:
        await mailer.close()
        await store.close()
    assert [m.recipients for m in server.received] == [["ok@example.org"], ["reader@example.org"]]


@pytest_twisted.ensureDeferred
async def test_send_many_checks_every_message_in_chunks_and_reports_each(
    cue_server: Cue, tmp_path: Path
) -> None:
    server = cue_server(pipelining=True)
    store = await SqliteSuppressionList.open(tmp_path / "s.db")
    await store.add([Suppression(f"u{n}@example.org", MANUAL) for n in range(0, 1200, 3)])
    mailer = Mailer(f"smtp://127.0.0.1:{server.port}", suppression=store, reactor=reactor)
    seen: dict[int, SendResult | Exception] = {}
    try:
        messages = (triple(n, f"u{n}@example.org") for n in range(1200))  # a generator
        report = await mailer.send_many(messages, on_result=seen.__setitem__)
    finally:
        await mailer.close()
        await store.close()
    assert (report.messages, report.sent, report.suppressed) == (1200, 800, 400)
    assert report.recipients_suppressed == 400
    assert sorted(seen) == list(range(1200))
    for n, result in seen.items():
        assert isinstance(result, SendResult)
        expected = "suppressed" if n % 3 == 0 else "sent"
        assert [r.status for r in result.recipients] == [expected]
    received = sorted(int(m.recipients[0][1:].split("@")[0]) for m in server.received)
    assert received == [n for n in range(1200) if n % 3]


@pytest_twisted.ensureDeferred
async def test_a_reply_to_the_data_suppresses_only_a_messages_sole_recipient(
    cue_server: Cue, tmp_path: Path
) -> None:
    # SMTP answers the data once for every recipient accepted: 550 5.1.1 then names one
    # address only when the message had one. A refused MAIL FROM is about the sender.
    after_data = cue_server(data_reply="550 5.1.1 no such user")
    mail_refused = cue_server(mail_reply="550 5.1.1 no such user")
    store = await SqliteSuppressionList.open(tmp_path / "s.db")
    mailers = [
        Mailer(f"smtp://127.0.0.1:{s.port}", suppression=store, reactor=reactor, max_attempts=1)
        for s in (after_data, mail_refused)
    ]
    try:
        with pytest.raises(PermanentError):
            await mailers[0].send(triple(1, "ann@example.org", "bob@example.org"))
        assert await store.entries() == []
        with pytest.raises(PermanentError):
            await mailers[1].send(triple(2, "cat@example.org"))
        assert await store.entries() == []
        with pytest.raises(PermanentError):
            await mailers[0].send(triple(3, "dan@example.org"))
        (entry,) = await store.entries()
        assert (entry.address, entry.reason) == ("dan@example.org", HARD_BOUNCE)
    finally:
        for mailer in mailers:
            await mailer.close()
        await store.close()
    assert [m.recipients for m in after_data.rejected] == [
        ["ann@example.org", "bob@example.org"],
        ["dan@example.org"],
    ]
