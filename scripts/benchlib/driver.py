"""Throughput benchmark: twistmail against peer SMTP senders, one smtp-sink, interleaved runs.

Every run is a fresh subprocess (``senders.py``) so RSS and reactor/loop state belong to one
sender. Runs are interleaved (A B C D E, then B C D E A, ...) so machine noise spreads over all
senders; quote the ratios, not the absolute numbers. After each run the sink's own message
counter must have grown by exactly the number of messages sent, or the benchmark fails.

Normally started by ``scripts/bench``, which prepares ``.bench-venv`` and ``smtp-sink`` and
passes them in through ``BENCH_PYTHON``, ``BENCH_SMTP_SINK`` and ``BENCH_SMTP_SINK_LIBS``.

This module and ``runner.py`` import only the standard library, so ``--help`` works before
any setup.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import pstats
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner import BenchError, Run, Sink, run_child

TWISTMAIL = "twistmail"
# The order of the first round; later rounds rotate it.
ALL_SENDERS = (
    TWISTMAIL,
    "aiosmtplib-uvloop",
    "aiosmtplib-asyncio",
    "smtplib-threads",
    "twisted-naive",
)
# One connection per message with Nagle left on: far slower, so it gets fewer messages.
SLOW_SENDERS = frozenset({"twisted-naive"})

DEFAULT_COUNT = 20_000
QUICK_COUNT = 2_000


# ---------------------------------------------------------------------- modes


@dataclass
class Plan:
    senders: list[str]
    count: int
    slow_count: int
    repeat: int
    connections: int
    timeout: float | None

    def count_for(self, sender: str) -> int:
        return self.slow_count if sender in SLOW_SENDERS else self.count

    def timeout_for(self, sender: str) -> float:
        if self.timeout is not None:
            return self.timeout
        n = self.count_for(sender)
        # Generous: a broken run should fail in minutes, not hang for ever.
        return 60.0 + n / (20.0 if sender in SLOW_SENDERS else 200.0)


def run_library_mode(args: argparse.Namespace, sink: Sink, workdir: Path) -> dict[str, Any]:
    """Library API throughput: every sender, interleaved, ``repeat`` rounds."""
    plan = make_plan(args)
    runs: dict[str, list[Run]] = {s: [] for s in plan.senders}
    order = list(plan.senders)
    for rnd in range(plan.repeat):
        for sender in order:
            n = plan.count_for(sender)
            print(
                f"  round {rnd + 1}/{plan.repeat}  {sender:<20} {n:>7} msgs ...",
                end="",
                flush=True,
                file=sys.stderr,
            )
            run = run_child(
                args.python, sender, sink, n, plan.connections, plan.timeout_for(sender), workdir
            )
            runs[sender].append(run)
            print(
                f" {run.rate:9.0f} msg/s  {run.cpu_us_per_msg:6.0f} us/msg",
                file=sys.stderr,
            )
        order = order[1:] + order[:1]
    return summarise(plan, runs)


def run_cli_csv_mode(args: argparse.Namespace, sink: Sink, workdir: Path) -> dict[str, Any]:
    """Hook, not implemented yet: the ``twistmail`` command fed a CSV file.

    Planned: write a CSV of ``count`` rows and a template to ``workdir``, run the CLI as a
    subprocess against ``sink`` (a ``twistmail-cli-csv`` entry in ``senders.SENDERS`` or a
    direct ``subprocess`` here), and report rows/s, CPU per row and peak RSS like
    :func:`run_library_mode`, with the library sender as the peer.
    """
    raise BenchError("the cli-csv mode is not implemented yet")


def run_memory_mode(args: argparse.Namespace, sink: Sink, workdir: Path) -> dict[str, Any]:
    """Hook, not implemented yet: peak RSS of the CLI at 100,000 and at 1,000,000 CSV rows.

    Planned: reuse :func:`run_cli_csv_mode`'s runner at both sizes and fail if peak RSS grows
    with the row count (it should stay flat: the CSV is streamed).
    """
    raise BenchError("the memory mode is not implemented yet")


MODES: dict[str, Callable[[argparse.Namespace, Sink, Path], dict[str, Any]]] = {
    "library": run_library_mode,
}
# Hooks for later; add them to MODES once implemented.
PLANNED_MODES = {"cli-csv": run_cli_csv_mode, "memory": run_memory_mode}


def make_plan(args: argparse.Namespace) -> Plan:
    count = args.count if args.count is not None else (QUICK_COUNT if args.quick else DEFAULT_COUNT)
    slow = args.slow_count if args.slow_count is not None else max(100, count // 10)
    repeat = args.repeat if args.repeat is not None else (2 if args.quick else 3)
    return Plan(
        senders=args.senders,
        count=count,
        slow_count=slow,
        repeat=repeat,
        connections=args.connections,
        timeout=args.timeout,
    )


# ---------------------------------------------------------------------- results


def summarise(plan: Plan, runs: dict[str, list[Run]]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for sender, rs in runs.items():
        rates = [r.rate for r in rs]
        results[sender] = {
            "messages_per_run": plan.count_for(sender),
            "rate_median": round(statistics.median(rates), 1),
            "rate_min": round(min(rates), 1),
            "rate_max": round(max(rates), 1),
            "cpu_us_per_msg_median": round(statistics.median(r.cpu_us_per_msg for r in rs), 1),
            "maxrss_mb_max": round(max(r.maxrss_mb for r in rs), 1),
            "runs": [r.as_json() for r in rs],
        }
    ratios: dict[str, Any] = {}
    if TWISTMAIL in results:
        tm = results[TWISTMAIL]
        for sender, res in results.items():
            if sender == TWISTMAIL:
                continue
            ratios[sender] = {
                # > 1: twistmail sends faster than the peer.
                "rate": round(tm["rate_median"] / res["rate_median"], 2),
                # < 1: twistmail spends less CPU per message than the peer.
                "cpu_per_msg": round(tm["cpu_us_per_msg_median"] / res["cpu_us_per_msg_median"], 2),
                "maxrss": round(tm["maxrss_mb_max"] / res["maxrss_mb_max"], 2),
            }
    return {
        "mode": "library",
        "settings": {
            "messages": plan.count,
            "messages_slow_senders": plan.slow_count,
            "slow_senders": sorted(SLOW_SENDERS & set(plan.senders)),
            "repeat": plan.repeat,
            "connections": plan.connections,
        },
        "results": results,
        "twistmail_ratio_to": ratios,
    }


def print_table(doc: dict[str, Any], out: Any = sys.stdout) -> None:
    results = doc["results"]
    ratios = doc.get("twistmail_ratio_to", {})
    head = (
        f"{'sender':<20} {'msgs':>7} {'msg/s med':>10} {'min':>9} {'max':>9} "
        f"{'CPU us/msg':>10} {'RSS MB':>7} {'tm speed x':>10} {'tm CPU x':>9}"
    )
    print(head, file=out)
    print("-" * len(head), file=out)
    for sender, r in results.items():
        ratio = ratios.get(sender)
        speed = f"{ratio['rate']:.2f}" if ratio else "-"
        cpu = f"{ratio['cpu_per_msg']:.2f}" if ratio else "-"
        print(
            f"{sender:<20} {r['messages_per_run']:>7} {r['rate_median']:>10.0f} "
            f"{r['rate_min']:>9.0f} {r['rate_max']:>9.0f} {r['cpu_us_per_msg_median']:>10.0f} "
            f"{r['maxrss_mb_max']:>7.1f} {speed:>10} {cpu:>9}",
            file=out,
        )
    print(
        "tm speed x = twistmail msg/s / peer msg/s (>1: twistmail faster); "
        "tm CPU x = twistmail CPU per msg / peer's (<1: twistmail cheaper).",
        file=out,
    )


def run_profile(args: argparse.Namespace, sink: Sink, workdir: Path) -> dict[str, Any]:
    """twistmail under cProfile; print the top functions by own time."""
    count = args.count if args.count is not None else (QUICK_COUNT if args.quick else 5_000)
    stats_path = str(workdir / "twistmail.prof")
    run = run_child(
        args.python,
        TWISTMAIL,
        sink,
        count,
        args.connections,
        args.timeout or 120 + count / 50,
        workdir,
        profile_out=stats_path,
    )
    buf = io.StringIO()
    stats = pstats.Stats(stats_path, stream=buf)
    stats.strip_dirs().sort_stats("tottime").print_stats(args.profile_top)
    text = buf.getvalue()
    print(
        f"twistmail under cProfile: {count} messages, {args.connections} connections, "
        f"{run.rate:.0f} msg/s (profiled; slower than unprofiled)"
    )
    print(text[text.find("   ncalls") :] if "   ncalls" in text else text)
    return {
        "mode": "profile",
        "messages": count,
        "connections": args.connections,
        "rate_profiled": round(run.rate, 1),
        "profile_top_by_tottime": text,
    }


# ---------------------------------------------------------------------- entry point


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Measure twistmail's bulk send throughput against peer SMTP senders.\n\n"
            "Senders (each run in a fresh subprocess, against one Postfix smtp-sink on\n"
            "127.0.0.1, ~2.3 KB CRLF messages, N connections):\n"
            "  twistmail           Mailer.send_many(), concurrency=N, Twisted default reactor\n"
            "  aiosmtplib-uvloop   aiosmtplib, N persistent connections, uvloop\n"
            "  aiosmtplib-asyncio  aiosmtplib, N persistent connections, stock asyncio\n"
            "  smtplib-threads     smtplib, N threads with one connection each\n"
            "  twisted-naive       twisted.mail.smtp.sendmail() per message, N in flight\n"
            "                      (gets --slow-count messages: one connection per message)\n\n"
            "Runs are interleaved and repeated; the table shows median/min/max messages/s,\n"
            "CPU microseconds per message (sending window), peak RSS, and twistmail's ratio\n"
            "to each peer. The sink's counter must match every run, or the benchmark fails.\n"
            "Results are also written as JSON (default bench-results.json).\n\n"
            "scripts/bench sets up .bench-venv (the project + aiosmtplib + uvloop) and\n"
            "smtp-sink (from the system, or extracted from the Debian postfix package into\n"
            ".bench-cache/; no daemon is ever started)."
        ),
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK_COUNT} messages per run, 2 rounds"
    )
    parser.add_argument(
        "--count",
        type=int,
        help=f"messages per run for the fast senders (default {DEFAULT_COUNT}; "
        f"with --profile 5000)",
    )
    parser.add_argument(
        "--slow-count",
        type=int,
        help="messages per run for twisted-naive (default: count / 10, at least 100)",
    )
    parser.add_argument("--repeat", type=int, help="rounds of every sender (default 3)")
    parser.add_argument(
        "--connections", type=int, default=20, help="connections / concurrency (default 20)"
    )
    parser.add_argument(
        "--senders",
        default=",".join(ALL_SENDERS),
        help="comma-separated subset, in first-round order (default: all)",
    )
    parser.add_argument(
        "--json",
        metavar="PATH",
        help="where to write the JSON results (default bench-results.json, not written "
        "with --profile unless given; '-' for none)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        help="seconds allowed per child run (default: 60 + a margin per message)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead of comparing, run twistmail once under cProfile and print the top "
        "functions by own time (tottime)",
    )
    parser.add_argument(
        "--profile-top", type=int, default=25, help="functions to show with --profile"
    )
    parser.add_argument(
        "--mode",
        choices=sorted(MODES),
        default="library",
        help="what to measure (more modes are planned: CLI from CSV, memory)",
    )
    parser.add_argument(
        "--python",
        default=os.environ.get("BENCH_PYTHON", sys.executable),
        help="interpreter for the senders (default: $BENCH_PYTHON, set by scripts/bench)",
    )
    parser.add_argument(
        "--sink",
        default=os.environ.get("BENCH_SMTP_SINK", "smtp-sink"),
        help="smtp-sink binary (default: $BENCH_SMTP_SINK, set by scripts/bench)",
    )
    args = parser.parse_args(argv)
    args.senders = [s.strip() for s in args.senders.split(",") if s.strip()]
    unknown = [s for s in args.senders if s not in ALL_SENDERS]
    if unknown:
        parser.error(f"unknown senders: {', '.join(unknown)}; known: {', '.join(ALL_SENDERS)}")
    for name in ("count", "slow_count", "repeat", "connections"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def _on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGHUP, _on_sigterm)
    with tempfile.TemporaryDirectory(prefix="twistmail-bench-") as tmp:
        workdir = Path(tmp)
        sink = Sink(
            args.sink,
            os.environ.get("BENCH_SMTP_SINK_LIBS"),
            workdir,
            os.environ.get("BENCH_SINK_PIDFILE"),
        )
        try:
            sink.start()
            print(f"smtp-sink on 127.0.0.1:{sink.port}", file=sys.stderr)
            if args.profile:
                doc = run_profile(args, sink, workdir)
            else:
                doc = MODES[args.mode](args, sink, workdir)
                print()
                print_table(doc)
        except BenchError as e:
            print(f"\nBENCHMARK FAILED: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\ninterrupted", file=sys.stderr)
            return 130
        finally:
            sink.stop()
    doc["machine"] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    text = json.dumps(doc, indent=2)
    if not args.profile:
        print()
        print(text)
    json_path = args.json or (None if args.profile else "bench-results.json")
    if json_path and json_path != "-":
        Path(json_path).write_text(text + "\n")
        print(f"\nwritten to {json_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
