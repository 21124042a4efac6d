"""The CSV command's delivery loop against a real server (aiosmtpd) on 127.0.0.1.

The journal is played by the test: each outcome's record "commits" only when the test says so,
which shows the bound the loop keeps on messages delivered but not yet recorded.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_twisted
from servers import CueServer
from twisted.internet import defer, reactor, task

from twistmail.mailer import Mailer
from twistmail.merge.delivery import JournaledDelivery
from twistmail.message import Envelope, envelope_from_bytes


@dataclass
class Job:
    envelope: Envelope
    attempts: int = 0


def jobs(n: int) -> list[Job]:
    data = b"Subject: x\r\n\r\nhi\r\n"
    return [
        Job(envelope_from_bytes("a@example.com", [f"u{i}@example.org"], data)) for i in range(n)
    ]


async def until(check: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        await task.deferLater(reactor, 0.02, lambda: None)


async def pause(seconds: float = 0.3) -> None:
    await task.deferLater(reactor, seconds, lambda: None)


def recorded_as_sent(outcome: tuple[Any, ...]) -> bool:
    """``sent(job, code, text)``, or ``settle(job, result, error)`` with every recipient sent."""
    if isinstance(outcome[0], int):
        return bool(outcome[0] == 250)
    result, error = outcome
    return error is None and result.ok and len(result.recipients) == 1


class Records:
    """The outcomes the loop recorded, each with the Deferred that commits it."""

    def __init__(self) -> None:
        self.outcomes: list[tuple[Job, tuple[Any, ...]]] = []
        self.commits: list[defer.Deferred[None]] = []

    def record(self, job: Job, *outcome: Any) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        self.outcomes.append((job, outcome))
        self.commits.append(d)
        return d

    def commit_all(self) -> None:
        for d in self.commits:
            if not d.called:
                d.callback(None)


def start(
    server: CueServer,
    concurrency: int,
    n: int,
    record: Callable[..., defer.Deferred[None]],
    **options: Any,
) -> tuple[Mailer, defer.Deferred[None]]:
    """A loop over ``n`` jobs on a fresh mailer; ``record`` plays the journal."""
    mailer = Mailer(f"smtp://127.0.0.1:{server.port}", concurrency=concurrency, max_attempts=1)
    pending = iter(jobs(n))
    loop = JournaledDelivery(
        mailer,
        reactor,
        concurrency,
        next_job=lambda: next(pending, None),
        more_in=lambda: None,
        settle=record,
        sent=record,
        **options,
    )
    return mailer, loop.start()


async def commit_until(done: defer.Deferred[None], records: Records) -> None:
    """Commit every outcome as it comes, until the loop is done."""
    while not done.called:
        records.commit_all()
        await pause(0.05)
    await done


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("pipelining", [True, False])
async def test_at_most_concurrency_messages_are_delivered_and_not_yet_recorded(
    cue_server: Callable[..., CueServer], pipelining: bool
) -> None:
    server = cue_server(pipelining=pipelining)
    concurrency, n = 2, 8
    records = Records()
    mailer, done = start(server, concurrency, n, records.record)
    try:
        await until(lambda: len(records.commits) == concurrency)
        await pause()
        # Nothing more reaches the server while those outcomes are not committed.
        assert len(server.received) == len(records.commits) == concurrency
        records.commits[0].callback(None)
        await until(lambda: len(records.commits) == concurrency + 1)
        await pause()
        assert len(server.received) == concurrency + 1
        await commit_until(done, records)
    finally:
        await mailer.close()
    assert sorted(r.recipients[0] for r in server.received) == sorted(
        f"u{i}@example.org" for i in range(n)
    )
    assert all(recorded_as_sent(outcome) for _, outcome in records.outcomes)
    assert len(records.outcomes) == n


@pytest_twisted.ensureDeferred
async def test_a_failed_record_stops_the_loop_and_drops_held_messages(
    cue_server: Callable[..., CueServer],
) -> None:
    server = cue_server(pipelining=True)
    records = Records()
    mailer, done = start(server, 1, 5, records.record)
    try:
        await until(lambda: len(records.commits) == 1)
        await pause()
        records.commits[0].errback(OSError("disk full"))
        with pytest.raises(OSError, match="disk full"):
            await done
        await pause()
        # The message whose data was held back was never completed on the server.
        assert len(server.received) == 1
    finally:
        await mailer.close()


@pytest_twisted.ensureDeferred
async def test_refusals_waiting_for_their_commit_stop_new_rows_at_the_cap(
    cue_server: Callable[..., CueServer],
) -> None:
    server = cue_server(pipelining=True, mail_reply="550 5.7.1 not from you")
    records = Records()
    mailer, done = start(server, 2, 20, records.record, max_recording=5)
    try:
        await until(lambda: len(records.commits) >= 5)
        await pause()
        waiting = len(records.commits)
        # No row is read while five outcomes wait; those already in flight (two connections,
        # three pipelined each) still end and are recorded.
        assert 5 <= waiting <= 5 + 2 * 3
        await pause()
        assert len(records.commits) == waiting
        await commit_until(done, records)
    finally:
        await mailer.close()
    assert len(records.outcomes) == 20
    assert server.received == []
    assert all(result.recipients[0].code == 550 for _, (result, _) in records.outcomes)


@pytest_twisted.ensureDeferred
async def test_an_outcome_that_cannot_be_recorded_fails_the_loop(
    cue_server: Callable[..., CueServer],
) -> None:
    server = cue_server(pipelining=True)

    def refuse(job: Job, *outcome: Any) -> defer.Deferred[None]:
        raise RuntimeError("the journal is closed")

    mailer, done = start(server, 1, 3, refuse)
    try:
        await until(lambda: done.called)
        with pytest.raises(RuntimeError, match="journal is closed"):
            await done
    finally:
        await mailer.close()
    assert len(server.received) == 1  # nothing after the outcome that could not be recorded
