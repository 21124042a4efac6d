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

from clirun import CLI_SENDER, CliInputs, run_cli
from drainrun import DRAIN_SENDER, DrainInputs, run_drain
from messagesenders import COMPOSE, EMAILMSG, PEER
from runner import BenchError, Run, Sink, run_child

TWISTMAIL = "twistmail"
# The order of the first round; later rounds rotate it.
ALL_SENDERS = (
    TWISTMAIL,
    "aiosmtplib-uvloop",
    "aiosmtplib-asyncio",
    "smtplib-threads",
    "twisted-naive",
    "twisted-bare",
)
# One connection per message with Nagle left on: far slower, so it gets fewer messages.
SLOW_SENDERS = frozenset({"twisted-naive"})

# --mode cli-csv: the command line, the library, and the yardstick.
CLI_MODE_SENDERS = (CLI_SENDER, TWISTMAIL, "aiosmtplib-uvloop")
CLI_TARGET = ("aiosmtplib-uvloop", 2.0)  # CLI msg/s must be at least 2x this peer's

# --mode drain: `twistmail drain` of a filled spool, the yardstick, and the CLI.
DRAIN_MODE_SENDERS = (DRAIN_SENDER, "aiosmtplib-uvloop", CLI_SENDER)
# (peer, drain msg/s must be at least this multiple of the peer's, what the target is)
DRAIN_TARGETS = (
    ("aiosmtplib-uvloop", 1.5, "target"),
    ("aiosmtplib-uvloop", 2.0, "stretch"),
    (CLI_SENDER, 1.0, "target"),
)

# --mode messages: messages built inside the window (compose / EmailMessage), and the peer
# sending equivalent EmailMessages. (sender, msg/s must be at least this multiple of PEER's)
MESSAGES_MODE_SENDERS = (COMPOSE, EMAILMSG, PEER)
MESSAGES_TARGETS = ((COMPOSE, 3.0), (EMAILMSG, 1.5))

DEFAULT_COUNT = 20_000
QUICK_COUNT = 2_000

# --mode memory
MEMORY_ROWS = (100_000, 1_000_000)
MEMORY_WHAT = ("dry-run", "send")
MEMORY_MAX_GROWTH = 1.10
MEMORY_MAX_MB = 80


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
        if sender in (CLI_SENDER, DRAIN_SENDER):  # the whole process
            return 120.0 + n / 50.0
        return 60.0 + n / (20.0 if sender in SLOW_SENDERS else 200.0)


def interleave(
    plan: Plan,
    run_one: Callable[[str, int, float], Run],
    *,
    before_round: Callable[[], None] | None = None,
    show_rss: bool = False,
) -> dict[str, list[Run]]:
    """Every sender of ``plan``, ``repeat`` rounds, the order rotated each round so that no
    sender always runs first; ``run_one(sender, count, timeout)`` makes one measured run."""
    runs: dict[str, list[Run]] = {s: [] for s in plan.senders}
    order = list(plan.senders)
    for rnd in range(plan.repeat):
        if before_round is not None:
            before_round()
        for sender in order:
            n = plan.count_for(sender)
            print(
                f"  round {rnd + 1}/{plan.repeat}  {sender:<20} {n:>7} msgs ...",
                end="",
                flush=True,
                file=sys.stderr,
            )
            run = run_one(sender, n, plan.timeout_for(sender))
            runs[sender].append(run)
            rss = f"  {run.maxrss_mb:6.1f} MB" if show_rss else ""
            print(
                f" {run.rate:9.0f} msg/s  {run.cpu_us_per_msg:6.0f} us/msg{rss}",
                file=sys.stderr,
            )
        order = order[1:] + order[:1]
    return runs


def run_library_mode(args: argparse.Namespace, sink: Sink, workdir: Path) -> dict[str, Any]:
    """Library API throughput: every sender, interleaved, ``repeat`` rounds."""
    plan = make_plan(args)

    def run_one(sender: str, n: int, timeout: float) -> Run:
        return run_child(args.python, sender, sink, n, plan.connections, timeout, workdir)

    return summarise(plan, interleave(plan, run_one))


def run_cli_csv_mode(args: argparse.Namespace, sink: Sink, workdir: Path) -> dict[str, Any]:
    """The ``twistmail send`` command fed a CSV, interleaved with library senders.

    The CLI's wall time covers the whole child (start-up, imports, CSV, journal, report), so
    it is compared as is; a one-row send per round measures that fixed cost, reported apart.
    """
    plan = make_plan(args)
    inputs = CliInputs(workdir)
    probe = run_cli(args.python, inputs, sink, 1, plan.connections, 120.0, dry_run=True)
    print(
        f"  template renders to ~{probe.extra.get('message_bytes', '?')} bytes; "
        f"writing the {plan.count}-row CSV",
        file=sys.stderr,
    )
    inputs.csv_for(plan.count)
    startups: list[Run] = []

    def before_round() -> None:
        if CLI_SENDER in plan.senders:
            startups.append(run_cli(args.python, inputs, sink, 1, plan.connections, 120.0))

    def run_one(sender: str, n: int, timeout: float) -> Run:
        if sender == CLI_SENDER:
            return run_cli(args.python, inputs, sink, n, plan.connections, timeout)
        return run_child(args.python, sender, sink, n, plan.connections, timeout, workdir)

    runs = interleave(plan, run_one, before_round=before_round, show_rss=True)
    doc = summarise(plan, runs, mode="cli-csv", reference=CLI_SENDER)
    doc["settings"]["cli_message_bytes"] = probe.extra.get("message_bytes")
    if startups:
        wall = statistics.median(r.elapsed for r in startups)
        doc["cli_one_row_send"] = {
            "wall_s_median": round(wall, 3),
            "cpu_s_median": round(statistics.median(r.cpu_total_s for r in startups), 3),
            "maxrss_mb_max": round(max(r.maxrss_mb for r in startups), 1),
        }
        net = [r.count / (r.elapsed - wall) for r in runs[CLI_SENDER] if r.elapsed > wall]
        if net:
            doc["cli_rate_excluding_one_row_cost_median"] = round(statistics.median(net), 1)
    peer, needed = CLI_TARGET
    ratio = doc["ratio_to"].get(peer)
    if ratio is not None:
        doc["target"] = {
            "what": f"{CLI_SENDER} msg/s >= {needed:g} x {peer} msg/s",
            "ratio": ratio["rate"],
            "pass": ratio["rate"] >= needed,
        }
    return doc


def run_drain_mode(args: argparse.Namespace, sink: Sink, workdir: Path) -> dict[str, Any]:
    """``twistmail drain`` of a spool filled with ``count`` messages, interleaved with peers.

    Each round: a one-message drain (its fixed cost, reported apart), then every sender. The
    drain and the CLI are timed as whole processes; the library senders over their sending
    window. Per-round ratios of the drain to each peer are reported too: rounds are adjacent
    in time, so they see the same machine.
    """
    plan = make_plan(args)
    drains = DrainInputs(args.python, workdir)
    clis = CliInputs(workdir) if CLI_SENDER in plan.senders else None
    if clis is not None:
        clis.csv_for(plan.count)
    if DRAIN_SENDER in plan.senders:
        drains.template_for(plan.count)
        # Untimed: writes bytecode and warms the file cache, as the CLI's probe does.
        run_drain(args.python, drains, sink, 1, plan.connections, 120.0)
    if clis is not None:
        run_cli(args.python, clis, sink, 1, plan.connections, 120.0)
    startups: list[Run] = []

    def before_round() -> None:
        if DRAIN_SENDER in plan.senders:
            startups.append(run_drain(args.python, drains, sink, 1, plan.connections, 120.0))

    def run_one(sender: str, n: int, timeout: float) -> Run:
        if sender == DRAIN_SENDER:
            return run_drain(args.python, drains, sink, n, plan.connections, timeout)
        if sender == CLI_SENDER:
            assert clis is not None
            return run_cli(args.python, clis, sink, n, plan.connections, timeout)
        return run_child(args.python, sender, sink, n, plan.connections, timeout, workdir)

    runs = interleave(plan, run_one, before_round=before_round, show_rss=True)
    doc = summarise(plan, runs, mode="drain", reference=DRAIN_SENDER)
    if DRAIN_SENDER not in runs:
        return doc
    for peer, ratio in doc["ratio_to"].items():
        per_round = [d.rate / p.rate for d, p in zip(runs[DRAIN_SENDER], runs[peer], strict=True)]
        ratio["rate_per_round_min"] = round(min(per_round), 2)
        ratio["rate_per_round_max"] = round(max(per_round), 2)
    if startups:
        wall = statistics.median(r.elapsed for r in startups)
        doc["drain_one_message"] = {
            "wall_s_median": round(wall, 3),
            "cpu_s_median": round(statistics.median(r.cpu_total_s for r in startups), 3),
            "maxrss_mb_max": round(max(r.maxrss_mb for r in startups), 1),
        }
        net = [r.count / (r.elapsed - wall) for r in runs[DRAIN_SENDER] if r.elapsed > wall]
        if net:
            doc["drain_rate_excluding_one_message_cost_median"] = round(statistics.median(net), 1)
    targets = []
    for peer, needed, kind in DRAIN_TARGETS:
        ratio = doc["ratio_to"].get(peer)
        if ratio is not None:
            targets.append(
                {
                    "what": f"{DRAIN_SENDER} msg/s >= {needed:g} x {peer} msg/s",
                    "kind": kind,
                    "ratio": ratio["rate"],
                    "pass": ratio["rate"] >= needed,
                }
            )
    doc["targets"] = targets
    return doc


def run_messages_mode(args: argparse.Namespace, sink: Sink, workdir: Path) -> dict[str, Any]:
    """Messages built and sent: twistmail's compose() and EmailMessage input against
    aiosmtplib+uvloop sending the same EmailMessages, construction included for all."""
    plan = make_plan(args)

    def run_one(sender: str, n: int, timeout: float) -> Run:
        return run_child(args.python, sender, sink, n, plan.connections, timeout, workdir)

    runs = interleave(plan, run_one)
    doc = summarise(plan, runs, mode="messages", reference=COMPOSE)
    targets = []
    for sender, needed in MESSAGES_TARGETS:
        if sender not in runs or PEER not in runs:
            continue
        ratio = doc["results"][sender]["rate_median"] / doc["results"][PEER]["rate_median"]
        # Rounds are adjacent in time, so each sees the same machine.
        per_round = [a.rate / b.rate for a, b in zip(runs[sender], runs[PEER], strict=True)]
        targets.append(
            {
                "what": f"{sender} msg/s >= {needed:g} x {PEER} msg/s",
                "kind": "target",
                "ratio": round(ratio, 2),
                "rate_per_round_min": round(min(per_round), 2),
                "rate_per_round_max": round(max(per_round), 2),
                "pass": ratio >= needed,
            }
        )
    doc["targets"] = targets
    return doc


def run_memory_mode(args: argparse.Namespace, sink: Sink, workdir: Path) -> dict[str, Any]:
    """Peak RSS of ``twistmail send`` at each ``--memory-rows`` size, dry run and real send.

    The CSV is streamed, so peak RSS should stay flat as the row count grows. PASS/FAIL is
    printed (largest size within 10% of the smallest, and under 80 MB), but only a run that
    itself fails makes the benchmark fail.
    """
    sizes = sorted(set(args.memory_rows))
    inputs = CliInputs(workdir)
    results: dict[str, Any] = {}
    for what in args.memory_what:
        dry = what == "dry-run"
        per: dict[str, Any] = {}
        for n in sizes:
            inputs.csv_for(n)
            print(f"  {what:<8} {n:>9} rows ...", end="", flush=True, file=sys.stderr)
            timeout = args.timeout or 300.0 + n / 100.0  # the CLI runs ~1,000 rows/s
            run = run_cli(args.python, inputs, sink, n, args.connections, timeout, dry_run=dry)
            print(
                f" {run.maxrss_mb:7.1f} MB  {run.elapsed:8.1f} s  {run.rate:8.0f} rows/s",
                file=sys.stderr,
            )
            per[str(n)] = {
                "maxrss_mb": round(run.maxrss_mb, 1),
                "elapsed_s": round(run.elapsed, 2),
                "rows_per_s": round(run.rate, 1),
                "cpu_us_per_row": round(run.cpu_us_per_msg, 1),
                "sink_received": run.sink_received,
            }
        small, big = per[str(sizes[0])]["maxrss_mb"], per[str(sizes[-1])]["maxrss_mb"]
        ratio = big / small
        results[what] = {
            "rows": per,
            "smallest": sizes[0],
            "largest": sizes[-1],
            "ratio_big_small": round(ratio, 3),
            "pass": ratio <= MEMORY_MAX_GROWTH and big < MEMORY_MAX_MB,
        }
    return {
        "mode": "memory",
        "settings": {
            "rows": sizes,
            "what": args.memory_what,
            "connections": args.connections,
            "criterion": f"peak RSS at the largest size within "
            f"{(MEMORY_MAX_GROWTH - 1) * 100:.0f}% of the smallest and under {MEMORY_MAX_MB} MB",
        },
        "results": results,
    }


MODES: dict[str, Callable[[argparse.Namespace, Sink, Path], dict[str, Any]]] = {
    "library": run_library_mode,
    "cli-csv": run_cli_csv_mode,
    "drain": run_drain_mode,
    "memory": run_memory_mode,
    "messages": run_messages_mode,
}


DEFAULT_SENDERS = {
    "cli-csv": CLI_MODE_SENDERS,
    "drain": DRAIN_MODE_SENDERS,
    "messages": MESSAGES_MODE_SENDERS,
}


def make_plan(args: argparse.Namespace) -> Plan:
    count = args.count if args.count is not None else (QUICK_COUNT if args.quick else DEFAULT_COUNT)
    slow = args.slow_count if args.slow_count is not None else max(100, count // 10)
    repeat = args.repeat if args.repeat is not None else (2 if args.quick else 3)
    return Plan(
        senders=args.senders or list(DEFAULT_SENDERS.get(args.mode, ALL_SENDERS)),
        count=count,
        slow_count=slow,
        repeat=repeat,
        connections=args.connections,
        timeout=args.timeout,
    )


# ---------------------------------------------------------------------- results


def summarise(
    plan: Plan, runs: dict[str, list[Run]], mode: str = "library", reference: str = TWISTMAIL
) -> dict[str, Any]:
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
    if reference in results:
        tm = results[reference]
        for sender, res in results.items():
            if sender == reference:
                continue
            ratios[sender] = {
                # > 1: the reference (twistmail, or the CLI) sends faster than the peer.
                "rate": round(tm["rate_median"] / res["rate_median"], 2),
                # < 1: the reference spends less CPU per message than the peer.
                "cpu_per_msg": round(tm["cpu_us_per_msg_median"] / res["cpu_us_per_msg_median"], 2),
                "maxrss": round(tm["maxrss_mb_max"] / res["maxrss_mb_max"], 2),
            }
    return {
        "mode": mode,
        "reference": reference,
        "settings": {
            "messages": plan.count,
            "messages_slow_senders": plan.slow_count,
            "slow_senders": sorted(SLOW_SENDERS & set(plan.senders)),
            "repeat": plan.repeat,
            "connections": plan.connections,
        },
        "results": results,
        # Library mode keeps its historical key.
        ("twistmail_ratio_to" if mode == "library" else "ratio_to"): ratios,
    }


def print_table(doc: dict[str, Any], out: Any = sys.stdout) -> None:
    if doc["mode"] == "memory":
        print_memory_table(doc, out)
        return
    results = doc["results"]
    ratios = doc.get("twistmail_ratio_to", doc.get("ratio_to", {}))
    ref = doc.get("reference", TWISTMAIL)
    tag = {TWISTMAIL: "tm", CLI_SENDER: "cli", DRAIN_SENDER: "drain"}.get(ref, "ref")
    width = max(20, *(len(sender) for sender in results))
    head = (
        f"{'sender':<{width}} {'msgs':>7} {'msg/s med':>10} {'min':>9} {'max':>9} "
        f"{'CPU us/msg':>10} {'RSS MB':>7} {tag + ' speed x':>11} {tag + ' CPU x':>10}"
    )
    print(head, file=out)
    print("-" * len(head), file=out)
    for sender, r in results.items():
        ratio = ratios.get(sender)
        speed = f"{ratio['rate']:.2f}" if ratio else "-"
        cpu = f"{ratio['cpu_per_msg']:.2f}" if ratio else "-"
        print(
            f"{sender:<{width}} {r['messages_per_run']:>7} {r['rate_median']:>10.0f} "
            f"{r['rate_min']:>9.0f} {r['rate_max']:>9.0f} {r['cpu_us_per_msg_median']:>10.0f} "
            f"{r['maxrss_mb_max']:>7.1f} {speed:>11} {cpu:>10}",
            file=out,
        )
    print(
        f"{tag} speed x = {ref} msg/s / peer msg/s (>1: {ref} faster); "
        f"{tag} CPU x = {ref} CPU per msg / peer's (<1: {ref} cheaper).",
        file=out,
    )
    if doc["mode"] == "cli-csv":
        print(
            f"{CLI_SENDER}: wall time, CPU and RSS of the whole child process (start-up, "
            "imports, CSV, journal, report included); the others: sending window only.",
            file=out,
        )
        one = doc.get("cli_one_row_send")
        if one:
            print(
                f"CLI fixed cost (one-row send): {one['wall_s_median']:.2f} s wall, "
                f"{one['cpu_s_median']:.2f} s CPU; CLI msg/s without it: "
                f"{doc.get('cli_rate_excluding_one_row_cost_median', float('nan')):.0f}",
                file=out,
            )
        target = doc.get("target")
        if target:
            verdict = "PASS" if target["pass"] else "FAIL"
            print(f"target {target['what']}: ratio {target['ratio']:.2f} -> {verdict}", file=out)
    if doc["mode"] == "messages":
        print(
            "Every sender builds each message inside its sending window (compose(), or an "
            "EmailMessage with From, To, Subject and set_content).",
            file=out,
        )
        for target in doc.get("targets", []):
            verdict = "PASS" if target["pass"] else "FAIL"
            print(
                f"target {target['what']}: ratio {target['ratio']:.2f} (per round "
                f"{target['rate_per_round_min']:.2f}-{target['rate_per_round_max']:.2f}) "
                f"-> {verdict}",
                file=out,
            )
    if doc["mode"] == "drain":
        print(
            f"{DRAIN_SENDER} and {CLI_SENDER}: wall time, CPU and RSS of the whole child "
            "process (start-up, imports, opening the spool or the CSV and journal, closing); "
            "the others: sending window only.",
            file=out,
        )
        for peer, ratio in doc.get("ratio_to", {}).items():
            if "rate_per_round_min" in ratio:
                print(
                    f"{DRAIN_SENDER} / {peer} per round: {ratio['rate_per_round_min']:.2f}x"
                    f"-{ratio['rate_per_round_max']:.2f}x",
                    file=out,
                )
        one = doc.get("drain_one_message")
        if one:
            print(
                f"drain fixed cost (one-message drain): {one['wall_s_median']:.2f} s wall, "
                f"{one['cpu_s_median']:.2f} s CPU; drain msg/s without it: "
                f"{doc.get('drain_rate_excluding_one_message_cost_median', float('nan')):.0f}",
                file=out,
            )
        for target in doc.get("targets", []):
            verdict = "PASS" if target["pass"] else "FAIL"
            print(
                f"{target['kind']} {target['what']}: ratio {target['ratio']:.2f} -> {verdict}",
                file=out,
            )


def print_memory_table(doc: dict[str, Any], out: Any = sys.stdout) -> None:
    head = (
        f"{'what':<8} {'rows':>9} {'peak RSS MB':>11} {'wall s':>8} {'rows/s':>8} "
        f"{'CPU us/row':>10}"
    )
    print(head, file=out)
    print("-" * len(head), file=out)
    for what, res in doc["results"].items():
        for rows, r in res["rows"].items():
            print(
                f"{what:<8} {int(rows):>9} {r['maxrss_mb']:>11.1f} {r['elapsed_s']:>8.1f} "
                f"{r['rows_per_s']:>8.0f} {r['cpu_us_per_row']:>10.0f}",
                file=out,
            )
    print(f"criterion: {doc['settings']['criterion']}", file=out)
    for what, res in doc["results"].items():
        big = res["rows"][str(res["largest"])]["maxrss_mb"]
        verdict = "PASS" if res["pass"] else "FAIL"
        print(
            f"{what:<8} RSS {res['largest']} / {res['smallest']} rows = "
            f"{res['ratio_big_small']:.3f}, largest {big:.1f} MB -> {verdict}",
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
            "                      (gets --slow-count messages: one connection per message)\n"
            "  twisted-bare        a floor, not a peer: a bare pipelining Twisted Protocol with\n"
            "                      no checks, outcomes, timeouts or retries\n\n"
            "Runs are interleaved and repeated; the table shows median/min/max messages/s,\n"
            "CPU microseconds per message (sending window), peak RSS, and twistmail's ratio\n"
            "to each peer. The sink's counter must match every run, or the benchmark fails.\n"
            "Results are also written as JSON (default bench-results.json).\n\n"
            "Modes (--mode):\n"
            "  library   the senders above, interleaved (default)\n"
            f"  cli-csv   the command line: `python -m twistmail send CSV TEMPLATE` over a\n"
            f"            --count-row CSV (email,name,code; ~2.3 KB plain-text template),\n"
            f"            fresh journal/report each run, interleaved with twistmail and\n"
            f"            aiosmtplib-uvloop (--senders may add others; name: {CLI_SENDER}).\n"
            "            The CLI is timed as a whole process (start-up included); it must\n"
            "            exit 0 and the sink must count every row. Prints the target\n"
            f"            CLI msg/s >= {CLI_TARGET[1]:g} x {CLI_TARGET[0]}.\n"
            f"  drain     `python -m twistmail drain --spool PATH --smtp URL --concurrency N`\n"
            f"            of a fresh spool file holding --count library-mode messages\n"
            f"            (enqueued beforehand with the spool backend, untimed; every run\n"
            f"            gets a fresh copy), timed as a whole process; it must exit 0 and\n"
            f"            the sink must count every message. Interleaved with\n"
            f"            aiosmtplib-uvloop and {CLI_SENDER} over --repeat rounds (name:\n"
            f"            {DRAIN_SENDER}; --senders may change the set). A one-message drain\n"
            "            per round measures the fixed cost. Prints PASS/FAIL for drain msg/s\n"
            "            >= 1.5 x aiosmtplib-uvloop (stretch 2 x) and >= the CLI's msg/s.\n"
            "  memory    peak RSS of the CLI at each --memory-rows size, with --dry-run\n"
            "            and/or a real send (--memory-what). Prints PASS/FAIL for: largest\n"
            f"            size within {(MEMORY_MAX_GROWTH - 1) * 100:.0f}% of the smallest and "
            f"under {MEMORY_MAX_MB} MB; fails only\n"
            "            if a run fails. The 1,000,000-row send takes minutes.\n"
            f"  messages  messages built and sent, construction included: {COMPOSE}\n"
            "            (send_many of twistmail.compose() envelopes), "
            f"{EMAILMSG} (send_many of\n"
            f"            EmailMessage objects) and {PEER} (aiosmtplib's\n"
            "            send_message of the same EmailMessages, on uvloop); From/To with\n"
            "            display names, a Subject, a 2 KB text body. Prints PASS/FAIL for\n"
            f"            {COMPOSE} >= {MESSAGES_TARGETS[0][1]:g} x and {EMAILMSG} >= "
            f"{MESSAGES_TARGETS[1][1]:g} x {PEER} msg/s.\n"
            "  spool     the spool backend's enqueue latency (p50/p99) against a pickle\n"
            "            file per message with fsync; no SMTP server (scripts/bench runs\n"
            "            scripts/benchlib/spoolbench.py; its own --help lists its options).\n"
            "  Modes with drivers of their own (scripts/bench hands them its arguments;\n"
            "  `scripts/bench --mode M --help` lists each one's options):\n"
            "  templates `twistmail send` over the template shapes (templatebench.py)\n"
            "  relay     smtp-source -> twistd twistmail -> smtp-sink (relaybench.py)\n"
            "  api       HTTP clients against the relay's API beside its SMTP door\n"
            "            (relaybench.py)\n"
            "  dkim      signing rates per core, send_many signed and not (dkimbench.py)\n"
            "  store     enqueue -> claim -> record on SQLite, no SMTP (storebench.py)\n"
            "  workers   a CSV campaign in a PostgreSQL queue with 1/2/4 workers, and\n"
            "            SQLite, into smtp-sink (workersbench.py)\n\n"
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
        help="comma-separated subset, in first-round order (default: all; with --mode "
        f"cli-csv: {','.join(CLI_MODE_SENDERS)}; with --mode drain: "
        f"{','.join(DRAIN_MODE_SENDERS)})",
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
        help="what to measure: library (default), cli-csv, drain, memory or messages; spool, "
        "templates, relay, api, dkim, store and workers run drivers of their own; see above",
    )
    parser.add_argument(
        "--memory-rows",
        default=",".join(str(n) for n in MEMORY_ROWS),
        metavar="N,N",
        help="--mode memory: CSV sizes (default %(default)s)",
    )
    parser.add_argument(
        "--memory-what",
        default=",".join(MEMORY_WHAT),
        metavar="WHAT",
        help="--mode memory: dry-run, send or both (default %(default)s)",
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
    known = ALL_SENDERS + {
        "cli-csv": (CLI_SENDER,),
        "drain": (DRAIN_SENDER, CLI_SENDER),
        "messages": MESSAGES_MODE_SENDERS,
    }.get(args.mode, ())
    args.senders = [s.strip() for s in (args.senders or "").split(",") if s.strip()]
    unknown = [s for s in args.senders if s not in known]
    if unknown:
        parser.error(f"unknown senders: {', '.join(unknown)}; known: {', '.join(known)}")
    try:
        args.memory_rows = [int(n.replace("_", "")) for n in args.memory_rows.split(",") if n]
    except ValueError:
        parser.error("--memory-rows takes comma-separated row counts, e.g. 100000,1000000")
    if not args.memory_rows or min(args.memory_rows) < 1:
        parser.error("--memory-rows: give at least one row count, each at least 1")
    args.memory_what = [w.strip() for w in args.memory_what.split(",") if w.strip()]
    if not args.memory_what or set(args.memory_what) - set(MEMORY_WHAT):
        parser.error(f"--memory-what takes {' and/or '.join(MEMORY_WHAT)}")
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
