"""The ``twistmail send`` command line as a benchmark subject: inputs, and one measured run.

The CLI is run exactly as a user would run it (``python -m twistmail send CSV TEMPLATE ...``),
in a fresh subprocess with a fresh journal and report, so its numbers include interpreter
start-up, imports, reading the CSV, rendering, journaling and writing the report. Wall time is
taken by the driver around the whole child; CPU and peak RSS come from the child's ``wait4``
rusage. A run counts only if the CLI exits 0 and (unless ``--dry-run``) the sink's counter grew
by exactly the number of rows.

Standard library only, like ``runner.py``.
"""

from __future__ import annotations

import contextlib
import csv
import os
from pathlib import Path

from runner import BenchError, Run, Sink, run_counted

CLI_SENDER = "twistmail-cli-csv"
RECIPIENT_DOMAIN = "rcpt.example"
# Lines under 78 characters and no trailing blanks, so the body stays 7bit (no
# quoted-printable): the rendered message is ~2.3 KB like the library mode's messages.
_LINE = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.\n"
_BODY_LINES = 26
TEMPLATE_TEXT = (
    "From: Bench Sender <bench@sender.example>\n"
    "To: {{ name }} <{{ email }}>\n"
    "Subject: Benchmark message {{ code }}\n"
    "\n"
    "Hello {{ name }},\n"
    "\n"
    "Your code is {{ code }}.\n"
    "\n" + _LINE * _BODY_LINES + "\n--\nThe benchmark\n"
)


def write_csv(path: Path, rows: int) -> Path:
    """``rows`` distinct recipients (columns email,name,code), written streaming."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(("email", "name", "code"))
        for n in range(rows):
            w.writerow((f"user{n}@{RECIPIENT_DOMAIN}", f"User Number {n}", f"C{n:09d}"))
    return path


def write_template(path: Path) -> Path:
    path.write_text(TEMPLATE_TEXT, encoding="utf-8")
    return path


class CliInputs:
    """CSVs (one per row count, written once) and the template, in ``workdir``."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.template = write_template(workdir / "message.txt")
        self._csvs: dict[int, Path] = {}

    def csv_for(self, rows: int) -> Path:
        if rows not in self._csvs:
            self._csvs[rows] = write_csv(self.workdir / f"recipients-{rows}.csv", rows)
        return self._csvs[rows]


_serial = 0

# An installed twistmail has its bytecode cached after its first run. This machine's
# environment may forbid writing it (PYTHONDONTWRITEBYTECODE), which would add compiling every
# module to every timed run; the untimed probe run writes it instead.
_CLI_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def run_cli(
    python: str,
    inputs: CliInputs,
    sink: Sink,
    rows: int,
    connections: int,
    timeout: float,
    *,
    dry_run: bool = False,
) -> Run:
    """One ``twistmail send`` run over a ``rows``-row CSV; checked against the sink."""
    global _serial
    _serial += 1
    if not dry_run and not sink.alive():
        raise BenchError("smtp-sink has died")
    workdir = inputs.workdir
    csv_path = inputs.csv_for(rows)
    journal = workdir / f"cli-{_serial}.journal.db"
    report = workdir / f"cli-{_serial}.report.csv"
    cmd = [
        python,
        "-m",
        "twistmail",
        "send",
        str(csv_path),
        str(inputs.template),
        "--smtp",
        f"smtp://127.0.0.1:{sink.port}",
        "--concurrency",
        str(connections),
        "--journal",
        str(journal),
        "--report",
        str(report),
    ]
    if dry_run:
        cmd.append("--dry-run")
    label = f"{CLI_SENDER}{' --dry-run' if dry_run else ''} ({rows} rows)"
    try:
        elapsed, rusage, received, out_path = run_counted(
            cmd,
            label=label,
            sink=sink,
            expected=0 if dry_run else rows,
            timeout=timeout,
            workdir=workdir,
            env=_CLI_ENV,
            name="cli",
        )
        message_bytes = _first_message_size(out_path) if dry_run else None
    finally:
        for p in (journal, report, Path(f"{journal}-wal"), Path(f"{journal}-shm")):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
    cpu = rusage.ru_utime + rusage.ru_stime
    extra: dict[str, object] = {"dry_run": dry_run}
    if message_bytes is not None:
        extra["message_bytes"] = message_bytes
    return Run(
        sender=CLI_SENDER,
        count=rows,
        rate=rows / elapsed,
        elapsed=elapsed,
        cpu_us_per_msg=cpu / rows * 1e6,
        cpu_total_s=cpu,
        maxrss_mb=rusage.ru_maxrss / 1024,  # KiB on Linux
        sink_received=received,
        extra=extra,
    )


def _first_message_size(out_path: Path) -> int | None:
    """Approximate CRLF size of the message ``--dry-run`` printed (its first row)."""
    lines = out_path.read_text(errors="replace").splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.startswith("# RCPT TO:")) + 1
        end = next(i for i, line in enumerate(lines) if line.startswith("dry run:"))
    except StopIteration:
        return None
    body = lines[start:end]
    while body and not body[-1]:
        body.pop()
    return sum(len(line.encode()) + 2 for line in body)
