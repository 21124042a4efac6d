"""What the PostgreSQL queue does beyond the contract: its schema's versions, the database's
clock, LISTEN/NOTIFY wake-ups, and lost connections (through a proxy that cuts them)."""

from __future__ import annotations

import collections
import itertools
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import postgres_server
import psycopg
import pytest
import pytest_twisted
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from tcp_proxy import CuttingProxy
from twisted.internet import defer, reactor, task

from twistmail import Mailer
from twistmail.message import Envelope, envelope_from_bytes
from twistmail.queue import Drain, QueueError
from twistmail.queue._postgres_db import _prepare
from twistmail.queue._postgres_status import cancel_message, insert_once, retry_message
from twistmail.queue.postgres import SCHEMA_VERSION, PostgresQueue
from twistmail.queue.url import open_queue, parse_queue_url
from twistmail.retry import RetryPolicy
from twistmail.testing import CaptureServer

_T = TypeVar("_T")


@pytest.fixture
def schema() -> Iterator[str]:
    """A PostgreSQL schema of this test's own, dropped after it."""
    postgres_server.require()
    name = postgres_server.new_schema()
    yield name
    postgres_server.drop_schema(name)


def execute(schema: str, text: str) -> list[tuple[object, ...]]:
    with psycopg.connect(postgres_server.URL, autocommit=True) as conn:
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        cursor = conn.execute(text)  # type: ignore[arg-type]
        return cursor.fetchall() if cursor.description else []


def envelope(n: int) -> Envelope:
    data = f"Message-ID: <m{n}@test>\r\nSubject: {n}\r\n\r\nbody {n}\r\n".encode()
    return envelope_from_bytes("shop@example.com", [f"user{n}@example.org"], data)


# URLs -----------------------------------------------------------------------------------------


def test_queue_urls() -> None:
    assert parse_queue_url("sqlite:/var/q.db") == parse_queue_url("sqlite:/var/q.db")
    assert parse_queue_url("sqlite:q.db").target == "q.db"
    parsed = parse_queue_url("postgresql://mail@db:5433/mail?schema=tm&sslmode=require")
    assert (parsed.kind, parsed.schema) == ("postgresql", "tm")
    assert parsed.target == "postgresql://mail@db:5433/mail?sslmode=require"
    assert parse_queue_url("postgres://db/mail").schema == "twistmail"
    for bad in ("queue.db", "sqlite:", "mysql://db/x", "postgresql://db/x?schema=a;b"):
        with pytest.raises(ValueError, match=r"expected"):
            parse_queue_url(bad)
    with pytest.raises(ValueError, match=r"expected") as info:
        parse_queue_url("http://alice:s3cret@db/x")
    assert "s3cret" not in str(info.value)


@pytest_twisted.ensureDeferred
async def test_an_unreachable_server_is_named_without_its_password() -> None:
    port = reactor.listenTCP(0, CuttingProxy("127.0.0.1", 1), interface="127.0.0.1")
    free = port.getHost().port
    await port.stopListening()  # nothing listens there now
    with pytest.raises(QueueError) as info:
        await open_queue(f"postgresql://alice:s3cret@127.0.0.1:{free}/test", reactor=reactor)
    assert f"postgresql://alice@127.0.0.1:{free}/test" in str(info.value)
    assert "s3cret" not in str(info.value)


# Schema versions ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_schema_is_created_once_and_a_newer_one_refused(schema: str) -> None:
    url = postgres_server.URL
    first, second = await defer.gatherResults(
        [PostgresQueue.open(url, schema=schema), PostgresQueue.open(url, schema=schema)]
    )
    await first.enqueue([envelope(1)])
    await defer.gatherResults([first.close(), second.close()])
    assert execute(schema, "SELECT value FROM meta WHERE key = 'schema_version'") == [
        (SCHEMA_VERSION,)
    ]
    execute(schema, "UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(QueueError, match=r"schema version '99'.*upgrade twistmail"):
        await PostgresQueue.open(url, schema=schema)
    execute(schema, "UPDATE meta SET value = 'other' WHERE key = 'kind'")
    with pytest.raises(QueueError, match=r"not a queue"):
        await PostgresQueue.open(url, schema=schema)


# The database's clock -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_leases_and_due_times_are_on_the_database_clock(schema: str) -> None:
    queue = await PostgresQueue.open(postgres_server.URL, schema=schema)
    try:
        await queue.enqueue([envelope(1)])
        assert len(await queue.claim("a", 5, lease=600)) == 1
        ((lease_until, server_now),) = execute(
            schema, "SELECT lease_until, extract(epoch from now())::float8 FROM messages"
        )
        assert abs(float(lease_until) - 600 - float(server_now)) < 5  # type: ignore[arg-type]
        delay = await queue.next_due()
        assert delay is not None
        assert 590 < delay <= 600
    finally:
        await queue.close()


# Durable enqueues, committed in groups -------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_commits_are_durable_even_where_synchronous_commit_is_off(schema: str) -> None:
    # The role or server may turn synchronous_commit off; the queue turns it back on, since a
    # relay answers 250 on an enqueue's commit.
    url = f"{postgres_server.URL}?options=-c%20synchronous_commit%3Doff"
    queue = await PostgresQueue.open(url, schema=schema)
    try:
        assert await queue.settings() == "on"
    finally:
        await queue.close()
    local = f"{postgres_server.URL}?options=-c%20synchronous_commit%3Dlocal"
    queue = await PostgresQueue.open(local, schema=schema)
    try:
        assert await queue.settings() == "local"  # durable already: kept
    finally:
        await queue.close()


@pytest_twisted.ensureDeferred
async def test_enqueues_asked_for_together_share_a_transaction(schema: str) -> None:
    queue = await PostgresQueue.open(postgres_server.URL, schema=schema)
    try:
        asked = [queue.enqueue([envelope(n), envelope(n + 1000)]) for n in range(50)]
        ids = await defer.gatherResults(asked)
        assert queue.commits < 50  # the first alone, the rest in a few groups
        assert all(len(pair) == 2 for pair in ids)
        flat = [i for pair in ids for i in pair]
        assert flat == sorted(flat)  # each caller's ids, in the order asked
        rows = dict(execute(schema, "SELECT id, message_id FROM messages"))
        assert [rows[a] for a, _ in ids] == [f"<m{n}@test>" for n in range(50)]
        assert [rows[b] for _, b in ids] == [f"<m{n + 1000}@test>" for n in range(50)]
    finally:
        await queue.close()


# The shared rate's schedule -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_slots_reserved_by_many_workers_at_once_never_overlap(schema: str) -> None:
    queues = [await PostgresQueue.open(postgres_server.URL, schema=schema) for _ in range(3)]
    try:
        asked = [q.reserve_slots("rate", 4, 0.1) for q in queues for _ in range(5)]
        answers = await defer.gatherResults(asked)
        firsts = sorted(first for first, _ in answers)
        # 15 reservations of 4 slots 0.1 s apart: each starts where another ended.
        assert all(abs(b - a - 0.4) < 1e-6 for a, b in itertools.pairwise(firsts))
        ((server_now,),) = execute(schema, "SELECT extract(epoch from now())::float8")
        assert abs(firsts[0] - float(server_now)) < 5  # type: ignore[arg-type]
        assert all(abs(now - firsts[0]) < 5 for _, now in answers)  # the database's clock
    finally:
        await defer.gatherResults([q.close() for q in queues])


@pytest_twisted.ensureDeferred
async def test_domain_slots_are_capped_for_all_holders_and_a_dead_ones_expire(
    schema: str,
) -> None:
    clock = task.Clock()
    clock.advance(1_700_000_000)
    queue = await PostgresQueue.open(postgres_server.URL, schema=schema, clock=clock.seconds)
    try:
        take = queue.take_domain_slots
        assert await take("a", "x.org", 2, cap=3, lease=60) == 2
        assert await take("b", "x.org", 5, cap=3, lease=60) == 1  # the cap is for all
        assert await take("b", "y.org", 5, cap=3, lease=60) == 3  # per domain
        assert await take("c", "x.org", 1, cap=3, lease=60) == 0
        assert await queue.give_domain_slots("a", "x.org", 1) == 1
        assert await take("c", "x.org", 2, cap=3, lease=60) == 1
        clock.advance(40)
        assert await queue.renew_domain_slots("c", 60) == 1  # c lives on; a and b die
        clock.advance(30)
        assert await take("d", "x.org", 5, cap=3, lease=60) == 2  # a's and b's expired
    finally:
        await queue.close()


# Wake-ups -------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_notified_fires_on_an_enqueue_by_another_process(schema: str) -> None:
    queue = await PostgresQueue.open(postgres_server.URL, schema=schema)
    other = await PostgresQueue.open(postgres_server.URL, schema=schema)
    try:
        waiting = queue.notified()
        await task.deferLater(reactor, 0.5, lambda: None)  # listening by then
        heard = []
        waiting.addCallback(heard.append)
        # (an empty first wake-up may come once LISTEN is set up: take the next one)
        if heard:
            heard.clear()
            waiting = queue.notified()
            waiting.addCallback(heard.append)
        assert heard == []
        await other.enqueue([envelope(1)])
        await waiting
        assert heard == [None]
    finally:
        await defer.gatherResults([queue.close(), other.close()])


# Lost connections -----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_cut_connections_are_retried_nothing_lost_nothing_reported_sent_twice(
    schema: str, capture_server: object
) -> None:
    server: CaptureServer = capture_server()  # type: ignore[operator]
    info = conninfo_to_dict(postgres_server.URL)
    proxy = CuttingProxy(str(info.get("host", "127.0.0.1")), int(info.get("port", 5432)))
    url = make_conninfo(postgres_server.URL, host="127.0.0.1", port=proxy.listen())
    queue = await PostgresQueue.open(url, schema=schema, connect_timeout=2)
    mailer = Mailer(f"smtp://127.0.0.1:{server.port}", concurrency=4, max_attempts=1)
    cutter = task.LoopingCall(proxy.cut)
    n = 400
    try:
        cutter.start(0.15, now=False)
        ids = []
        for start in range(0, n, 5):
            ids += await queue.enqueue([envelope(i) for i in range(start, start + 5)])
        report = await Drain(queue, mailer, retry=RetryPolicy(), batch=20).run()
    finally:
        if cutter.running:
            cutter.stop()
        await mailer.close()
        await queue.close()
        await proxy.stop()
    assert proxy.cuts > 0
    assert queue.retries > 0
    # Each enqueue stored once, whatever the cuts: n ids, n rows.
    assert len(set(ids)) == n
    assert execute(schema, "SELECT count(*) FROM messages") == [(n,)]
    delivered = collections.Counter(tuple(m.recipients) for m in server.messages)
    assert set(delivered) == {(f"user{i}@example.org".encode(),) for i in range(n)}
    assert execute(schema, "SELECT state, count(*) FROM messages GROUP BY state") == [("sent", n)]
    # What the drain reports sent is what the database holds as sent, no more.
    assert report.sent == n
    assert report.lost == 0
    assert max(delivered.values()) == 1


@pytest_twisted.ensureDeferred
async def test_keyed_enqueues_through_cut_connections_each_queue_once(schema: str) -> None:
    info = conninfo_to_dict(postgres_server.URL)
    proxy = CuttingProxy(str(info.get("host", "127.0.0.1")), int(info.get("port", 5432)))
    url = make_conninfo(postgres_server.URL, host="127.0.0.1", port=proxy.listen())
    queue = await PostgresQueue.open(url, schema=schema, connect_timeout=2)
    cutter = task.LoopingCall(proxy.cut)
    n = 150
    try:
        cutter.start(0.1, now=False)
        done = []
        for i in range(n):
            done.append(await queue.enqueue_once("app", f"k{i}", "f", envelope(i)))
    finally:
        if cutter.running:
            cutter.stop()
        await queue.close()
        await proxy.stop()
    assert proxy.cuts > 0
    assert queue.retries > 0
    # A try whose commit's answer was lost is told "queued" again, not "repeat" of itself.
    assert {d.outcome for d in done} == {"queued"}
    assert len({d.id for d in done}) == n
    assert execute(schema, "SELECT count(*) FROM messages") == [(n,)]
    assert execute(schema, "SELECT count(*) FROM idempotency") == [(n,)]


def test_changes_tried_again_after_a_lost_commit_report_what_the_first_try_did(
    schema: str,
) -> None:
    # The first try commits; its answer is "lost": the same op runs again with again=True.
    with psycopg.connect(postgres_server.URL, autocommit=True) as conn:
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        _prepare(conn, schema, "test")

        def twice(op: Callable[[psycopg.Connection[Any], float | None, bool], _T]) -> list[_T]:
            results = []
            for again in (False, True):
                with conn.transaction():
                    results.append(op(conn, None, again))
            return results

        token = uuid.uuid4()
        first, second = twice(
            lambda c, now, again: insert_once(
                "app", "k", "f", envelope(1), 86400.0, token, "ch", c, now, again
            )
        )
        assert first == second
        assert first.outcome == "queued"
        assert execute(schema, "SELECT count(*) FROM messages") == [(1,)]
        cancel = uuid.uuid4()
        assert twice(
            lambda c, now, again: cancel_message(first.id, "stop", cancel, c, now, again)
        ) == ["cancelled", "cancelled"]
        retry = uuid.uuid4()
        assert twice(lambda c, now, again: retry_message(first.id, retry, "ch", c, now, again)) == [
            "retried",
            "retried",
        ]
        # Another request, not a try again, is told the state as it is.
        assert retry_message(first.id, uuid.uuid4(), "ch", conn, None, False) == "queued"


@pytest_twisted.ensureDeferred
async def test_one_key_sent_at_once_by_many_workers_queues_once(schema: str) -> None:
    queues = [await PostgresQueue.open(postgres_server.URL, schema=schema) for _ in range(3)]
    try:
        done = await defer.gatherResults(
            [q.enqueue_once("app", "same", "f", envelope(1)) for q in queues for _ in range(4)]
        )
    finally:
        await defer.gatherResults([q.close() for q in queues])
    assert sorted(d.outcome for d in done) == ["queued"] + ["repeat"] * 11
    assert len({d.id for d in done}) == 1
    assert execute(schema, "SELECT count(*) FROM messages") == [(1,)]


@pytest_twisted.ensureDeferred
async def test_a_retry_wakes_idle_workers(schema: str) -> None:
    queue = await PostgresQueue.open(postgres_server.URL, schema=schema)
    other = await PostgresQueue.open(postgres_server.URL, schema=schema)
    try:
        (id_,) = await other.enqueue([envelope(1)])
        assert await other.cancel(id_, "stop") == "cancelled"
        waiting = queue.notified()
        await task.deferLater(reactor, 0.5, lambda: None)  # listening by then
        heard: list[None] = []
        waiting.addCallback(heard.append)
        if heard:  # (an empty first wake-up may come once LISTEN is set up)
            heard.clear()
            waiting = queue.notified()
            waiting.addCallback(heard.append)
        assert heard == []
        assert await other.retry(id_) == "retried"
        await waiting.addTimeout(30, reactor)  # without a NOTIFY: a TimeoutError
        assert heard == [None]
    finally:
        await defer.gatherResults([queue.close(), other.close()])
