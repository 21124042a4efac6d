"""``scripts/bench --mode store``: which way of using SQLite should the queue ship?

Each message goes through the queue's life: enqueue -> claim -> record (sent), as a relay
does it. ``--producers`` coroutines (default 1, 10 and 100) run that cycle concurrently on one
Twisted reactor until ``--count`` messages are done. The variants:

  blocking FULL     sqlite3 called on the reactor thread, one transaction per call (so one
  blocking NORMAL   commit per call), ``synchronous=FULL`` (fsync per commit) or NORMAL; a
                    minimal store of its own with the same tables and statements' shape
                    (the peer: what a naive relay would do)
  thread FULL       :class:`twistmail.queue.SqliteQueue` (public ``IQueue`` API only): one
  thread NORMAL     writer thread, group commit (writes made while a commit runs share the
                    next), at that ``synchronous`` level
  thread FULL+NORMAL  two ``SqliteQueue``\\s on one file: enqueues on a FULL connection (a 250
                    must mean fsync'd), claims and records on a NORMAL one (as ``twistmail
                    drain`` records outcomes)
  postgresql        :class:`twistmail.queue.postgres.PostgresQueue` on ``--postgres URL``
                    (default $TWISTMAIL_TEST_POSTGRES or postgresql://postgres@127.0.0.1:5432/
                    test), a fresh schema per run, 4 connections, enqueues group-committed
                    with synchronous_commit on: what a relay or worker on PostgreSQL does.
                    Its CPU column adds the database server's processes (all ``postgres``
                    processes of this machine, read from /proc): the server is part of the
                    cost; ``db us/msg`` shows that part alone

Reported per run: messages/s (wall), CPU us per message (process: both threads), enqueue
latency p50/p99 (how long an SMTP client would wait for its 250), the reactor's lag p99/max
(how late a 5 ms heartbeat fires: what every other connection suffers) and the number of
commits (thread variants). Variants are interleaved over ``--repeat`` rounds, medians
reported, ratios against ``blocking FULL`` at the same producer count in the same run.
Prints a table and JSON. Imports Twisted lazily so that ``--help`` works with any Python.
"""

from __future__ import annotations

import argparse
import os
import resource
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from inreactor import add_output_options, interleave, percentile, run_and_report

VARIANTS = (
    "blocking FULL",
    "blocking NORMAL",
    "thread FULL",
    "thread NORMAL",
    "thread FULL+NORMAL",
    "postgresql",
)
DEFAULT_POSTGRES = os.environ.get(
    "TWISTMAIL_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)
PEER = "blocking FULL"
_BODY = (
    b"From: Bench <bench@sender.example>\r\nTo: <rcpt@rcpt.example>\r\n"
    b"Subject: store benchmark\r\nMessage-ID: <store.%d@sender.example>\r\n\r\n"
    + b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.\r\n"
    * 30
)
_LEASE = 300.0


# The peer: the same work on the reactor thread. -------------------------------------------

_SCHEMA = (
    "CREATE TABLE messages (id INTEGER PRIMARY KEY, sender TEXT NOT NULL, payload BLOB NOT "
    "NULL, size INTEGER NOT NULL, message_id TEXT, state TEXT NOT NULL, attempts INTEGER NOT "
    "NULL DEFAULT 0, due REAL NOT NULL, owner TEXT, lease_until REAL, fence INTEGER NOT NULL "
    "DEFAULT 0, code INTEGER, response TEXT NOT NULL DEFAULT '', created_at REAL NOT NULL, "
    "updated_at REAL NOT NULL)",
    "CREATE INDEX messages_due ON messages (due, id) WHERE state IN ('queued', 'deferred')",
    "CREATE TABLE recipients (message INTEGER NOT NULL, position INTEGER NOT NULL, address "
    "TEXT NOT NULL, state TEXT NOT NULL, code INTEGER, response TEXT NOT NULL DEFAULT '', "
    "PRIMARY KEY (message, position)) WITHOUT ROWID",
)


class BlockingQueue:
    """enqueue / claim / record in sqlite3 on the caller's (reactor) thread, one commit each."""

    def __init__(self, path: str, synchronous: str) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute(f"PRAGMA synchronous = {synchronous}")
        for statement in _SCHEMA:
            self.conn.execute(statement)
        self.commits = 0

    def _transaction(self, work: Any) -> Any:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            result = work(time.time())
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")
        self.commits += 1
        return result

    def enqueue(self, sender: str, recipient: str, payload: bytes, message_id: str) -> int:
        def work(now: float) -> int:
            cursor = self.conn.execute(
                "INSERT INTO messages (sender, payload, size, message_id, state, due, "
                "created_at, updated_at) VALUES (?, ?, ?, ?, 'queued', ?, ?, ?)",
                (sender, payload, len(payload), message_id, now, now, now),
            )
            message = cursor.lastrowid
            self.conn.execute(
                "INSERT INTO recipients (message, position, address, state) "
                "VALUES (?, 0, ?, 'pending')",
                (message, recipient),
            )
            return int(message or 0)

        return int(self._transaction(work))

    def claim(self, owner: str) -> list[tuple[int, int, bytes, list[tuple[int, str]]]]:
        def work(now: float) -> list[tuple[int, int, bytes, list[tuple[int, str]]]]:
            rows = self.conn.execute(
                "UPDATE messages SET state = 'sending', owner = ?, lease_until = ?, "
                "fence = fence + 1, updated_at = ? WHERE id IN (SELECT id FROM messages "
                "WHERE state IN ('queued', 'deferred') AND due <= ? ORDER BY due, id LIMIT 1) "
                "RETURNING id, fence, payload",
                (owner, now + _LEASE, now, now),
            ).fetchall()
            return [
                (
                    message,
                    fence,
                    payload,
                    self.conn.execute(
                        "SELECT position, address FROM recipients WHERE message = ? AND "
                        "state = 'pending' ORDER BY position",
                        (message,),
                    ).fetchall(),
                )
                for message, fence, payload in rows
            ]

        result: list[tuple[int, int, bytes, list[tuple[int, str]]]] = self._transaction(work)
        return result

    def record(self, owner: str, message: int, fence: int, positions: list[int]) -> bool:
        def work(now: float) -> bool:
            cursor = self.conn.execute(
                "UPDATE messages SET state = 'sent', attempts = attempts + 1, code = 250, "
                "response = 'ok', owner = NULL, lease_until = NULL, updated_at = ?, "
                "payload = x'' WHERE id = ? AND owner = ? AND fence = ? AND state = 'sending'",
                (now, message, owner, fence),
            )
            self.conn.executemany(
                "UPDATE recipients SET state = 'sent', code = 250, response = 'ok' "
                "WHERE message = ? AND position = ?",
                [(message, position) for position in positions],
            )
            return cursor.rowcount == 1

        return bool(self._transaction(work))

    def close(self) -> None:
        self.conn.close()


# One run. ---------------------------------------------------------------------------------


class Heartbeat:
    """A call every ``interval`` s that records how late it fired: the reactor's lag."""

    def __init__(self, reactor: Any, interval: float = 0.005) -> None:
        self.reactor = reactor
        self.interval = interval
        self.lags: list[float] = []
        self.call: Any = None
        self._schedule()

    def _schedule(self) -> None:
        expected = time.perf_counter() + self.interval
        self.call = self.reactor.callLater(self.interval, self._beat, expected)

    def _beat(self, expected: float) -> None:
        self.lags.append(max(0.0, time.perf_counter() - expected))
        self._schedule()

    def stop(self) -> None:
        if self.call is not None and self.call.active():
            self.call.cancel()


def _postgres_cpu() -> float:
    """CPU seconds used so far by this machine's ``postgres`` processes (0 where /proc is
    missing); a process that ended meanwhile is not counted."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        if name != "postgres" and not name.startswith("postgres:"):
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


async def _open_postgres(reactor: Any, url: str) -> tuple[Any, str]:
    import uuid

    from twistmail.queue.postgres import PostgresQueue

    schema = f"bench_{uuid.uuid4().hex[:12]}"
    return await PostgresQueue.open(url, schema=schema, reactor=reactor), schema


def _drop_schema(url: str, schema: str) -> None:
    import psycopg
    from psycopg import sql

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


async def run_variant(
    reactor: Any,
    variant: str,
    producers: int,
    count: int,
    workdir: Path,
    postgres: str = DEFAULT_POSTGRES,
) -> dict[str, Any]:
    from twisted.internet import defer, task

    from twistmail.message import envelope_from_bytes
    from twistmail.queue import Outcome, SqliteQueue

    directory = tempfile.mkdtemp(prefix="store-", dir=workdir)
    path = os.path.join(directory, "queue.db")
    payloads = [_BODY % n for n in range(count)]
    numbers = iter(range(count))
    enqueue_latencies: list[float] = []
    empty_claims = 0
    blocking: BlockingQueue | None = None
    queues: list[Any] = []
    schema = None
    if variant.startswith("blocking"):
        blocking = BlockingQueue(path, variant.split()[1])
    elif variant == "postgresql":
        queue, schema = await _open_postgres(reactor, postgres)
        queues.append(queue)
        commits_before = queue.commits
    else:
        levels: list[Any] = variant.split()[1].split("+")
        writer = await SqliteQueue.open(path, synchronous=levels[0], reactor=reactor)
        queues.append(writer)
        if len(levels) > 1:
            queues.append(await SqliteQueue.open(path, synchronous=levels[1], reactor=reactor))
        commits_before = sum(q.commits for q in queues)

    async def producer(owner: str) -> None:
        nonlocal empty_claims
        for n in numbers:
            start = time.perf_counter()
            if blocking is not None:
                # Each call returns to the reactor before the next, as a server's would
                # between two commands: other producers and the heartbeat run in between.
                blocking.enqueue("bench@sender.example", "rcpt@rcpt.example", payloads[n], str(n))
                enqueue_latencies.append(time.perf_counter() - start)
                await task.deferLater(reactor, 0, lambda: None)
                while not (claimed := blocking.claim(owner)):
                    empty_claims += 1
                    await task.deferLater(reactor, 0, lambda: None)
                await task.deferLater(reactor, 0, lambda: None)
                for message, fence, _, recipients in claimed:
                    blocking.record(owner, message, fence, [p for p, _ in recipients])
                await task.deferLater(reactor, 0, lambda: None)
                continue
            envelope = envelope_from_bytes(
                "bench@sender.example", ["rcpt@rcpt.example"], payloads[n]
            )
            await queues[0].enqueue([envelope])
            enqueue_latencies.append(time.perf_counter() - start)
            while not (claims := await queues[-1].claim(owner, 1, lease=_LEASE)):
                empty_claims += 1
            for c in claims:
                sent: tuple[Any, ...] = tuple((p, "sent", 250, "ok") for p in c.positions)
                outcome = Outcome(
                    id=c.id,
                    fence=c.fence,
                    state="sent",
                    attempts=c.attempts + 1,
                    code=250,
                    response="ok",
                    recipients=sent,
                )
                assert await queues[-1].record(owner, outcome)

    heartbeat = Heartbeat(reactor)
    db_before = _postgres_cpu() if schema is not None else 0.0
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    await defer.gatherResults(
        [defer.Deferred.fromCoroutine(producer(f"p{i}")) for i in range(producers)],
        consumeErrors=True,
    )
    wall = time.perf_counter() - start
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    db_cpu = _postgres_cpu() - db_before if schema is not None else 0.0
    heartbeat.stop()
    commits: int | None
    if blocking is not None:
        commits = blocking.commits
        blocking.close()
        done = _count_sent(path)
    else:
        commits = sum(q.commits for q in queues) - commits_before
        summary = await queues[-1].summary()
        done = summary.counts["sent"]
        for queue in queues:
            await queue.close()
        if schema is not None:
            _drop_schema(postgres, schema)
    if done != count:
        raise RuntimeError(f"{variant}: {done} of {count} messages recorded as sent")
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    cpu += db_cpu
    enqueue_ms = sorted(x * 1000 for x in enqueue_latencies)
    lag_ms = sorted(x * 1000 for x in heartbeat.lags)
    return {
        "variant": variant,
        "producers": producers,
        "count": count,
        "per_second": round(count / wall, 1),
        "cpu_us_per_msg": round(cpu / count * 1e6, 1),
        "db_cpu_us_per_msg": round(db_cpu / count * 1e6, 1),
        "enqueue_p50_ms": round(percentile(enqueue_ms, 50), 3),
        "enqueue_p99_ms": round(percentile(enqueue_ms, 99), 3),
        "lag_p99_ms": round(percentile(lag_ms, 99), 3),
        "lag_max_ms": round(lag_ms[-1] if lag_ms else wall * 1000, 3),
        "commits": commits,
        "empty_claims": empty_claims,
    }


def _count_sent(path: str) -> int:
    conn = sqlite3.connect(path)
    try:
        (sent,) = conn.execute("SELECT count(*) FROM messages WHERE state = 'sent'").fetchone()
        return int(sent)
    finally:
        conn.close()


# All runs. --------------------------------------------------------------------------------


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return round(float(statistics.median(r[key] for r in runs)), 3)


async def run_all(reactor: Any, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    plan = [(variant, n) for n in args.producers for variant in args.variants]
    runs = await interleave(
        plan,
        args.repeat,
        lambda variant, producers: run_variant(
            reactor, variant, producers, args.count, workdir, args.postgres
        ),
        "producers",
        lambda run: (
            f"{run['per_second']:8.0f} msg/s  {run['cpu_us_per_msg']:6.0f} us/msg  enqueue "
            f"p99 {run['enqueue_p99_ms']:7.2f} ms  lag max {run['lag_max_ms']:7.1f} ms"
        ),
    )
    results: dict[str, Any] = {}
    for name, rs in runs.items():
        results[name] = {
            "variant": rs[0]["variant"],
            "producers": rs[0]["producers"],
            **{
                f"{key}_median": _median(rs, key)
                for key in (
                    "per_second",
                    "cpu_us_per_msg",
                    "db_cpu_us_per_msg",
                    "enqueue_p50_ms",
                    "enqueue_p99_ms",
                    "lag_p99_ms",
                    "lag_max_ms",
                )
            },
            "commits_per_msg": round(rs[0]["commits"] / rs[0]["count"], 3),
            "runs": rs,
        }
    ratios: dict[str, dict[str, float]] = {}
    for name, r in results.items():
        peer = results.get(f"{PEER} x{r['producers']}")
        if peer is None:
            continue
        ratios[name] = {
            "rate_vs_peer": round(r["per_second_median"] / peer["per_second_median"], 2),
            "cpu_vs_peer": round(r["cpu_us_per_msg_median"] / peer["cpu_us_per_msg_median"], 2),
        }
    return {
        "mode": "store",
        "settings": {
            "messages_per_run": args.count,
            "producers": args.producers,
            "repeat": args.repeat,
            "directory": str(workdir),
            "message_bytes": len(_BODY % 0),
            "peer": PEER,
        },
        "results": results,
        "ratios": ratios,
    }


def print_table(doc: dict[str, Any], out: Any = sys.stdout) -> None:
    head = (
        f"{'variant':<24} {'msg/s':>8} {'x peer':>7} {'us/msg':>7} {'db us':>6} {'enq p50':>8} "
        f"{'enq p99':>8} {'lag p99':>8} {'lag max':>8} {'commit/msg':>10}"
    )
    print(head, file=out)
    print("-" * len(head), file=out)
    for name, r in doc["results"].items():
        ratio = doc["ratios"].get(name, {}).get("rate_vs_peer")
        print(
            f"{name:<24} {r['per_second_median']:>8.0f} "
            f"{ratio if ratio is not None else '-':>7} {r['cpu_us_per_msg_median']:>7.0f} "
            f"{r['db_cpu_us_per_msg_median']:>6.0f} "
            f"{r['enqueue_p50_ms_median']:>8.3f} {r['enqueue_p99_ms_median']:>8.3f} "
            f"{r['lag_p99_ms_median']:>8.2f} {r['lag_max_ms_median']:>8.2f} "
            f"{r['commits_per_msg']:>10.3f}",
            file=out,
        )
    print(
        "per message: enqueue -> claim -> record; medians over rounds; x peer: msg/s over "
        f"{PEER} at the same producer count; enq: ms until an enqueue is committed (an SMTP "
        "250); lag: how late a 5 ms reactor heartbeat fired (ms); commit/msg: SQLite "
        "transactions per message in the first round (postgresql: enqueue transactions "
        "only); us/msg: CPU of this process, plus the database server's for postgresql "
        "(db us).",
        file=out,
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench --mode store",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__,
    )
    parser.add_argument("--mode", choices=["store"], default="store", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=1000, help="messages per run (default 1000)")
    parser.add_argument(
        "--producers",
        default="1,10,100",
        help="concurrent producers, comma-separated (default 1,10,100)",
    )
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated, from: {', '.join(VARIANTS)} (default: all)",
    )
    parser.add_argument(
        "--postgres",
        default=DEFAULT_POSTGRES,
        metavar="URL",
        help="the PostgreSQL server of the postgresql variant (default: %(default)s)",
    )
    parser.add_argument("--repeat", type=int, help="rounds of every variant (default 3)")
    parser.add_argument("--quick", action="store_true", help="300 messages per run, 1 round")
    add_output_options(parser, "the queue files")
    args = parser.parse_args(argv)
    if args.quick:
        args.count = min(args.count, 300)
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    try:
        args.producers = [int(p) for p in args.producers.split(",")]
    except ValueError:
        parser.error(f"--producers: expected numbers like 1,10,100, got {args.producers!r}")
    args.variants = [v.strip() for v in args.variants.split(",")]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    if min(args.producers) < 1 or args.count < 1 or args.repeat < 1:
        parser.error("--count, --repeat and each --producers must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return run_and_report(parse_args(argv), run_all, print_table, "twistmail-storebench-")


if __name__ == "__main__":
    sys.exit(main())
