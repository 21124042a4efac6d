"""``scripts/bench --mode templates``: ``twistmail send`` over the template shapes people write.

Each shape is one template and one CSV; the whole ``python -m twistmail send`` process is timed
into Postfix's ``smtp-sink`` (see ``clirun.run_cli``: fresh journal and report, CPU and peak RSS
from the child's rusage, the sink's counter checked). Shapes:

  plain        short plain text, every line at most 78 characters (the reference: 7bit)
  long-lines   plain text with lines of ~150 characters (the email package: quoted-printable)
  html         an HTML body (cells HTML-escaped)
  markdown     a Markdown body: multipart/alternative, text/plain + text/html
  non-ascii    non-English names in the Subject and the display name
               (``{{ name|mailbox(email) }}`` with names like "Zoë Müller")
  attachment   one ~600 KB binary file that does not depend on the row (200 rows by default)

Shapes are interleaved over ``--repeat`` rounds; the median run of each is reported with its
rate relative to ``plain`` measured in the same run. Targets (issue 13): every text shape
within 2x of ``plain`` (ratio >= 0.5), and the attachment campaign at least
``--attachment-baseline`` x 5 rows/s with a peak RSS under 100 MB.

Standard library only, like ``runner.py``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clirun import RECIPIENT_DOMAIN, run_cli
from runner import BenchError, Run, Sink

# Today's attachment campaign (before issue 13): 200 rows in 9.2 s, as the issue measured it.
ATTACHMENT_BASELINE = 21.7
ATTACHMENT_RSS_MB = 100.0
TEXT_RATIO = 0.5

_LINE = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.\n"
_LONG = (
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor "
    "incididunt ut labore et dolore magna aliqua. Ut enim ad minim veniam, quis.\n"
)
_HEAD = "From: Bench Sender <bench@sender.example>\nTo: {{ name }} <{{ email }}>\n"
_SUBJECT = "Subject: Benchmark message {{ code }}\n"

TEMPLATES = {
    "plain": _HEAD
    + _SUBJECT
    + "\nHello {{ name }},\n\nYour code is {{ code }}.\n\n"
    + _LINE * 26
    + "\n--\nThe benchmark\n",
    "long-lines": _HEAD
    + _SUBJECT
    + "\nHello {{ name }},\n\nYour code is {{ code }}.\n\n"
    + _LONG * 13
    + "\n--\nThe benchmark\n",
    "html": _HEAD
    + _SUBJECT
    + "Content-Type: text/html\n\n<html><body>\n<p>Hello {{ name }},</p>\n"
    + "<p>Your code is <b>{{ code }}</b>.</p>\n"
    + ("<p>" + _LINE.strip() + "</p>\n") * 24
    + "</body></html>\n",
    "markdown": _HEAD
    + _SUBJECT
    + "Content-Type: text/markdown\n\n# Hello {{ name }}\n\nYour code is **{{ code }}**.\n\n"
    + "".join(f"- item {n}: {_LINE}" for n in range(8))
    + "\n"
    + _LINE * 16
    + "\n[Unsubscribe](https://sender.example/u/{{ code }})\n",
    "non-ascii": "From: Bench Sender <bench@sender.example>\n"
    "To: {{ name|mailbox(email) }}\n"
    "Subject: Grüße, {{ name }}: Ihr Code {{ code }}\n"
    "\nHello {{ name }},\n\nYour code is {{ code }}.\n\n" + _LINE * 26 + "\n--\nThe benchmark\n",
    "attachment": _HEAD
    + _SUBJECT
    + "Attachment: brochure.pdf\n"
    + "\nHello {{ name }},\n\nYour brochure is attached.\n\n"
    + _LINE * 8
    + "\n--\nThe benchmark\n",
}
TEXT_SHAPES = ("long-lines", "html", "markdown", "non-ascii")
_NAMES = ("Zoë Müller", "José Núñez", "Søren Ødegård", "Łukasz Żółć", "Ana Lučić", "Иван Петров")


@dataclass
class ShapeInputs:
    """What ``run_cli`` needs: a work directory, a template and one CSV per row count."""

    workdir: Path
    template: Path
    shape: str

    def csv_for(self, rows: int) -> Path:
        path = self.workdir / f"{self.shape}-{rows}.csv"
        if not path.exists():
            with open(path, "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f, lineterminator="\n")
                w.writerow(("email", "name", "code"))
                for n in range(rows):
                    name = (
                        f"{_NAMES[n % len(_NAMES)]} {n}"
                        if self.shape == "non-ascii"
                        else f"User Number {n}"
                    )
                    w.writerow((f"user{n}@{RECIPIENT_DOMAIN}", name, f"C{n:09d}"))
        return path


def make_inputs(root: Path, attachment_kb: int) -> dict[str, ShapeInputs]:
    inputs = {}
    for shape, text in TEMPLATES.items():
        workdir = root / shape
        workdir.mkdir()
        template = workdir / "message.txt"
        template.write_text(text, encoding="utf-8")
        if shape == "attachment":
            # PDF-like: a header, then bytes that do not compress (base64 of random data).
            data = b"%PDF-1.4\n" + random.Random(13).randbytes(attachment_kb * 1024 - 9)
            (workdir / "brochure.pdf").write_bytes(data)
        inputs[shape] = ShapeInputs(workdir, template, shape)
    return inputs


def sink_ceiling(sink: Sink, message: bytes, count: int, connections: int) -> dict[str, Any]:
    """What smtp-sink takes on this machine: ``count`` copies of ``message`` (already CRLF and
    dot-stuffed) over ``connections`` plain sockets, one transaction at a time each, no
    rendering. The attachment shape's rate is read against this ceiling."""
    before = sink.received()
    numbers = iter(range(count))
    lock = threading.Lock()
    errors: list[str] = []

    def expect(f: Any, code: bytes) -> None:
        while True:
            line = f.readline()
            if not line.startswith(code):
                raise BenchError(f"sink ceiling: expected {code!r}, got {line!r}")
            if line[3:4] != b"-":
                return

    def worker() -> None:
        try:
            with socket.create_connection(("127.0.0.1", sink.port)) as s:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                f = s.makefile("rb")
                expect(f, b"220")
                s.sendall(b"EHLO bench\r\n")
                expect(f, b"250")
                while True:
                    with lock:
                        n = next(numbers, None)
                    if n is None:
                        break
                    s.sendall(b"MAIL FROM:<bench@sender.example>\r\nRCPT TO:<u@rcpt.example>\r\n")
                    expect(f, b"250")
                    expect(f, b"250")
                    s.sendall(b"DATA\r\n")
                    expect(f, b"354")
                    s.sendall(message + b".\r\n")
                    expect(f, b"250")
                s.sendall(b"QUIT\r\n")
        except (OSError, BenchError) as e:
            errors.append(str(e))

    threads = [threading.Thread(target=worker) for _ in range(connections)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    received = sink.wait_for(before + count) - before
    if errors or received != count:
        raise BenchError(f"sink ceiling: {received} of {count} taken; {errors[:3]}")
    return {"rows": count, "rate": round(count / elapsed, 1), "bytes": len(message)}


def attachment_message(inputs: ShapeInputs) -> bytes:
    """About the size of one rendered attachment message: the file in base64 plus the text."""
    data = (inputs.workdir / "brochure.pdf").read_bytes()
    return b"x" * (len(data) * 4 // 3 + len(data) // 57 * 2 + 2000)


def summarize(runs: list[Run]) -> dict[str, Any]:
    best = sorted(runs, key=lambda r: r.rate)[len(runs) // 2]
    return {
        "rows": best.count,
        "rate": round(best.rate, 1),
        "cpu_us_per_row": round(statistics.median(r.cpu_us_per_msg for r in runs), 1),
        "maxrss_mb": round(max(r.maxrss_mb for r in runs), 1),
        "elapsed_s": round(best.elapsed, 3),
        "runs": [r.as_json() for r in runs],
    }


def run_all(args: argparse.Namespace, sink: Sink, root: Path) -> dict[str, Any]:
    shapes = [s for s in TEMPLATES if s in args.shapes]
    inputs = make_inputs(root, args.attachment_kb)
    rows = {s: args.attachment_rows if s == "attachment" else args.rows for s in shapes}
    for shape in shapes:  # untimed: writes bytecode, checks the template renders
        run_cli(args.python, inputs[shape], sink, 1, args.concurrency, 120.0, dry_run=True)
    runs: dict[str, list[Run]] = {s: [] for s in shapes}
    order = list(shapes)
    for rnd in range(args.repeat):
        for shape in order:
            print(f"  round {rnd + 1}/{args.repeat}  {shape:<11} ...", end="", file=sys.stderr)
            run = run_cli(
                args.python, inputs[shape], sink, rows[shape], args.concurrency, args.timeout
            )
            runs[shape].append(run)
            print(
                f" {run.rate:8.1f} rows/s  {run.cpu_us_per_msg:8.0f} us/row  "
                f"{run.maxrss_mb:6.1f} MB",
                file=sys.stderr,
                flush=True,
            )
        order = order[1:] + order[:1]
    results = {s: summarize(rs) for s, rs in runs.items()}
    ceiling = None
    if "attachment" in shapes:
        # The same size as one rendered attachment message (the dry run's first row).
        size = len(attachment_message(inputs["attachment"]))
        message = b"Subject: x\r\n\r\n" + b"A" * 76 + b"\r\n"
        message = message * max(1, size // len(message))
        ceiling = sink_ceiling(sink, message, rows["attachment"], args.concurrency)
        print(f"  sink ceiling (raw bytes): {ceiling['rate']:.1f} msgs/s", file=sys.stderr)
    reference = results.get("plain", {}).get("rate")
    targets: dict[str, Any] = {}
    for shape, r in results.items():
        if reference:
            r["ratio_to_plain"] = round(r["rate"] / reference, 3)
        if shape in TEXT_SHAPES and reference:
            targets[shape] = {
                "what": f"rate >= {TEXT_RATIO:g} x plain",
                "pass": r["ratio_to_plain"] >= TEXT_RATIO,
            }
        if shape == "attachment":
            if ceiling is not None:
                r["sink_ceiling_rate"] = ceiling["rate"]
                r["ratio_to_sink_ceiling"] = round(r["rate"] / ceiling["rate"], 3)
            want = 5 * args.attachment_baseline
            targets[shape] = {
                "what": f"rate >= 5 x {args.attachment_baseline:g} rows/s and RSS < "
                f"{ATTACHMENT_RSS_MB:g} MB",
                "pass": r["rate"] >= want and r["maxrss_mb"] < ATTACHMENT_RSS_MB,
            }
    return {
        "mode": "templates",
        "settings": {
            "rows": args.rows,
            "attachment_rows": args.attachment_rows,
            "attachment_kb": args.attachment_kb,
            "concurrency": args.concurrency,
            "repeat": args.repeat,
        },
        "results": results,
        "targets": targets,
    }


def print_table(doc: dict[str, Any], out: Any = sys.stdout) -> None:
    head = (
        f"{'shape':<12} {'rows':>6} {'rows/s':>9} {'CPU us/row':>11} {'peak RSS MB':>12} "
        f"{'x plain':>8}  target"
    )
    print(head, file=out)
    print("-" * len(head), file=out)
    for shape, r in doc["results"].items():
        target = doc["targets"].get(shape)
        verdict = "" if target is None else ("PASS" if target["pass"] else "FAIL")
        print(
            f"{shape:<12} {r['rows']:>6} {r['rate']:>9.1f} {r['cpu_us_per_row']:>11.0f} "
            f"{r['maxrss_mb']:>12.1f} {r.get('ratio_to_plain', 0):>8.2f}  "
            f"{verdict} {target['what'] if target else ''}",
            file=out,
        )
    print(
        "whole `python -m twistmail send` process into smtp-sink; median run of the rounds; "
        "x plain: rate / the short plain-text rate of the same run.",
        file=out,
    )
    attachment = doc["results"].get("attachment", {})
    if "sink_ceiling_rate" in attachment:
        print(
            f"attachment: smtp-sink itself takes {attachment['sink_ceiling_rate']:.1f} msgs/s of "
            f"that size from raw sockets here; twistmail reaches "
            f"{attachment['ratio_to_sink_ceiling']:.0%} of it.",
            file=out,
        )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench --mode templates",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__,
    )
    parser.add_argument(
        "--mode", choices=["templates"], default="templates", help=argparse.SUPPRESS
    )
    parser.add_argument("--rows", type=int, default=5000, help="rows per text shape (5000)")
    parser.add_argument(
        "--attachment-rows", type=int, default=200, help="rows of the attachment shape (200)"
    )
    parser.add_argument("--attachment-kb", type=int, default=600, help="attachment size (600)")
    parser.add_argument(
        "--attachment-baseline",
        type=float,
        default=ATTACHMENT_BASELINE,
        help=f"today's attachment rows/s, for the 5x target (default {ATTACHMENT_BASELINE:g})",
    )
    parser.add_argument("--shapes", default=",".join(TEMPLATES), help="comma-separated subset")
    parser.add_argument("--concurrency", type=int, default=10, help="--concurrency of send (10)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--quick", action="store_true", help="1,000 rows, 50 attachments, 1 round")
    parser.add_argument("--timeout", type=float, default=600.0, help="per run, seconds")
    parser.add_argument(
        "--python",
        default=os.environ.get("BENCH_PYTHON", sys.executable),
        help="interpreter for the CLI (default: $BENCH_PYTHON, set by scripts/bench)",
    )
    parser.add_argument(
        "--sink",
        default=os.environ.get("BENCH_SMTP_SINK", "smtp-sink"),
        help="smtp-sink binary (default: $BENCH_SMTP_SINK, set by scripts/bench)",
    )
    parser.add_argument("--json", metavar="PATH", help="JSON results (default: none)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.attachment_rows, args.repeat = 1000, 50, 1
    args.shapes = set(args.shapes.split(","))
    unknown = args.shapes - set(TEMPLATES)
    if unknown:
        parser.error(f"unknown shapes: {', '.join(sorted(unknown))}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="twistmail-templatebench-") as tmp:
        root = Path(tmp)
        sink = Sink(
            args.sink,
            os.environ.get("BENCH_SMTP_SINK_LIBS"),
            root,
            os.environ.get("BENCH_SINK_PIDFILE"),
        )
        sink.start()
        try:
            doc = run_all(args, sink, root)
        except BenchError as e:
            print(f"bench: {e}", file=sys.stderr)
            return 1
        finally:
            sink.stop()
    doc["machine"] = {
        "python": platform.python_version(),
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
    if args.json and args.json != "-":
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
