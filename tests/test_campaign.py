"""The campaign loop in-process against a real server (aiosmtpd) on 127.0.0.1."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from servers import CueServer
from twisted.internet import defer, reactor, task
from waiting import until

from twistmail.merge.run import EXIT_INTERRUPTED, Campaign, SendOptions

TEMPLATE = "From: a@example.com\nTo: {{ email }}\nSubject: hi\n\nbody\n"


def campaign_options(tmp_path: Path, rows: int, port: int, **options: Any) -> SendOptions:
    """Options for a campaign of ``rows`` recipients u0..u{rows-1}@example.org, quiet."""
    csv_path = tmp_path / "r.csv"
    if not csv_path.exists():
        csv_path.write_text(
            "email\n" + "".join(f"u{i}@example.org\n" for i in range(rows)), encoding="utf-8"
        )
        (tmp_path / "t.txt").write_text(TEMPLATE, encoding="utf-8")
    return SendOptions(
        csv_path=str(csv_path),
        template_path=str(tmp_path / "t.txt"),
        smtp_url=f"smtp://127.0.0.1:{port}",
        progress=False,
        out=io.StringIO(),
        **options,
    )


@pytest_twisted.ensureDeferred
async def test_a_server_deferring_everything_does_not_pull_the_csv_into_memory(
    cue_server: Callable[..., CueServer], tmp_path: Path
) -> None:
    server = cue_server(mail_reply="451 4.3.0 busy, try later")
    options = campaign_options(tmp_path, 5000, server.port, concurrency=4, retry_delay=600)
    campaign = Campaign(options, reactor)
    done = defer.ensureDeferred(campaign.run())
    # Idle: the parking lot is full and every row started has come back deferred (none in
    # flight), so nothing can start before the first parked row is due, 600 s from now. A
    # loop that kept reading the CSV would only get here at its end (5,000 rows).
    await until(
        lambda: (
            campaign._parked.full
            and campaign.counts.deferred == campaign.counts.started
            and campaign._loop is not None
            and campaign._loop.in_flight == 0
        )
    )
    # max(1000, 50 * concurrency) rows parked (plus those in flight: connections x pipeline
    # depth of 3), then it waits.
    assert 1000 <= campaign.counts.started <= 1000 + 3 * options.concurrency
    assert campaign.counts.deferred == len(campaign._parked) == campaign.counts.started
    campaign.interrupt()
    campaign.interrupt()  # a second signal is acknowledged: what is in flight is cut off
    assert await done == EXIT_INTERRUPTED
    output = options.out.getvalue()
    assert "stopping: letting messages in flight finish" in output
    assert "aborting: cutting off the messages in flight" in output
    assert server.received == []


@pytest_twisted.ensureDeferred
async def test_a_pipelining_server_that_defers_and_drops_gets_every_row_exactly_once(
    cue_server: Callable[..., CueServer], tmp_path: Path
) -> None:
    # The delivery loop's pipelined path (envelopes ahead, bodies held for the journal) with a
    # 4xx on one recipient and a connection dropped after the data of the first message.
    server = cue_server(
        pipelining=True,
        rcpt_replies_once={"u7": "451 4.2.1 busy, try later"},
        drop_after_data_count=1,
    )
    rows = 60
    options = campaign_options(tmp_path, rows, server.port, concurrency=3, retry_delay=0.05)
    assert await defer.ensureDeferred(Campaign(options, reactor).run()) == 0, options.out.getvalue()
    delivered = sorted(r.recipients[0] for r in server.received)
    assert delivered == sorted(f"u{i}@example.org" for i in range(rows))  # once each
    assert len(server.dropped) == 1
    report = (tmp_path / "r.report.csv").read_text(encoding="utf-8").splitlines()
    assert len(report) == rows + 1
    assert all(",sent," in line for line in report[1:])


@pytest_twisted.ensureDeferred
async def test_an_interrupt_lets_messages_in_flight_finish_until_the_grace_period_ends(
    cue_server: Callable[..., CueServer], tmp_path: Path
) -> None:
    # One interrupt: no new row starts, the messages stalled at their final dot are given the
    # grace period (on a clock) and cut off when it ends; nothing is recorded as sent.
    stalled = cue_server(pipelining=True, stall_on="DOT")
    options = campaign_options(tmp_path, 10, stalled.port, concurrency=2)
    clock = task.Clock()
    campaign = Campaign(options, reactor, clock=clock)
    done = defer.ensureDeferred(campaign.run())
    await until(lambda: len(stalled.stalled) == 2, "both connections stalled at a final dot")
    campaign.interrupt()
    clock.advance(options.grace - 0.5)
    await task.deferLater(reactor, 0.2, lambda: None)  # a few real turns for the connections
    assert not done.called
    clock.advance(1)
    assert await done == EXIT_INTERRUPTED
    assert stalled.received == []
    assert campaign.counts.sent == 0


@pytest_twisted.ensureDeferred
async def test_interrupted_with_pipelined_messages_unanswered_then_resumed_elsewhere(
    cue_server: Callable[..., CueServer], tmp_path: Path
) -> None:
    # The server takes each message's data and never answers the final dot: every connection
    # has one message sent and unanswered and the next ones queued behind it. An interrupt
    # (a second one: abort) drops them; nothing is recorded as sent, and a rerun against a
    # working server delivers every row exactly once.
    stalled = cue_server(pipelining=True, stall_on="DOT")
    rows = 30

    def options(port: int) -> SendOptions:
        return campaign_options(tmp_path, rows, port, concurrency=2)

    campaign = Campaign(options(stalled.port), reactor)
    done = defer.ensureDeferred(campaign.run())
    await until(lambda: len(stalled.stalled) == 2, "both connections stalled at a final dot")
    await until(lambda: campaign.counts.started > 2, "more messages queued behind them")
    campaign.interrupt()
    assert not done.called  # letting the messages in flight finish (on a clock: test_engine)
    campaign.interrupt()
    assert await done == EXIT_INTERRUPTED
    assert stalled.received == []
    assert campaign.counts.sent == 0
    report = (tmp_path / "r.report.csv").read_text(encoding="utf-8").splitlines()[1:]
    assert len(report) == rows
    assert not any(",sent," in line for line in report)

    working = cue_server(pipelining=True)
    assert await defer.ensureDeferred(Campaign(options(working.port), reactor).run()) == 0
    assert sorted(r.recipients[0] for r in working.received) == sorted(
        f"u{i}@example.org" for i in range(rows)
    )


@pytest_twisted.ensureDeferred
async def test_rows_with_a_large_attachment_are_rendered_and_checked_a_few_at_a_time(
    cue_server: Callable[..., CueServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The suppression check takes rendered rows in batches of about SCREEN_BYTES, so a
    campaign with a 1 MB attachment never holds a whole chunk of the CSV rendered (200 such
    rows were 222 MB of peak memory, against 86 MB before the check)."""
    from twistmail.merge import run
    from twistmail.merge.suppressing import SCREEN_BYTES

    asked: list[int] = []

    class CountingScreen(run.RowScreen):
        def screen(self, items: Any) -> Any:
            asked.append(len(items))
            return super().screen(items)

    monkeypatch.setattr(run, "RowScreen", CountingScreen)
    server = cue_server()
    rows = 40
    options = campaign_options(tmp_path, rows, server.port, suppression_path=str(tmp_path / "s.db"))
    (tmp_path / "big.bin").write_bytes(bytes(range(256)) * 4096)  # 1 MB, 1.37 MB in base64
    (tmp_path / "t.txt").write_text(
        "From: a@example.com\nTo: {{ email }}\nSubject: hi\nAttachment: big.bin\n\nbody\n",
        encoding="utf-8",
    )
    assert await defer.ensureDeferred(Campaign(options, reactor).run()) == 0
    assert len(server.received) == rows
    assert all(len(message.data) > 1024 * 1024 for message in server.received)
    assert sum(asked) == rows
    assert max(asked) <= SCREEN_BYTES // (1024 * 1024 * 4 // 3) + 1, asked
