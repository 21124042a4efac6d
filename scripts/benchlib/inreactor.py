"""Run an in-process benchmark on a Twisted reactor, then print its table and JSON.

Shared by ``--mode spool`` and ``--mode store``: both measure twistmail's own code in this
process (no SMTP server, no subprocess). Imports Twisted lazily so that ``--help`` works with
any Python.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

RunAll = Callable[[Any, argparse.Namespace, Path], Awaitable[dict[str, Any]]]


def percentile(sorted_values: list[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank) of already sorted values; 0 for none."""
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[index]


async def interleave(
    plan: list[tuple[str, int]],
    repeat: int,
    run_one: Callable[[str, int], Awaitable[dict[str, Any]]],
    unit: str,
    describe: Callable[[dict[str, Any]], str],
) -> dict[str, list[dict[str, Any]]]:
    """Every ``(variant, n)`` of ``plan``, ``repeat`` rounds, the order rotated each round so
    that no variant always runs first; ``run_one(variant, n)`` makes one run. The runs by
    ``"variant xN"``; progress (``describe(run)``) on stderr."""
    runs: dict[str, list[dict[str, Any]]] = {f"{v} x{n}": [] for v, n in plan}
    order = list(plan)
    width = max(len(v) for v, _ in plan)
    for rnd in range(repeat):
        for variant, n in order:
            print(
                f"  round {rnd + 1}/{repeat}  {variant:<{width}} {n:>3} {unit} ...",
                end="",
                flush=True,
                file=sys.stderr,
            )
            run = await run_one(variant, n)
            runs[f"{variant} x{n}"].append(run)
            print(f" {describe(run)}", file=sys.stderr)
        order = order[1:] + order[:1]
    return runs


def add_output_options(parser: argparse.ArgumentParser, what: str) -> None:
    """``--dir`` (where ``what`` is written) and ``--json`` (where the results go)."""
    parser.add_argument(
        "--dir",
        help=f"where to write {what} (default: a temporary directory under $TMPDIR; it must "
        "be on a real disk for fsync to mean anything)",
    )
    parser.add_argument(
        "--json",
        metavar="PATH",
        help="where to write the JSON results (default bench-results.json; '-' for none)",
    )


def run_and_report(
    args: argparse.Namespace,
    run_all: RunAll,
    print_table: Callable[[dict[str, Any]], None],
    prefix: str,
) -> int:
    """``run_all(reactor, args, workdir)`` under ``task.react`` in a temporary directory
    (under ``args.dir``), then the table, the JSON (also written to ``args.json``, default
    bench-results.json, '-' for none) and the machine's description; the exit status."""
    from twisted.internet import defer, task

    doc: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix=prefix, dir=args.dir) as tmp:

        def go(reactor: Any) -> defer.Deferred[None]:
            async def body() -> None:
                doc.update(await run_all(reactor, args, Path(tmp)))

            return defer.Deferred.fromCoroutine(body())

        try:
            task.react(go)
        except SystemExit as e:
            if e.code:
                return int(e.code)
    doc["machine"] = {
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print()
    print_table(doc)
    text = json.dumps(doc, indent=2)
    print()
    print(text)
    json_path = args.json or "bench-results.json"
    if json_path != "-":
        Path(json_path).write_text(text + "\n")
        print(f"\nwritten to {json_path}", file=sys.stderr)
    return 0
