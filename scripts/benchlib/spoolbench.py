"""``scripts/bench --mode spool``: how long enqueuing one message into the spool takes.

Measured from a running Twisted reactor, per ``send_messages([message])`` call, until its
Deferred fires (committed and fsync'd):

  spool       the ``spool`` backend (SQLite, WAL, synchronous=FULL, one writer thread, group
              commit) given ``EmailMessage``s, which it validates and renders on the reactor
              thread (as the Mailer would), one call at a time and ``--in-flight`` at once;
  spool-bytes the same backend given pre-rendered ``(sender, [recipient], bytes)`` triples;
  pickle      what it replaces: ``pickle.dump`` of the ``EmailMessage`` to a temporary file,
              fsync, rename, done with ``deferToThread`` (Twisted's default thread pool).

Messages are ~2.3 KB. Variants are interleaved over ``--repeat`` rounds. Prints a table and
JSON. The target is a p99 under 5 ms for one call at a time. With N calls in flight, latency
is at least N / throughput (Little's law): the table shows calls/s beside it.

Imports Twisted lazily so that ``--help`` works with any Python.
"""

from __future__ import annotations

import argparse
import os
import pickle
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from inreactor import add_output_options, interleave, percentile, run_and_report

TARGET_P99_MS = 5.0
_LINE = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.\n"


def make_message(n: int) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "Bench Sender <bench@sender.example>"
    msg["To"] = f"User Number {n} <user{n}@rcpt.example>"
    msg["Subject"] = f"Benchmark message {n}"
    msg["Message-ID"] = f"<bench.{n}@sender.example>"
    msg.set_content(f"Hello User Number {n},\n\n" + _LINE * 28)
    return msg


def write_pickle(directory: str, n: int, message: EmailMessage) -> None:
    """The pattern the spool replaces: one pickle file per message, made durable, renamed."""
    final = os.path.join(directory, f"{n:08d}.pickle")
    fd, temp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        pickle.dump(message, f, protocol=pickle.HIGHEST_PROTOCOL)
        f.flush()
        os.fsync(f.fileno())
    os.rename(temp, final)


async def timed_calls(
    call: Callable[[int], Awaitable[Any]], count: int, in_flight: int
) -> tuple[list[float], float]:
    """Latencies (s) of ``count`` calls, ``in_flight`` at a time, and the wall time."""
    from twisted.internet import defer

    latencies: list[float] = []
    numbers = iter(range(count))

    async def worker() -> None:
        for n in numbers:
            start = time.perf_counter()
            await call(n)
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await defer.gatherResults([defer.Deferred.fromCoroutine(worker()) for _ in range(in_flight)])
    return latencies, time.perf_counter() - start


async def run_variant(
    reactor: Any, kind: str, in_flight: int, count: int, workdir: Path, messages: list[Any]
) -> dict[str, Any]:
    from twisted.internet import threads

    from twistmail.backends.spool import SpoolBackend

    directory = tempfile.mkdtemp(prefix=f"{kind}-", dir=workdir)
    extra: dict[str, Any] = {}
    if kind.startswith("spool"):
        if kind == "spool-bytes":
            messages = [
                (str(m["From"].addresses[0].addr_spec), [m["To"].addresses[0].addr_spec], bytes(m))
                for m in messages
            ]
        backend = SpoolBackend(path=os.path.join(directory, "spool.db"), reactor=reactor)
        await backend.open()
        spool = backend.queue
        assert spool is not None
        commits_before = spool.commits

        async def call(n: int) -> None:
            assert await backend.send_messages([messages[n]]) == 1

        latencies, wall = await timed_calls(call, count, in_flight)
        extra["commits"] = spool.commits - commits_before
        await backend.close()
    else:

        async def call(n: int) -> None:
            await threads.deferToThread(write_pickle, directory, n, messages[n])

        latencies, wall = await timed_calls(call, count, in_flight)
    latencies.sort()
    ms = [x * 1000 for x in latencies]
    return {
        "what": kind,
        "in_flight": in_flight,
        "count": count,
        "p50_ms": round(percentile(ms, 50), 3),
        "p90_ms": round(percentile(ms, 90), 3),
        "p99_ms": round(percentile(ms, 99), 3),
        "max_ms": round(ms[-1], 3),
        "mean_ms": round(statistics.fmean(ms), 3),
        "per_second": round(count / wall, 1),
        **extra,
    }


async def run_all(reactor: Any, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    messages = [make_message(n) for n in range(args.count)]
    kinds = ("spool", "spool-bytes", "pickle")
    variants = [(kind, n) for n in (1, args.in_flight) for kind in kinds]
    runs = await interleave(
        variants,
        args.repeat,
        lambda kind, in_flight: run_variant(
            reactor, kind, in_flight, args.count, workdir, messages
        ),
        "in flight",
        lambda run: f"p50 {run['p50_ms']:.3f} ms  p99 {run['p99_ms']:.3f} ms",
    )
    results = {}
    for name, rs in runs.items():
        results[name] = {
            "p50_ms_median": round(statistics.median(r["p50_ms"] for r in rs), 3),
            "p99_ms_median": round(statistics.median(r["p99_ms"] for r in rs), 3),
            "p99_ms_worst": round(max(r["p99_ms"] for r in rs), 3),
            "per_second_median": round(statistics.median(r["per_second"] for r in rs), 1),
            "runs": rs,
        }
    sequential_p99 = results["spool x1"]["p99_ms_median"]
    return {
        "mode": "spool",
        "settings": {
            "messages_per_run": args.count,
            "in_flight": [1, args.in_flight],
            "repeat": args.repeat,
            "directory": str(workdir),
            "message_bytes": len(bytes(messages[0])),
        },
        "results": results,
        "ratio_pickle_to_spool_p99": {
            f"x{n}": round(
                results[f"pickle x{n}"]["p99_ms_median"] / results[f"spool x{n}"]["p99_ms_median"],
                2,
            )
            for n in sorted({1, args.in_flight})
        },
        "target": {
            "what": f"spool x1 p99 < {TARGET_P99_MS:g} ms (median of rounds)",
            "p99_ms": sequential_p99,
            "pass": sequential_p99 < TARGET_P99_MS,
        },
    }


def print_table(doc: dict[str, Any], out: Any = sys.stdout) -> None:
    head = (
        f"{'variant':<16} {'msgs':>6} {'p50 ms':>8} {'p99 ms':>8} {'p99 worst':>10} "
        f"{'calls/s':>9} {'commits':>8}"
    )
    print(head, file=out)
    print("-" * len(head), file=out)
    for name, r in doc["results"].items():
        commits = r["runs"][0].get("commits")
        print(
            f"{name:<16} {doc['settings']['messages_per_run']:>6} {r['p50_ms_median']:>8.3f} "
            f"{r['p99_ms_median']:>8.3f} {r['p99_ms_worst']:>10.3f} "
            f"{r['per_second_median']:>9.0f} {commits if commits is not None else '-':>8}",
            file=out,
        )
    print(
        "latency of one send_messages([msg]) / deferToThread(pickle+fsync+rename) until its "
        "Deferred fires; medians over rounds; commits: SQLite transactions in the first round.",
        file=out,
    )
    for what, ratio in doc["ratio_pickle_to_spool_p99"].items():
        print(f"pickle p99 / spool p99 ({what} in flight): {ratio:.2f}", file=out)
    target = doc["target"]
    verdict = "PASS" if target["pass"] else "FAIL"
    print(f"target {target['what']}: {target['p99_ms']:.3f} ms -> {verdict}", file=out)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench --mode spool",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__,
    )
    parser.add_argument("--mode", choices=["spool"], default="spool", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=2000, help="calls per run (default 2000)")
    parser.add_argument("--quick", action="store_true", help="500 calls per run, 2 rounds")
    parser.add_argument("--repeat", type=int, help="rounds of every variant (default 3)")
    parser.add_argument(
        "--in-flight", type=int, default=20, help="concurrent calls in the second variant"
    )
    add_output_options(parser, "the spool and the pickle files")
    args = parser.parse_args(argv)
    if args.quick:
        args.count = min(args.count, 500)
    if args.repeat is None:
        args.repeat = 2 if args.quick else 3
    for name in ("count", "repeat", "in_flight"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return run_and_report(parse_args(argv), run_all, print_table, "twistmail-spoolbench-")


if __name__ == "__main__":
    sys.exit(main())
