"""The queue contract (``IQueue``): one suite that every queue store passes.

txacme's pattern: the ``open_queue`` fixture is parametrized over the stores, so each test runs
against each of them. Every store is driven by one injected clock (``task.Clock``), so leases
and due times are tested without waiting. To add a store, add one line to ``STORES``: a
function that opens it on a given clock in a given directory. A store whose clock is its
database server's (PostgreSQL's ``now()``) takes the clock for tests all the same, e.g. by
passing ``clock()`` where its SQL would otherwise read ``now()``.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import postgres_server
import pytest
import pytest_twisted
from twisted.internet import defer, task
from zope.interface.verify import verifyObject

from twistmail.interfaces import IQueue
from twistmail.merge.attachments import StoredAttachments
from twistmail.merge.csvsource import Row
from twistmail.merge.identity import campaign_message_id, row_id
from twistmail.merge.prepare import Prepared, prepare_row
from twistmail.merge.template import MessageTemplate
from twistmail.message import Envelope, envelope_from_bytes
from twistmail.queue import ClaimedMessage, Outcome, QueueError, SqliteQueue
from twistmail.queue.campaigns import CampaignChanged, CampaignRow, CampaignSpec
from twistmail.queue.postgres import PostgresQueue
from twistmail.suppression.records import HARD_BOUNCE, Suppression, suppressed_reply
from twistmail.testing import MemoryQueue

T0 = 1_700_000_000.0
Clock = Callable[[], float]


async def _sqlite(clock: Clock, directory: Path) -> Any:
    return await SqliteQueue.open(directory / "queue.db", clock=clock)


async def _memory(clock: Clock, directory: Path) -> Any:
    return MemoryQueue(clock=clock)


def _schema(directory: Path) -> str:
    """The PostgreSQL schema of the test using ``directory`` (one per test)."""
    return f"test_{directory.name.lower()}_{abs(hash(str(directory))) % 10**8}"[:63]


async def _postgresql(clock: Clock, directory: Path) -> Any:
    url = postgres_server.require()
    return await PostgresQueue.open(url, schema=_schema(directory), clock=clock)


STORES: dict[str, Callable[[Clock, Path], Awaitable[Any]]] = {
    "sqlite": _sqlite,
    "memory": _memory,
    "postgresql": _postgresql,
}

OpenQueue = Callable[[], Awaitable[Any]]


@pytest.fixture
def clock() -> task.Clock:
    """The store's clock, at ``T0``."""
    clock = task.Clock()
    clock.advance(T0)
    return clock


@pytest.fixture(params=sorted(STORES))
def open_queue(
    request: pytest.FixtureRequest, clock: task.Clock, tmp_path: Path
) -> Iterator[OpenQueue]:
    """Factory: ``await open_queue()`` opens the store under test on ``clock``; closed after."""
    opened: list[Any] = []

    async def open_one() -> Any:
        store = await STORES[request.param](clock.seconds, tmp_path)
        opened.append(store)
        return store

    yield open_one
    if opened:
        pytest_twisted.blockon(defer.gatherResults([store.close() for store in opened]))
    if request.param == "postgresql":
        postgres_server.drop_schema(_schema(tmp_path))


def envelope(n: int, *recipients: str) -> Envelope:
    rcpts = recipients or (f"user{n}@example.org",)
    data = f"Message-ID: <m{n}@test>\r\nSubject: {n}\r\n\r\nbody {n}\r\n.dot line\r\n".encode()
    return envelope_from_bytes("sender@example.com", rcpts, data)


def sent(claimed: ClaimedMessage) -> Outcome:
    """Every recipient of ``claimed`` accepted."""
    return Outcome(
        id=claimed.id,
        fence=claimed.fence,
        state="sent",
        attempts=claimed.attempts + 1,
        code=250,
        response="ok",
        recipients=tuple((p, "sent", 250, "ok") for p in claimed.positions),
    )


def deferred(claimed: ClaimedMessage, retry_in: float) -> Outcome:
    """Every recipient of ``claimed`` to be tried again in ``retry_in`` seconds."""
    return Outcome(
        id=claimed.id,
        fence=claimed.fence,
        state="deferred",
        attempts=claimed.attempts + 1,
        retry_in=retry_in,
        code=451,
        response="busy",
        recipients=tuple((p, "pending", 451, "busy") for p in claimed.positions),
    )


# The interface --------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_provides_iqueue(open_queue: OpenQueue) -> None:
    assert verifyObject(IQueue, await open_queue())


# Enqueue and claim ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_claim_returns_the_envelope_as_enqueued(open_queue: OpenQueue) -> None:
    queue = await open_queue()
    original = envelope(7, "x@example.org", "Zoë@例え.jp")
    ids = await queue.enqueue([envelope(1), original])
    assert len(set(ids)) == 2
    assert ids == sorted(ids)
    claimed = await queue.claim("a", 10, lease=60)
    assert [c.id for c in claimed] == ids
    mine = claimed[1]
    env = mine.envelope
    assert env.payload == original.payload
    assert env.payload.endswith(b"\r\n..dot line\r\n.\r\n")
    assert (env.sender, env.recipients) == (original.sender, original.recipients)
    assert (env.message_id, env.size, env.smtputf8) == ("<m7@test>", original.size, True)
    assert mine.positions == (0, 1)
    assert mine.attempts == 0
    assert mine.refused_before is None
    assert mine.fence >= 1


@pytest_twisted.ensureDeferred
async def test_claims_take_the_oldest_due_first_up_to_the_limit(
    open_queue: OpenQueue, clock: task.Clock
) -> None:
    queue = await open_queue()
    first, second, third = [(await queue.enqueue([envelope(n)]))[0] for n in range(3)]
    assert await queue.claim("a", 0, lease=60) == []
    assert await queue.claim("a", -1, lease=60) == []
    # first is deferred to T0+50: the two others, due at T0, come before it, and it only
    # comes once due.
    (claimed,) = await queue.claim("a", 1, lease=60)
    assert claimed.id == first
    assert await queue.record("a", deferred(claimed, 50)) is True
    assert [c.id for c in await queue.claim("a", 1, lease=60)] == [second]
    assert [c.id for c in await queue.claim("a", 5, lease=60)] == [third]
    clock.advance(49)
    assert await queue.claim("a", 5, lease=60) == []
    clock.advance(1)
    assert [c.id for c in await queue.claim("a", 5, lease=60)] == [first]


@pytest_twisted.ensureDeferred
async def test_a_claimed_message_is_not_claimed_again_until_its_lease_expires(
    open_queue: OpenQueue, clock: task.Clock
) -> None:
    queue = await open_queue()
    (mid,) = await queue.enqueue([envelope(1)])
    (first,) = await queue.claim("dead", 5, lease=30)
    clock.advance(29)
    assert await queue.claim("live", 5, lease=30) == []
    summary = await queue.summary()
    assert (summary.held, summary.expired, summary.waiting) == (1, 0, 0)
    clock.advance(1)  # the lease ends at T0+30: expired from then on, by the store's clock
    summary = await queue.summary()
    assert (summary.held, summary.expired, summary.waiting) == (0, 1, 1)
    (again,) = await queue.claim("live", 5, lease=30)
    assert again.id == mid
    assert again.fence > first.fence
    assert again.attempts == 0


# Fencing ------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_worker_whose_lease_expired_cannot_overwrite_the_new_owners_outcome(
    open_queue: OpenQueue, clock: task.Clock
) -> None:
    queue = await open_queue()
    await queue.enqueue([envelope(1)])
    (stale,) = await queue.claim("slow", 5, lease=30)
    clock.advance(31)  # "slow" paused past its lease; "fast" takes the message over
    (fresh,) = await queue.claim("fast", 5, lease=30)
    assert await queue.record("fast", sent(fresh)) is True
    # "slow" wakes up and reports a deferral: it must not undo the delivery.
    assert await queue.record("slow", deferred(stale, 10)) is False
    summary = await queue.summary()
    assert summary.counts["sent"] == 1
    assert summary.counts["deferred"] == 0
    assert await queue.unsent() == []
    assert await queue.next_due() is None


@pytest_twisted.ensureDeferred
async def test_the_fence_tells_two_claims_by_one_owner_apart(
    open_queue: OpenQueue, clock: task.Clock
) -> None:
    # One owner token reused (a restarted worker with a fixed name): only the newest claim
    # may record, and only the newest may release.
    queue = await open_queue()
    await queue.enqueue([envelope(1)])
    (old,) = await queue.claim("worker", 5, lease=30)
    clock.advance(30)
    (new,) = await queue.claim("worker", 5, lease=30)
    assert new.fence > old.fence
    assert await queue.record("worker", sent(old)) is False
    assert await queue.release("worker", [old]) == 0
    assert (await queue.summary()).counts["sending"] == 1
    assert await queue.record("worker", deferred(new, 5)) is True
    assert (await queue.summary()).counts["deferred"] == 1


@pytest_twisted.ensureDeferred
async def test_an_expired_lease_nobody_took_over_still_records(
    open_queue: OpenQueue, clock: task.Clock
) -> None:
    queue = await open_queue()
    await queue.enqueue([envelope(1)])
    (claimed,) = await queue.claim("slow", 5, lease=30)
    clock.advance(100)
    assert await queue.record("slow", sent(claimed)) is True
    assert (await queue.summary()).counts["sent"] == 1


@pytest_twisted.ensureDeferred
async def test_another_owner_cannot_record_or_release(open_queue: OpenQueue) -> None:
    queue = await open_queue()
    await queue.enqueue([envelope(1)])
    (claimed,) = await queue.claim("a", 5, lease=30)
    assert await queue.record("b", sent(claimed)) is False
    assert await queue.release("b", [claimed]) == 0
    assert await queue.record("a", sent(claimed)) is True
    assert await queue.record("a", sent(claimed)) is False  # once only


# Release and renew ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_release_gives_claims_back_without_counting_an_attempt(
    open_queue: OpenQueue, clock: task.Clock
) -> None:
    queue = await open_queue()
    ids = await queue.enqueue([envelope(1), envelope(2)])
    claimed = await queue.claim("a", 5, lease=30)
    assert await queue.release("a", claimed) == 2
    summary = await queue.summary()
    assert (summary.counts["queued"], summary.counts["sending"], summary.due) == (2, 0, 2)
    again = await queue.claim("b", 5, lease=30)
    assert [c.id for c in again] == ids
    assert [c.attempts for c in again] == [0, 0]
    # A message tried once and claimed again goes back as deferred, its attempt kept.
    assert await queue.record("b", deferred(again[0], 10)) is True
    clock.advance(10)
    (retry,) = await queue.claim("c", 5, lease=30)
    assert await queue.release("c", [retry]) == 1
    (row, _) = await queue.unsent()
    assert (row.id, row.state, row.attempts) == (ids[0], "deferred", 1)


@pytest_twisted.ensureDeferred
async def test_renew_extends_only_the_owners_leases(
    open_queue: OpenQueue, clock: task.Clock
) -> None:
    queue = await open_queue()
    await queue.enqueue([envelope(1), envelope(2)])
    (a,) = await queue.claim("a", 1, lease=30)
    (b,) = await queue.claim("b", 1, lease=30)
    clock.advance(20)
    assert await queue.renew("a", 30) == 1
    assert await queue.renew("nobody", 30) == 0
    clock.advance(20)  # T0+40: b's lease (to T0+30) lapsed, a's (to T0+50) did not
    (taken,) = await queue.claim("c", 5, lease=30)
    assert taken.id == b.id
    clock.advance(10)
    (late,) = await queue.claim("c", 5, lease=30)
    assert late.id == a.id


# Outcomes -----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_message_partly_accepted_is_retried_for_the_rest_only(
    open_queue: OpenQueue, clock: task.Clock
) -> None:
    queue = await open_queue()
    await queue.enqueue([envelope(1, "ok@example.org", "bad@example.org", "slow@example.org")])
    (claimed,) = await queue.claim("a", 5, lease=30)
    outcome = Outcome(
        id=claimed.id,
        fence=claimed.fence,
        state="deferred",
        attempts=1,
        retry_in=10,
        code=451,
        response="slow@example.org: busy",
        recipients=(
            (0, "sent", 250, "ok"),
            (1, "failed", 550, "no such user"),
            (2, "pending", 451, "busy"),
        ),
    )
    assert await queue.record("a", outcome) is True
    (row,) = await queue.unsent()
    assert (row.state, row.attempts, row.code, row.due) == ("deferred", 1, 451, T0 + 10)
    assert row.response == "slow@example.org: busy"
    assert row.recipients == (
        "ok@example.org sent, bad@example.org failed, slow@example.org pending"
    )
    clock.advance(9)
    assert await queue.claim("b", 5, lease=30) == []
    clock.advance(1)
    (later,) = await queue.claim("b", 5, lease=30)
    assert [str(r) for r in later.envelope.recipients] == ["slow@example.org"]
    assert later.positions == (2,)
    assert later.attempts == 1
    assert later.refused_before == ("bad@example.org", 550, "no such user")


@pytest_twisted.ensureDeferred
async def test_an_outcome_without_enhanced_codes_records_none(open_queue: OpenQueue) -> None:
    queue = await open_queue()
    (id_,) = await queue.enqueue([envelope(1, "a@example.org", "b@example.org")])
    (claimed,) = await queue.claim("w", 1, lease=30)
    outcome = Outcome(
        id=claimed.id,
        fence=claimed.fence,
        state="deferred",
        attempts=1,
        retry_in=10,
        code=451,
        response="busy",
        recipients=((0, "pending", 451, "busy"), (1, "pending", 451, "busy")),
        enhanced=("4.2.1",),  # fewer codes than recipients: the rest have none
    )
    assert await queue.record("w", outcome)
    shown = await queue.message(id_)
    assert [r.enhanced for r in shown.recipients] == ["4.2.1", None]


@pytest_twisted.ensureDeferred
async def test_failed_keeps_its_reason_and_sent_keeps_its_record(open_queue: OpenQueue) -> None:
    queue = await open_queue()
    failing, sending = await queue.enqueue([envelope(1), envelope(2)])
    one, two = await queue.claim("a", 5, lease=30)
    refused = Outcome(
        id=one.id,
        fence=one.fence,
        state="failed",
        attempts=1,
        code=554,
        response="user1@example.org: 5.7.1 spam",
        recipients=((0, "failed", 554, "5.7.1 spam"),),
    )
    assert await queue.record("a", refused) is True
    assert await queue.record("a", sent(two)) is True
    summary = await queue.summary()
    assert {k: v for k, v in summary.counts.items() if v} == {"failed": 1, "sent": 1}
    assert summary.waiting == 0
    (row,) = await queue.unsent()
    assert (row.id, row.message_id, row.state, row.code) == (failing, "<m1@test>", "failed", 554)
    assert row.response == "user1@example.org: 5.7.1 spam"
    assert row.recipients == "user1@example.org failed"
    # Settled: neither comes back, and nothing is waiting.
    assert await queue.claim("b", 5, lease=30) == []
    assert await queue.next_due() is None
    assert sending not in [r.id for r in await queue.unsent()]


@pytest_twisted.ensureDeferred
async def test_unsent_lists_by_id_up_to_the_limit(open_queue: OpenQueue) -> None:
    queue = await open_queue()
    ids = await queue.enqueue([envelope(n) for n in range(5)])
    assert [r.id for r in await queue.unsent(3)] == ids[:3]
    assert [r.state for r in await queue.unsent()] == ["queued"] * 5


@pytest_twisted.ensureDeferred
async def test_unsent_shows_a_suppressed_recipient_as_suppressed(open_queue: OpenQueue) -> None:
    queue = await open_queue()
    (id_,) = await queue.enqueue([envelope(1, "a@example.org", "b@example.org")])
    (claimed,) = await queue.claim("w", 1, lease=30)
    gone = suppressed_reply(Suppression("b@example.org", HARD_BOUNCE))
    outcome = Outcome(
        id=id_,
        fence=claimed.fence,
        state="failed",
        attempts=1,
        code=550,
        response="no",
        recipients=(
            (0, "failed", 550, "suppressed: but a server said so"),
            (1, "failed", None, gone),
        ),
    )
    assert await queue.record("w", outcome)
    (row,) = await queue.unsent()
    assert row.recipients == "a@example.org failed, b@example.org suppressed"


# Next due -------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_next_due_says_how_long_a_worker_may_sleep(
    open_queue: OpenQueue, clock: task.Clock
) -> None:
    queue = await open_queue()
    assert await queue.next_due() is None  # nothing waits
    await queue.enqueue([envelope(1)])
    assert await queue.next_due() == 0.0  # due now
    (claimed,) = await queue.claim("a", 5, lease=30)
    assert await queue.next_due() == 30.0  # the lease's end
    clock.advance(10)
    assert await queue.next_due() == 20.0
    assert await queue.record("a", deferred(claimed, 60)) is True
    assert await queue.next_due() == 60.0  # the retry
    await queue.enqueue([envelope(2)])
    assert await queue.next_due() == 0.0
    (second,) = await queue.claim("a", 5, lease=100)
    assert await queue.next_due() == 60.0  # the earlier of a retry and a lease
    clock.advance(200)  # both overdue: still 0, never negative
    assert await queue.next_due() == 0.0
    summary = await queue.summary()
    assert (summary.due, summary.expired) == (1, 1)
    assert {c.id for c in await queue.claim("b", 5, lease=30)} == {claimed.id, second.id}


# Ages (the relay's metrics and --max-age) ---------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_queued_at_and_oldest_waiting_tell_ages_on_the_stores_clock(
    open_queue: OpenQueue, clock: task.Clock
) -> None:
    queue = await open_queue()
    assert await queue.oldest_waiting() is None
    (first,) = await queue.enqueue([envelope(1)])
    clock.advance(30)
    (second,) = await queue.enqueue([envelope(2)])
    assert await queue.queued_at(first) == T0
    assert await queue.queued_at(second) == T0 + 30
    assert await queue.queued_at(second + 1000) is None
    assert await queue.oldest_waiting() == T0
    claimed = await queue.claim("a", 1, lease=60)  # sending still waits
    assert await queue.oldest_waiting() == T0
    assert await queue.record("a", sent(claimed[0])) is True
    assert await queue.oldest_waiting() == T0 + 30
    (last,) = await queue.claim("a", 1, lease=60)
    assert await queue.record("a", sent(last)) is True
    assert await queue.oldest_waiting() is None
    assert await queue.queued_at(first) == T0  # kept once sent


# Closing --------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_close_is_idempotent_and_refuses_later_calls(open_queue: OpenQueue) -> None:
    queue = await open_queue()
    await queue.enqueue([envelope(1)])
    await queue.close()
    await queue.close()
    calls = [
        lambda: queue.enqueue([envelope(2)]),
        lambda: queue.claim("a", 5, lease=30),
        lambda: queue.renew("a", 30),
        lambda: queue.next_due(),
        lambda: queue.summary(),
        lambda: queue.unsent(),
        lambda: queue.enqueue_once("t", "k", "f", envelope(3)),
        lambda: queue.message(1),
        lambda: queue.messages(),
        lambda: queue.retry(1),
        lambda: queue.cancel(1, "x"),
    ]
    for call in calls:
        with pytest.raises(QueueError):
            await call()


@pytest_twisted.ensureDeferred
async def test_a_repeated_key_queues_once_and_a_changed_body_conflicts(
    open_queue: OpenQueue,
) -> None:
    queue = await open_queue()
    first = await queue.enqueue_once("app", "key-1", "body-a", envelope(1))
    assert first.outcome == "queued"
    assert first.message_id == "<m1@test>"
    again = await queue.enqueue_once("app", "key-1", "body-a", envelope(2))
    assert (again.id, again.message_id, again.outcome) == (first.id, "<m1@test>", "repeat")
    other = await queue.enqueue_once("app", "key-1", "body-b", envelope(3))
    assert (other.id, other.outcome) == (first.id, "conflict")
    claimed = await queue.claim("w", 10, lease=30)
    assert [c.envelope.message_id for c in claimed] == ["<m1@test>"]


@pytest_twisted.ensureDeferred
async def test_keys_are_scoped_and_kept_for_their_time(
    open_queue: OpenQueue, clock: task.Clock
) -> None:
    queue = await open_queue()
    a = await queue.enqueue_once("app", "k", "f", envelope(1))
    b = await queue.enqueue_once("crm", "k", "f", envelope(2))
    assert (a.outcome, b.outcome) == ("queued", "queued")
    assert a.id != b.id
    clock.advance(86400)  # exactly the time kept: still known
    assert (await queue.enqueue_once("app", "k", "f", envelope(3))).outcome == "repeat"
    clock.advance(1)
    later = await queue.enqueue_once("app", "k", "f", envelope(4))
    assert later.outcome == "queued"
    assert later.id not in (a.id, b.id)
    shorter = await queue.enqueue_once("crm", "k", "f", envelope(5), keep=3600)
    assert shorter.outcome == "queued"
    assert (await queue.summary()).counts["queued"] == 4


def refused(claimed: ClaimedMessage) -> Outcome:
    """The first recipient of ``claimed`` accepted (2.0.0), the others refused for good
    (5.1.1)."""
    return Outcome(
        id=claimed.id,
        fence=claimed.fence,
        state="failed",
        attempts=claimed.attempts + 1,
        code=550,
        response="no such user",
        recipients=tuple(
            (p, "sent", 250, "ok") if i == 0 else (p, "failed", 550, "no such user")
            for i, p in enumerate(claimed.positions)
        ),
        enhanced=tuple("2.0.0" if i == 0 else "5.1.1" for i in range(len(claimed.positions))),
    )


@pytest_twisted.ensureDeferred
async def test_message_tells_state_times_and_each_recipients_reply(
    open_queue: OpenQueue, clock: task.Clock
) -> None:
    queue = await open_queue()
    (id_,) = await queue.enqueue([envelope(1, "a@example.org", "b@example.org")])
    fresh = await queue.message(id_)
    assert (fresh.state, fresh.attempts, fresh.created_at, fresh.updated_at) == (
        "queued",
        0,
        T0,
        T0,
    )
    assert fresh.message_id == "<m1@test>"
    assert fresh.sender == "sender@example.com"
    assert [(r.address, r.state, r.code, r.enhanced) for r in fresh.recipients] == [
        ("a@example.org", "pending", None, None),
        ("b@example.org", "pending", None, None),
    ]
    clock.advance(5)
    (claimed,) = await queue.claim("w", 1, lease=30)
    assert await queue.record("w", refused(claimed))
    done = await queue.message(id_)
    assert (done.state, done.attempts, done.code, done.updated_at) == ("failed", 1, 550, T0 + 5)
    assert [(r.state, r.code, r.enhanced, r.response) for r in done.recipients] == [
        ("sent", 250, "2.0.0", "ok"),
        ("failed", 550, "5.1.1", "no such user"),
    ]
    assert await queue.message(id_ + 100) is None


@pytest_twisted.ensureDeferred
async def test_messages_pages_by_id_with_a_stable_cursor(open_queue: OpenQueue) -> None:
    queue = await open_queue()
    ids = await queue.enqueue([envelope(n) for n in range(5)])
    (claimed, *_) = await queue.claim("w", 1, lease=30)
    assert await queue.record("w", refused(claimed))  # one recipient: failed
    first = await queue.messages(limit=2)
    assert [m.id for m in first] == ids[:2]
    await queue.enqueue([envelope(9)])  # added while paging: on a later page
    second = await queue.messages(after=first[-1].id, limit=2)
    assert [m.id for m in second] == ids[2:4]
    rest = await queue.messages(after=second[-1].id, limit=10)
    assert len(rest) == 2
    assert rest[0].id == ids[4]
    failed = await queue.messages("failed")
    assert [m.id for m in failed] == [claimed.id]
    assert [r.enhanced for r in failed[0].recipients] == ["2.0.0"]
    assert [m.id for m in await queue.messages("queued", limit=100)] == [*ids[1:], rest[1].id]


@pytest_twisted.ensureDeferred
async def test_overview_counts_the_oldest_waiting_and_the_latest_failures_first(
    open_queue: OpenQueue, clock: task.Clock
) -> None:
    queue = await open_queue()
    empty = await queue.overview()
    assert (sum(empty.counts.values()), empty.oldest, empty.failures) == (0, None, [])
    ids = []
    for n in range(5):
        ids += await queue.enqueue([envelope(n)])
        clock.advance(1)
    claimed = {c.id: c for c in await queue.claim("w", 5, lease=30)}
    # The first three fail, one at a time, the second one last.
    for id_ in (ids[0], ids[2], ids[1]):
        assert await queue.record("w", refused(claimed.pop(id_)))
        clock.advance(1)
    assert await queue.release("w", list(claimed.values())) == 2
    view = await queue.overview(failures=2)
    assert {k: v for k, v in view.counts.items() if v} == {"failed": 3, "queued": 2}
    assert [m.id for m in view.failures] == [ids[1], ids[2]]
    assert view.failures[0].recipients[0].enhanced == "2.0.0"
    assert view.oldest is not None
    assert (view.oldest.id, view.oldest.created_at) == (ids[3], T0 + 3)


@pytest_twisted.ensureDeferred
async def test_retry_puts_a_failed_message_back_for_its_failed_recipients(
    open_queue: OpenQueue, clock: task.Clock
) -> None:
    queue = await open_queue()
    (id_,) = await queue.enqueue([envelope(1, "a@example.org", "b@example.org")])
    assert await queue.retry(id_) == "queued"  # not failed: nothing changed
    assert await queue.retry(id_ + 100) == "missing"
    (claimed,) = await queue.claim("w", 1, lease=30)
    assert await queue.retry(id_) == "sending"
    assert await queue.record("w", refused(claimed))
    clock.advance(60)
    assert await queue.retry(id_) == "retried"
    back = await queue.message(id_)
    assert (back.state, back.attempts, back.due) == ("queued", 0, T0 + 60)
    # The failed recipient's reply is forgotten; the accepted one's is kept.
    assert [(r.state, r.code, r.enhanced) for r in back.recipients] == [
        ("sent", 250, "2.0.0"),
        ("pending", None, None),
    ]
    (again,) = await queue.claim("w", 1, lease=30)
    assert [str(r) for r in again.envelope.recipients] == ["b@example.org"]


@pytest_twisted.ensureDeferred
async def test_cancel_fails_a_waiting_message_but_not_one_being_sent(
    open_queue: OpenQueue,
) -> None:
    queue = await open_queue()
    first, second, third = await queue.enqueue([envelope(n) for n in range(3)])
    assert await queue.cancel(first, "cancelled by the API") == "cancelled"
    gone = await queue.message(first)
    assert (gone.state, gone.response) == ("failed", "cancelled by the API")
    assert [(r.state, r.response) for r in gone.recipients] == [("failed", "cancelled by the API")]
    assert await queue.cancel(first, "again") == "failed"
    claimed = await queue.claim("w", 1, lease=30)
    assert [c.id for c in claimed] == [second]
    assert await queue.cancel(second, "x") == "sending"
    assert await queue.record("w", sent(claimed[0]))
    assert await queue.cancel(second, "x") == "sent"
    assert await queue.cancel(third + 100, "x") == "missing"
    remaining = await queue.claim("w", 10, lease=30)
    assert [c.id for c in remaining] == [third]  # the cancelled one is never claimed


@pytest_twisted.ensureDeferred
async def test_a_bounce_fails_a_delivered_recipient_or_records_a_delay(
    open_queue: OpenQueue, clock: task.Clock
) -> None:
    queue = await open_queue()
    rcpts = ("a@example.org", "b@example.org", "c@example.org")
    (id_,) = await queue.enqueue([envelope(1, *rcpts)])
    (claimed,) = await queue.claim("w", 1, lease=30)
    # a and b accepted, c refused at RCPT.
    outcome = Outcome(
        id=claimed.id,
        fence=claimed.fence,
        state="failed",
        attempts=1,
        code=550,
        response="no",
        recipients=((0, "sent", 250, "ok"), (1, "sent", 250, "ok"), (2, "failed", 550, "no")),
        enhanced=("2.0.0", "2.0.0", "5.1.1"),
    )
    assert await queue.record("w", outcome)
    clock.advance(60)
    hard = await queue.bounce(
        id_, 0, failed=True, code=550, response="bounced: gone", enhanced="5.1.1"
    )
    assert hard == "a@example.org"
    clock.advance(60)
    soft = await queue.bounce(id_, 1, failed=False, code=None, response="delayed: busy")
    assert soft == "b@example.org"
    back = await queue.message(id_)
    assert back.updated_at == T0 + 120
    assert [(r.state, r.code, r.enhanced, r.response) for r in back.recipients] == [
        ("failed", 550, "5.1.1", "bounced: gone"),
        ("sent", 250, "2.0.0", "delayed: busy"),
        ("failed", 550, "5.1.1", "no"),
    ]
    # A recipient that was never delivered, or a bounce told twice, changes nothing more.
    clock.advance(60)
    assert await queue.bounce(id_, 2, failed=True, code=554, response="x") == "c@example.org"
    assert await queue.bounce(id_, 0, failed=True, code=554, response="y") == "a@example.org"
    again = await queue.message(id_)
    assert (again.updated_at, again.recipients) == (back.updated_at, back.recipients)
    assert await queue.bounce(id_, 3, failed=True, code=550, response="z") is None
    assert await queue.bounce(id_ + 100, 0, failed=True, code=550, response="z") is None


# CSV campaigns: stored once, each row rendered in the sandbox when claimed -------------------

CAMPAIGN_TEMPLATE = """\
From: News <news@example.com>
To: {{ name|mailbox(email) }}
Subject: Hello {{ name }}

Dear {{ name }}, your code is {{ code }}.
"""
CAMPAIGN_COLUMNS = ("email", "name", "code")


def spec(text: str = CAMPAIGN_TEMPLATE) -> CampaignSpec:
    return CampaignSpec(
        text, "message.txt", CAMPAIGN_COLUMNS, None, hashlib.sha256(text.encode()).hexdigest()
    )


def to_send(
    campaign: str,
    number: int,
    email: str,
    name: str,
    code: str,
    text: str = CAMPAIGN_TEMPLATE,
    files: dict[str, bytes] | None = None,
) -> CampaignRow:
    """Row ``number`` to send, its envelope rendered as ``twistmail send`` renders it."""
    cells = {"email": email, "name": name, "code": code}
    template = MessageTemplate(text, sandboxed=True, attachments=StoredAttachments(files or {}))
    template.check_columns(CAMPAIGN_COLUMNS)
    key = row_id(email)
    prepared = prepare_row(
        template,
        Row(number, cells),
        lambda key, domain: campaign_message_id(campaign, key, domain),
        None,
        key,
    )
    assert isinstance(prepared, Prepared), prepared
    return CampaignRow(key, number, email, "queued", 7, envelope=prepared.envelope, cells=cells)


@pytest_twisted.ensureDeferred
async def test_a_campaign_is_made_once_and_refuses_another_template(
    open_queue: OpenQueue,
) -> None:
    queue = await open_queue()
    first = await queue.campaign_open("spring", spec())
    again = await queue.campaign_open("spring", spec())
    assert (again.id, again.name, again.spec) == (first.id, "spring", spec())
    assert (await queue.campaign(first.id)).name == "spring"
    assert await queue.campaign("autumn") is None
    with pytest.raises(CampaignChanged, match="another template"):
        await queue.campaign_open("spring", spec(CAMPAIGN_TEMPLATE + "P.S.\n"))
    other = await queue.campaign_open("autumn", spec())
    assert other.id != first.id


@pytest_twisted.ensureDeferred
async def test_a_claim_renders_the_row_with_its_message_id(
    open_queue: OpenQueue, clock: task.Clock
) -> None:
    queue = await open_queue()
    campaign = await queue.campaign_open("spring", spec())
    rows = [
        to_send(campaign.id, 1, "ann@example.org", "Ann", "A1"),
        to_send(campaign.id, 2, "bob@example.org", "Bob", "B2"),
    ]
    assert await queue.campaign_add(campaign.id, rows, {}) == 2
    claimed = await queue.claim("w", 10, lease=60)
    assert len(claimed) == 2
    for claim, row in zip(claimed, rows, strict=True):
        env = claim.envelope
        expected_id = campaign_message_id(campaign.id, row.id, "example.com")
        assert env.message_id == expected_id
        assert f"Message-ID: {expected_id}".encode() in env.payload
        assert f"your code is {row.cells['code']}".encode() in env.payload  # type: ignore[index]
        assert [str(r) for r in env.recipients] == [row.email]
        assert env.payload.endswith(b"\r\n.\r\n")
        assert env.size == len(env.payload) - 3  # as rendered, before the final dot
    status = (await queue.campaign_status("spring"))[0]
    assert status.counts == {"pending": 2}
    await queue.record("w", sent(claimed[0]))
    status = (await queue.campaign_status())[0]
    assert status.counts == {"pending": 1, "sent": 1}
    assert (status.recent, status.rate, status.eta) == (1, 1 / 60, 60.0)
    clock.advance(61)
    later = (await queue.campaign_status())[0]
    assert (later.recent, later.eta) == (0, None)
    assert [line[1] for line in status.unsent] == ["bob@example.org"]
    lines, after = await queue.campaign_report(campaign.id)
    assert [(line[0], line[1], line[2], line[3]) for line in lines] == [
        (1, "ann@example.org", "sent", 250),
        (2, "bob@example.org", "pending", None),
    ]
    assert lines[0][6] == campaign_message_id(campaign.id, rows[0].id, "example.com")
    assert await queue.campaign_report(campaign.id, after) == ([], after)


@pytest_twisted.ensureDeferred
async def test_a_row_on_its_way_or_sent_is_not_queued_again(open_queue: OpenQueue) -> None:
    queue = await open_queue()
    campaign = await queue.campaign_open("spring", spec())
    ann = to_send(campaign.id, 1, "ann@example.org", "Ann", "A1")
    assert await queue.campaign_add(campaign.id, [ann], {}) == 1
    assert await queue.campaign_add(campaign.id, [ann], {}) == 0  # queued: left alone
    (claim,) = await queue.claim("w", 10, lease=60)
    await queue.record("w", sent(claim))
    assert await queue.campaign_add(campaign.id, [ann], {}) == 0  # sent: left alone
    known = await queue.campaign_lookup(campaign.id, [ann.id, row_id("nobody@example.org")])
    assert known == {ann.id: (1, "sent", 7, 0)}
    assert await queue.claim("w", 10, lease=60) == []


@pytest_twisted.ensureDeferred
async def test_invalid_and_duplicate_rows_are_kept_until_forgotten(open_queue: OpenQueue) -> None:
    queue = await open_queue()
    campaign = await queue.campaign_open("spring", spec())
    ann = to_send(campaign.id, 1, "ann@example.org", "Ann", "A1")
    bad = CampaignRow(row_id("#2"), 2, "", "invalid", None, "row 2: To: no address")
    dup = CampaignRow(row_id("#3"), 3, "ann@example.org", "duplicate", None, "an earlier row")
    await queue.campaign_add(campaign.id, [ann, bad, dup], {})
    moved = CampaignRow(ann.id, 5, "ann@example.org", "seen", 7, changed=True)
    await queue.campaign_add(campaign.id, [moved], {})
    status = (await queue.campaign_status("spring"))[0]
    assert status.counts == {"pending": 1, "invalid": 1, "duplicate": 1}
    assert status.changed == 1
    lines, _ = await queue.campaign_report(campaign.id)
    assert [(line[0], line[2], line[4], line[7]) for line in lines] == [
        (2, "invalid", "row 2: To: no address", ""),
        (3, "duplicate", "an earlier row", ""),
        (5, "pending", "", "yes"),
    ]
    assert await queue.campaign_forget(campaign.id) == 2
    assert (await queue.campaign_status("spring"))[0].counts == {"pending": 1}


@pytest_twisted.ensureDeferred
async def test_attachments_come_from_the_campaigns_files_never_a_path(
    open_queue: OpenQueue,
) -> None:
    queue = await open_queue()
    text = CAMPAIGN_TEMPLATE.replace("Subject:", "Attachment: terms.pdf\nSubject:")
    pdf = b"%PDF-1.4 the terms"
    campaign = await queue.campaign_open("spring", spec(text))
    ann = to_send(
        campaign.id, 1, "ann@example.org", "Ann", "A1", text=text, files={"terms.pdf": pdf}
    )
    await queue.campaign_add(campaign.id, [ann], {"terms.pdf": pdf})
    (claim,) = await queue.claim("w", 10, lease=60)
    assert base64.b64encode(pdf) in claim.envelope.payload
    assert b'filename="terms.pdf"' in claim.envelope.payload

    # A template naming a file that was not uploaded fails its rows when claimed.
    other = await queue.campaign_open("summer", spec(text))
    bob = to_send(other.id, 1, "bob@example.org", "Bob", "B1", text=text, files={"terms.pdf": pdf})
    await queue.campaign_add(other.id, [bob], {})
    assert await queue.claim("w", 10, lease=60) == []
    lines, _ = await queue.campaign_report(other.id)
    assert lines[0][2] == "failed"
    assert "'terms.pdf' was not uploaded with the campaign" in lines[0][4]


@pytest_twisted.ensureDeferred
async def test_a_stored_template_renders_in_the_sandbox(open_queue: OpenQueue) -> None:
    queue = await open_queue()
    # Harmless outside the sandbox (it renders a class's name); refused inside it.
    text = CAMPAIGN_TEMPLATE + "{{ name.__class__.__mro__[1].__subclasses__()|length }}\n"
    campaign = await queue.campaign_open("spring", spec(text))
    unsafe = to_send(
        campaign.id, 1, "ann@example.org", "Ann", "A1"
    )  # rendered as the plain template
    await queue.campaign_add(campaign.id, [unsafe], {})
    assert await queue.claim("w", 10, lease=60) == []
    lines, _ = await queue.campaign_report(campaign.id)
    assert lines[0][2] == "failed"
    assert "unsafe" in lines[0][4] or "not safely" in lines[0][4]
