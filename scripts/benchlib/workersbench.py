"""``scripts/bench --mode workers``: one CSV campaign delivered by 1, 2 and 4 ``twistmail worker``
processes on a PostgreSQL queue, and by one worker on a SQLite queue, into smtp-sink.

Each run stores the campaign (``twistmail send CSV TEMPLATE --queue URL --enqueue-only``: the
template and the rows, no rendered message), holds its rows back (their due time an hour
ahead), starts the workers and waits until each is idle, then makes the rows due (and NOTIFYs
the workers) and times the delivery: from the first message the sink takes to the last one.

CPU per row counts the workers (from ``/proc/PID/stat``) and, for PostgreSQL, the server
processes serving their connections (the backends whose ``application_name`` is the run's,
read from ``/proc`` too: the server runs on this machine); not smtp-sink's, and not the
server's shared background processes (WAL writer, checkpointer). The workers' start-up is
left out (CPU is read once they are idle, before the rows are due).

The target (issue #16): rows per CPU-second with 2 workers >= 85 % of one worker's on
PostgreSQL, so that adding machines adds throughput. Rows/s are reported too; on a 2-core
machine shared with the database and the sink, more workers cannot add much wall-clock speed.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from runner import BenchError, Sink, mode_parser

TEMPLATE = """\
From: Shop <shop@sender.example>
To: {{ name }} <{{ email }}>
Subject: Your order {{ order }}

Dear {{ name }},

your order {{ order }} has shipped. Lorem ipsum dolor sit amet, consectetur adipiscing elit,
sed do eiusmod tempor incididunt ut labore et dolore magna aliqua. Ut enim ad minim veniam,
quis nostrud exercitation ullamco laboris nisi ut aliquip ex ea commodo consequat.

-- The shop
"""
DEFAULT_URL = os.environ.get("TWISTMAIL_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
_TICK = os.sysconf("SC_CLK_TCK")


def _cpu(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid`` so far; 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def _write_campaign(workdir: Path, count: int) -> tuple[str, str]:
    csv_path = workdir / "campaign.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["email", "name", "order"])
        writer.writerows((f"user{i}@rcpt.example", f"User {i}", f"A{i:06d}") for i in range(count))
    template = workdir / "message.txt"
    template.write_text(TEMPLATE, encoding="utf-8")
    return str(csv_path), str(template)


def _twistmail(python: str, *args: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [python, "-m", "twistmail", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )


def _wait(condition: Any, what: str, limit: float) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out waiting for {what}")
        time.sleep(0.02)


class _Store:
    """The queue of one run: its URL, and how to hold its rows back and release them."""

    def __init__(self, kind: str, workdir: Path, base_url: str) -> None:
        self.kind = kind
        self.app = f"twistmail-bench-{uuid.uuid4().hex[:8]}"
        if kind == "sqlite":
            self.path = workdir / f"{self.app}.db"
            self.url = f"sqlite:{self.path}"
            return
        import psycopg

        self.schema = f"bench_{uuid.uuid4().hex[:12]}"
        self.base = base_url
        self.url = f"{base_url}?schema={self.schema}&application_name={self.app}"
        self._conn = psycopg.connect(base_url, autocommit=True)

    def _sql(self, text: str) -> None:
        if self.kind == "sqlite":
            with sqlite3.connect(self.path) as conn:
                conn.execute(text.replace("extract(epoch from now())", str(time.time())))
            return
        from psycopg import sql

        self._conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(self.schema)))
        self._conn.execute(text)  # type: ignore[arg-type]

    def hold(self) -> None:
        self._sql("UPDATE messages SET due = due + 3600 WHERE state = 'queued'")

    def release(self) -> None:
        self._sql("UPDATE messages SET due = extract(epoch from now()) WHERE state = 'queued'")
        if self.kind == "postgresql":
            channel = f"twistmail_queue_{self.schema}"[:63]
            self._conn.execute("SELECT pg_notify(%s, '')", (channel,))

    def backends(self) -> list[int]:
        if self.kind == "sqlite":
            return []
        rows = self._conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (self.app,)
        ).fetchall()
        return [int(pid) for (pid,) in rows]

    def drop(self) -> None:
        if self.kind == "sqlite":
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
            return
        from psycopg import sql

        self._conn.execute(
            sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(self.schema))
        )
        self._conn.close()


def one_run(
    args: argparse.Namespace, sink: Sink, workdir: Path, campaign: tuple[str, str], kind: str,
    workers: int,
) -> dict[str, Any]:  # fmt: skip
    """One delivery of the campaign by ``workers`` workers on a ``kind`` queue."""
    store = _Store(kind, workdir, args.postgres)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        started = time.monotonic()
        enqueue = _twistmail(
            args.python, "send", *campaign, "--queue", store.url, "--enqueue-only",
            "--campaign", "bench", log=workdir / "enqueue.log",
        )  # fmt: skip
        if enqueue.wait(timeout=args.timeout) != 0:
            raise BenchError((workdir / "enqueue.log").read_text(errors="replace"))
        enqueue_s = time.monotonic() - started
        store.hold()
        smtp = f"smtp://127.0.0.1:{sink.port}"
        logs = [workdir / f"worker{i}.log" for i in range(workers)]
        for log in logs:
            procs.append(
                _twistmail(
                    args.python,
                    "worker",
                    "--queue",
                    store.url,
                    "--smtp",
                    smtp,
                    "--concurrency",
                    str(args.concurrency),
                    log=log,
                )
            )
        _wait(lambda: all(b"delivering" in log.read_bytes() for log in logs), "workers", 60)
        time.sleep(0.5)  # their pools' connections are made
        before = {pid: _cpu(pid) for pid in [p.pid for p in procs] + store.backends()}
        first = sink.received()
        store.release()
        _wait(lambda: sink.received() > first, "the first message", 60)
        t0 = time.monotonic()
        _wait(lambda: sink.received() - first >= args.count, "every message", args.timeout)
        t1 = time.monotonic()
        worker_cpu = sum(_cpu(p.pid) - before.get(p.pid, 0.0) for p in procs)
        db_cpu = sum(_cpu(pid) - before.get(pid, 0.0) for pid in store.backends())
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        store.drop()
    cpu = worker_cpu + db_cpu
    return {
        "store": kind,
        "workers": workers,
        "rows_per_s": round((args.count - 1) / (t1 - t0), 1),
        "cpu_us_per_row": round(cpu / args.count * 1e6, 1),
        "worker_cpu_us_per_row": round(worker_cpu / args.count * 1e6, 1),
        "db_cpu_us_per_row": round(db_cpu / args.count * 1e6, 1),
        "rows_per_cpu_s": round(args.count / cpu, 1),
        "enqueue_s": round(enqueue_s, 2),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = mode_parser("workers", __doc__)
    parser.add_argument("--count", type=int, default=20_000, help="rows (default: 20000)")
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[1, 2, 4], help="PostgreSQL worker counts"
    )
    parser.add_argument("--concurrency", type=int, default=10, help="per worker (default: 10)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds (medians reported)")
    parser.add_argument("--postgres", default=DEFAULT_URL, help=f"default: {DEFAULT_URL}")
    parser.add_argument("--no-sqlite", action="store_true", help="leave out the SQLite run")
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"twistmail-bench-workers-{os.getpid()}"
    workdir.mkdir(parents=True)
    campaign = _write_campaign(workdir, args.count)
    sink = Sink(args.smtp_sink, args.smtp_sink_libs, workdir, os.environ.get("BENCH_SINK_PIDFILE"))
    sink.start()
    plan = [("postgresql", n) for n in args.workers]
    if not args.no_sqlite:
        plan.append(("sqlite", 1))
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {key: [] for key in plan}
    try:
        for _ in range(args.repeat):
            for kind, workers in plan:  # interleaved rounds
                run = one_run(args, sink, workdir, campaign, kind, workers)
                print(json.dumps(run), file=sys.stderr, flush=True)
                runs[(kind, workers)].append(run)
    finally:
        sink.stop()
    rows = []
    for (kind, workers), done in runs.items():
        row = {"store": kind, "workers": workers}
        for key in done[0]:
            if key not in row:
                row[key] = statistics.median(r[key] for r in done)
        rows.append(row)
    one = next((r for r in rows if r["store"] == "postgresql" and r["workers"] == 1), None)
    two = next((r for r in rows if r["store"] == "postgresql" and r["workers"] == 2), None)
    doc: dict[str, Any] = {"mode": "workers", "count": args.count, "runs": rows}
    if one and two:
        efficiency = two["rows_per_cpu_s"] / one["rows_per_cpu_s"]
        doc["two_workers_efficiency"] = round(efficiency, 3)
        doc["target_met"] = efficiency >= 0.85
    print(f"{'store':<11} {'workers':>7} {'rows/s':>8} {'CPU us/row':>10} {'(workers':>9} "
          f"{'+ db)':>6} {'rows/CPU-s':>10} {'enqueue s':>9}")  # fmt: skip
    for r in rows:
        print(
            f"{r['store']:<11} {r['workers']:>7} {r['rows_per_s']:>8.0f} "
            f"{r['cpu_us_per_row']:>10.0f} {r['worker_cpu_us_per_row']:>9.0f} "
            f"{r['db_cpu_us_per_row']:>6.0f} {r['rows_per_cpu_s']:>10.0f} {r['enqueue_s']:>9.1f}"
        )
    if "two_workers_efficiency" in doc:
        print(
            f"rows per CPU-second, 2 workers / 1: {doc['two_workers_efficiency']:.2f} "
            f"(target >= 0.85: {'met' if doc['target_met'] else 'NOT met'})"
        )
    print(json.dumps(doc, indent=2))
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
