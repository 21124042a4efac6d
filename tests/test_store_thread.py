"""The SQLite store thread shared by the journal and the queue (``twistmail._sqlite``).

Reactor shutdown closes a store left open, committing what was written, without removing the
trigger that is firing; close waits for queued writes; a group commits whole or not at all; the
thread takes the next group itself, without waiting for the reactor, and other jobs still get
their turn between groups.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from twistmail import _sqlite

# Each script opens a store, writes without waiting and never closes it: the reactor's shutdown
# trigger must commit and close it. "-W always" shows every DeprecationWarning, among them
# Twisted's "Removing already-fired system event triggers" if a store removed its own trigger.
_FORGETFUL = {
    "journal": """
        from twistmail.merge.journal import Journal

        async def main(reactor):
            store = await Journal.open(
                sys.argv[1], template_fingerprint="t", reactor=reactor
            )
            for row in range(1, 51):
                store.record(row, row=row, email=f"r{row}@x.org", state="sent")
        """,
    "queue": r"""
        from twistmail.message import envelope_from_bytes
        from twistmail.queue import SqliteQueue

        async def main(reactor):
            store = await SqliteQueue.open(sys.argv[1], reactor=reactor)
            message = envelope_from_bytes("a@x.org", ["b@x.org"], b"Subject: x\r\n\r\nx\r\n")
            for n in range(50):
                store.enqueue([message])
        """,
}

_COUNT = {
    "journal": "SELECT count(*) FROM rows WHERE state = 'sent'",
    "queue": "SELECT count(*) FROM messages WHERE state = 'queued'",
}


@pytest.mark.parametrize("store", sorted(_FORGETFUL))
def test_reactor_shutdown_closes_a_forgotten_store_without_a_warning(
    store: str, tmp_path: Path
) -> None:
    path = tmp_path / "store.db"
    script = "import sys\nfrom twisted.internet import defer, task\n" + textwrap.dedent(
        _FORGETFUL[store]
    )
    script += "\ntask.react(lambda reactor: defer.ensureDeferred(main(reactor)))\n"
    done = subprocess.run(
        [sys.executable, "-W", "always", "-c", script, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "already-fired" not in done.stderr
    assert "Traceback" not in done.stderr
    assert not Path(f"{path}-wal").exists(), "closed cleanly: SQLite removed the WAL"
    conn = sqlite3.connect(path)
    try:
        assert conn.execute(_COUNT[store]).fetchone() == (50,)
    finally:
        conn.close()


# The base itself, with a store of one table -------------------------------------------------


class ToyError(Exception):
    pass


def _open_toy(path: str) -> sqlite3.Connection:
    conn = _sqlite.connect(path, busy_timeout=5)
    conn.execute("CREATE TABLE IF NOT EXISTS t (value INTEGER NOT NULL CHECK (value >= 0))")
    _sqlite.configure(conn, "FULL", ToyError)
    return conn


def _insert_all(conn: sqlite3.Connection, values: list[int]) -> list[int]:
    with _sqlite.transaction(conn):
        return [conn.execute("INSERT INTO t VALUES (?)", (v,)).lastrowid or 0 for v in values]


def _count(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM t").fetchone()[0])


def toy_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if "-toy " in t.name]


async def open_toy(path: Path) -> _sqlite.SqliteThread[int]:
    pool, conn = await _sqlite.SqliteThread.start(reactor, f"toy {path}", _open_toy, str(path))
    return _sqlite.SqliteThread(str(path), conn, pool, reactor, commit=_insert_all, closed=ToyError)


def values_in(path: Path) -> list[int]:
    conn = sqlite3.connect(path)
    try:
        return [v for (v,) in conn.execute("SELECT value FROM t ORDER BY rowid")]
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_close_commits_queued_writes_then_refuses_work_and_stops_the_thread(
    tmp_path: Path,
) -> None:
    path = tmp_path / "toy.db"
    store = await open_toy(path)
    assert toy_threads()
    assert await store.settings() == ("wal", 2)
    writes = [store.submit(v) for v in range(5)]  # not waited for
    closing = store.close()
    assert store.closing
    await closing
    assert [await w for w in writes] == [1, 2, 3, 4, 5]
    # The first alone (if the thread took it before the others came), the rest together.
    assert 1 <= store.commits <= 2
    assert values_in(path) == [0, 1, 2, 3, 4]
    assert not toy_threads()
    with pytest.raises(ToyError, match="write after close"):
        await store.submit(9)
    with pytest.raises(ToyError, match="read after close"):
        await store.read(_count)
    await store.close()  # idempotent, and fires at once now


@pytest.mark.parametrize("fails", [False, True], ids=["writes", "raises"])
@pytest_twisted.ensureDeferred
async def test_before_close_runs_after_the_last_write_and_the_connection_closes_anyway(
    tmp_path: Path, fails: bool
) -> None:
    path = tmp_path / "toy.db"
    pool, conn = await _sqlite.SqliteThread.start(reactor, f"toy {path}", _open_toy, str(path))
    seen: list[int] = []

    def before_close(conn: sqlite3.Connection) -> None:
        seen.append(_count(conn))  # every write queued before close() is in
        _insert_all(conn, [100])
        if fails:
            raise ToyError("before close")

    store = _sqlite.SqliteThread(
        str(path), conn, pool, reactor, commit=_insert_all, closed=ToyError,
        before_close=before_close,
    )  # fmt: skip
    writes = [store.submit(v) for v in range(3)]
    if fails:
        with pytest.raises(ToyError, match="before close"):
            await store.close()
    else:
        await store.close()
    assert [await w for w in writes] == [1, 2, 3]
    assert seen == [3]
    assert values_in(path) == [0, 1, 2, 100]
    assert not toy_threads()


@pytest_twisted.ensureDeferred
async def test_a_failing_write_fails_its_whole_group_and_commits_none_of_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "toy.db"
    store = await open_toy(path)
    try:
        assert await store.submit(1) == 1
        group = [store.submit(2), store.submit(-1), store.submit(3)]  # -1 breaks the CHECK
        for write in group:
            with pytest.raises(sqlite3.IntegrityError):
                await write
        assert await store.read(_count) == 1
        assert await store.submit(4) == 2  # the store carries on
    finally:
        await store.close()
    assert values_in(path) == [1, 4]


@pytest_twisted.ensureDeferred
async def test_a_failed_opening_stops_its_thread(tmp_path: Path) -> None:
    def refuse(path: str) -> sqlite3.Connection:
        raise ToyError(f"{path}: no")

    with pytest.raises(ToyError, match="no"):
        await _sqlite.SqliteThread.start(reactor, f"toy {tmp_path}", refuse, str(tmp_path))
    assert not toy_threads()


class _HeldAnswers:
    """An IReactorFromThreads that keeps what the thread hands back until :meth:`deliver`."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, tuple[object, ...]]] = []
        self._arrived = threading.Condition()

    def callFromThread(self, f: object, *args: object, **kw: object) -> None:
        with self._arrived:
            self.calls.append((f, args))
            self._arrived.notify_all()

    def wait_for(self, count: int) -> None:
        with self._arrived:
            assert self._arrived.wait_for(lambda: len(self.calls) >= count, timeout=10)

    def deliver(self) -> None:
        calls, self.calls = self.calls, []
        for f, args in calls:
            f(*args)  # type: ignore[operator]


def _groups_on_a_thread(
    log: list[object], taken: threading.Event, hold: threading.Event
) -> tuple[_sqlite.ThreadGroups[int], _sqlite.OneThread, _HeldAnswers]:
    """Groups committed by a real thread; the group ``[1]`` sets ``taken`` and waits for
    ``hold``."""
    pool = _sqlite.OneThread("test-groups")
    pool.start()
    answers = _HeldAnswers()

    def commit(items: list[int]) -> list[int]:
        if items == [1]:
            taken.set()
            assert hold.wait(10)
        log.append(list(items))
        return [10 * item for item in items]

    return _sqlite.ThreadGroups(pool, answers, commit), pool, answers


def test_the_thread_commits_the_next_group_before_the_reactor_sees_the_last() -> None:
    log: list[object] = []
    taken, hold = threading.Event(), threading.Event()
    groups, pool, answers = _groups_on_a_thread(log, taken, hold)
    try:
        first = groups.submit(1)
        assert taken.wait(10)
        later = [groups.submit(2), groups.submit(3)]  # queued while [1] commits
        hold.set()
        answers.wait_for(2)
        # Both groups committed while the reactor had not yet heard of the first.
        assert log == [[1], [2, 3]]
        assert not first.called
        assert groups.commits == 0
        answers.deliver()
        assert first.result == 10
        assert [d.result for d in later] == [20, 30]
        assert groups.commits == 2
        assert groups.idle().called
    finally:
        pool.stop()


def test_a_job_given_to_the_thread_between_two_groups_runs_between_them() -> None:
    log: list[object] = []
    taken, hold = threading.Event(), threading.Event()
    groups, pool, answers = _groups_on_a_thread(log, taken, hold)
    try:
        groups.submit(1)
        assert taken.wait(10)
        groups.submit(2)  # waits for [1]
        pool.callInThread(log.append, "read")  # given while [1] commits: runs before [2]
        hold.set()
        answers.wait_for(2)
        assert log == [[1], "read", [2]]
        answers.deliver()
    finally:
        pool.stop()


@pytest_twisted.ensureDeferred
async def test_a_read_a_waiter_asks_for_runs_before_the_write_it_asked_for_first(
    tmp_path: Path,
) -> None:
    # The HTTP API's retry: a write is answered; its waiter wakes a worker (whose claim is a
    # write) and then reads the message: the read shows what the first write left.
    store = await open_toy(tmp_path / "toy.db")
    try:
        seen: list[object] = []

        def answered(_: object) -> defer.Deferred[object]:
            later = store.submit(2)
            read = store.read(_count).addCallback(seen.append)
            return defer.gatherResults([later, read])

        await store.submit(1).addCallback(answered)
        assert seen == [1]
        assert await store.read(_count) == 2
    finally:
        await store.close()


def test_writes_a_waiter_submits_wait_for_its_reads_even_while_another_group_commits() -> None:
    log: list[object] = []
    taken = {1: threading.Event(), 2: threading.Event()}
    hold = {1: threading.Event(), 2: threading.Event()}
    pool = _sqlite.OneThread("test-groups")
    pool.start()
    answers = _HeldAnswers()

    def commit(items: list[int]) -> list[int]:
        if items[0] in taken:
            taken[items[0]].set()
            assert hold[items[0]].wait(10)
        log.append(list(items))
        return items

    groups = _sqlite.ThreadGroups(pool, answers, commit)
    try:
        first = groups.submit(1)
        assert taken[1].wait(10)
        groups.submit(2)  # the next group, taken while [1]'s answer waits for the reactor
        hold[1].set()
        answers.wait_for(1)
        assert taken[2].wait(10)

        def waiter(_: object) -> None:
            groups.submit(3)  # a write, then a read, while [2] commits
            hold[2].set()
            answers.wait_for(1)  # [2] committed: the thread has looked for a next group
            pool.callInThread(log.append, "read")

        first.addCallback(waiter)
        answers.deliver()  # [1]'s answer runs the waiter
    finally:
        pool.stop()  # runs what is queued on the thread, then joins it
    assert log == [[1], [2], "read", [3]]
