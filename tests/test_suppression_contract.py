"""The suppression list contract (``ISuppressionList``): one suite every store passes.

txacme's pattern, as ``test_queue_contract.py``: the ``open_list`` fixture is parametrized over
the stores (SQLite file, SQLite queue file, memory, PostgreSQL queue schema), each on one
injected clock.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import postgres_server
import pytest
import pytest_twisted
from twisted.internet import defer, task
from zope.interface.verify import verifyObject

from twistmail.interfaces import ISuppressionList
from twistmail.queue import SqliteQueue
from twistmail.queue.postgres_suppression import PostgresSuppressionList
from twistmail.suppression import (
    COMPLAINT,
    HARD_BOUNCE,
    MANUAL,
    UNSUBSCRIBED,
    SqliteSuppressionList,
    Suppression,
    SuppressionError,
)
from twistmail.testing import MemorySuppressionList

T0 = 1_700_000_000.0
Clock = Callable[[], float]


async def _sqlite(clock: Clock, directory: Path) -> Any:
    return await SqliteSuppressionList.open(directory / "data" / "suppression.db", clock=clock)


async def _sqlite_queue(clock: Clock, directory: Path) -> Any:
    queue = await SqliteQueue.open(directory / "queue.db")
    await queue.close()
    return await SqliteSuppressionList.open(directory / "queue.db", clock=clock, create=False)


async def _memory(clock: Clock, directory: Path) -> Any:
    return MemorySuppressionList(clock=clock)


def _schema(directory: Path) -> str:
    return f"test_sup_{directory.name.lower()}_{abs(hash(str(directory))) % 10**8}"[:63]


async def _postgresql(clock: Clock, directory: Path) -> Any:
    url = postgres_server.require()
    return await PostgresSuppressionList.open(url, schema=_schema(directory), clock=clock)


STORES: dict[str, Callable[[Clock, Path], Awaitable[Any]]] = {
    "sqlite": _sqlite,
    "sqlite-queue": _sqlite_queue,
    "memory": _memory,
    "postgresql": _postgresql,
}

OpenList = Callable[[], Awaitable[Any]]


@pytest.fixture
def clock() -> task.Clock:
    clock = task.Clock()
    clock.advance(T0)
    return clock


@pytest.fixture(params=sorted(STORES))
def open_list(
    request: pytest.FixtureRequest, clock: task.Clock, tmp_path: Path
) -> Iterator[OpenList]:
    """Factory: ``await open_list()`` opens the store under test; closed after the test."""
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


@pytest_twisted.ensureDeferred
async def test_the_store_provides_the_interface(open_list: OpenList) -> None:
    store = await open_list()
    assert verifyObject(ISuppressionList, store)


@pytest_twisted.ensureDeferred
async def test_an_added_address_is_suppressed_by_its_normalized_form(
    open_list: OpenList, clock: task.Clock
) -> None:
    store = await open_list()
    assert await store.add([Suppression("Ann <ANN@Example.ORG>", HARD_BOUNCE, detail="550 5.1.1")])
    found = await store.check(["ann@example.org", "bob@example.org"])
    assert found == {
        "ann@example.org": Suppression("ann@example.org", HARD_BOUNCE, "", T0, "550 5.1.1")
    }
    # Any spelling of the same mailbox finds it, on any list.
    assert set(await store.check(["ANN@example.org"], "news.example.org")) == {"ann@example.org"}


@pytest_twisted.ensureDeferred
async def test_an_unsubscribe_applies_to_its_list_only(open_list: OpenList) -> None:
    store = await open_list()
    await store.add([Suppression("ann@example.org", UNSUBSCRIBED, "News <news.example.org>")])
    assert await store.check(["ann@example.org"], "news.example.org") != {}
    assert await store.check(["ann@example.org"], "NEWS <News.Example.Org>") != {}
    # Another list, or mail of no list (a password reset), still goes.
    assert await store.check(["ann@example.org"], "offers.example.org") == {}
    assert await store.check(["ann@example.org"]) == {}


@pytest_twisted.ensureDeferred
async def test_hard_bounces_complaints_and_manual_entries_apply_to_all_mail(
    open_list: OpenList,
) -> None:
    store = await open_list()
    await store.add(
        [
            Suppression("a@example.org", HARD_BOUNCE),
            Suppression("b@example.org", COMPLAINT),
            Suppression("c@example.org", MANUAL),
            Suppression("d@example.org", UNSUBSCRIBED),  # no list: from all mail
        ]
    )
    everyone = [f"{x}@example.org" for x in "abcde"]
    for list_id in ("", "news.example.org"):
        assert sorted(await store.check(everyone, list_id)) == everyone[:4]


@pytest_twisted.ensureDeferred
async def test_the_all_mail_entry_wins_when_both_match(open_list: OpenList) -> None:
    store = await open_list()
    await store.add(
        [
            Suppression("a@example.org", UNSUBSCRIBED, "news.example.org"),
            Suppression("a@example.org", HARD_BOUNCE),
        ]
    )
    found = await store.check(["a@example.org"], "news.example.org")
    assert found["a@example.org"].reason == HARD_BOUNCE


@pytest_twisted.ensureDeferred
async def test_adding_again_keeps_the_first_entry_and_counts_only_new_ones(
    open_list: OpenList, clock: task.Clock
) -> None:
    store = await open_list()
    assert await store.add([Suppression("a@example.org", MANUAL, detail="first")]) == 1
    clock.advance(60)
    new = await store.add(
        [Suppression("A@example.org", MANUAL, detail="again"), Suppression("b@example.org", MANUAL)]
    )
    assert new == 1
    (entry, _) = await store.entries()
    assert (entry.detail, entry.created_at) == ("first", T0)


@pytest_twisted.ensureDeferred
async def test_a_given_time_is_kept_for_imports(open_list: OpenList) -> None:
    store = await open_list()
    await store.add([Suppression("a@example.org", COMPLAINT, created_at=1_600_000_000.5)])
    (entry,) = await store.entries()
    assert entry.created_at == 1_600_000_000.5


@pytest_twisted.ensureDeferred
async def test_a_bad_entry_fails_the_call_and_stores_nothing(open_list: OpenList) -> None:
    store = await open_list()
    for bad in (
        Suppression("not an address", MANUAL),
        Suppression("a@example.org", "bored"),  # type: ignore[arg-type]
        Suppression("a@example.org", HARD_BOUNCE, "news.example.org"),
        Suppression("a@example.org", UNSUBSCRIBED, "bad list\r\nid"),
    ):
        with pytest.raises(SuppressionError):
            await store.add([Suppression("ok@example.org", MANUAL), bad])
    assert await store.entries() == []


@pytest_twisted.ensureDeferred
async def test_remove_one_list_or_every_entry(open_list: OpenList) -> None:
    store = await open_list()
    await store.add(
        [
            Suppression("a@example.org", UNSUBSCRIBED, "news.example.org"),
            Suppression("a@example.org", UNSUBSCRIBED, "offers.example.org"),
            Suppression("a@example.org", MANUAL),
            Suppression("b@example.org", MANUAL),
        ]
    )
    assert await store.remove("A@Example.org", "news.example.org") == 1
    assert await store.remove("a@example.org", "news.example.org") == 0
    assert await store.check(["a@example.org"], "offers.example.org") != {}
    assert await store.remove("a@example.org", "") == 1
    assert await store.check(["a@example.org"], "news.example.org") == {}
    assert await store.remove("a@example.org") == 1
    assert [e.address for e in await store.entries()] == ["b@example.org"]


@pytest_twisted.ensureDeferred
async def test_entries_page_in_a_stable_order(open_list: OpenList) -> None:
    store = await open_list()
    addresses = [f"user{n:02}@example.org" for n in range(25)]
    await store.add([Suppression(a, MANUAL) for a in reversed(addresses)])
    await store.add([Suppression("user03@example.org", UNSUBSCRIBED, "l.example.org")])
    seen: list[tuple[str, str]] = []
    after = None
    while page := await store.entries(after=after, limit=7):
        seen.extend((e.address, e.list_id) for e in page)
        after = seen[-1]
    assert seen == sorted([(a, "") for a in addresses] + [("user03@example.org", "l.example.org")])


@pytest_twisted.ensureDeferred
async def test_values_that_are_not_addresses_match_nothing(open_list: OpenList) -> None:
    store = await open_list()
    await store.add([Suppression("a@example.org", MANUAL)])
    assert await store.check(["", "<>", "nonsense", "a@example.org"]) == {
        "a@example.org": Suppression("a@example.org", MANUAL, "", T0, "")
    }
    assert await store.check([]) == {}


@pytest_twisted.ensureDeferred
async def test_many_addresses_are_checked_at_once(open_list: OpenList) -> None:
    store = await open_list()
    await store.add([Suppression(f"u{n}@example.org", MANUAL) for n in range(0, 1500, 3)])
    found = await store.check([f"u{n}@example.org" for n in range(1500)])
    assert len(found) == 500


@pytest_twisted.ensureDeferred
async def test_a_closed_store_refuses_work(open_list: OpenList) -> None:
    store = await open_list()
    await store.close()
    await store.close()  # idempotent
    for call in (
        lambda: store.add([Suppression("a@example.org", MANUAL)]),
        lambda: store.check(["a@example.org"]),
        lambda: store.entries(),
        lambda: store.remove("a@example.org"),
    ):
        with pytest.raises(SuppressionError):
            await call()
