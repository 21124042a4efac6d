"""The pieces under one benchmark run: smtp-sink, and a sender subprocess with its rusage.

Every child (the sink and each sender) runs in its own session, gets SIGKILL if the driver dies
(Linux ``PR_SET_PDEATHSIG``), and is killed with its whole process group when done or timed out.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SENDERS_PY = Path(__file__).resolve().parent / "senders.py"


class BenchError(Exception):
    """The benchmark could not produce a trustworthy number."""


# ---------------------------------------------------------------------- process hygiene


def _die_with_parent() -> None:
    """In the child, before exec: get SIGKILL if the driver dies (Linux only)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


def _kill_group(proc: subprocess.Popen[Any]) -> None:
    """Kill a child started in its own session, and everything it started."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(proc.pid, 0)
    proc.returncode = -9


def mode_parser(
    mode: str, doc: str | None, modes: Sequence[str] | None = None
) -> argparse.ArgumentParser:
    """The argument parser of a ``scripts/bench --mode MODE`` driver that uses smtp-sink,
    with the options every such driver shares; ``modes`` when the driver serves several."""
    parser = argparse.ArgumentParser(
        prog=f"scripts/bench --mode {mode}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--mode", default=mode, choices=list(modes or [mode]))
    parser.add_argument("--python", default=os.environ.get("BENCH_PYTHON", sys.executable))
    parser.add_argument("--smtp-sink", default=os.environ.get("BENCH_SMTP_SINK", "smtp-sink"))
    parser.add_argument("--smtp-sink-libs", default=os.environ.get("BENCH_SMTP_SINK_LIBS"))
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# ---------------------------------------------------------------------- the sink


class Sink:
    """Postfix's ``smtp-sink`` on 127.0.0.1, with its running counters (``-c``) in a file.

    ``-c`` writes ``sess=N quit=N mesg=N`` (CR-separated) whenever a "." is received; the
    last ``mesg`` value is the number of messages taken since the sink started.
    """

    def __init__(self, binary: str, libs: str | None, workdir: Path, pidfile: str | None) -> None:
        self.binary = binary
        self.libs = libs
        self.workdir = workdir
        self.pidfile = pidfile
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._out = workdir / "sink.out"
        self._err = workdir / "sink.err"

    def start(self) -> None:
        env = dict(os.environ)
        if self.libs:
            env["LD_LIBRARY_PATH"] = self.libs
        for _ in range(5):
            self.port = _free_port()
            cmd = [self.binary, "-c", "-4"]
            if os.geteuid() == 0:
                cmd += ["-u", "nobody"]  # smtp-sink refuses to run as root without it
            cmd += [f"127.0.0.1:{self.port}", "1000"]
            with open(self._out, "wb") as out, open(self._err, "wb") as err:
                self.proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    env=env,
                    start_new_session=True,  # Ctrl-C reaches the driver, which stops it
                    preexec_fn=_die_with_parent,
                )
            if self.pidfile:
                Path(self.pidfile).write_text(f"{self.proc.pid}\n")
            if self._wait_listening(5.0):
                return
            self.stop()
        raise BenchError(f"smtp-sink did not start: {self._err.read_text(errors='replace')}")

    def _wait_listening(self, limit: float) -> bool:
        deadline = time.monotonic() + limit
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    greeting = s.recv(512)
                    s.sendall(b"QUIT\r\n")
                    with contextlib.suppress(OSError):
                        s.recv(512)
                if greeting.startswith(b"220"):
                    return True
            except OSError:
                time.sleep(0.05)
        return False

    def received(self) -> int:
        """Messages the sink has taken since it started."""
        text = self._out.read_bytes().decode("ascii", "replace")
        found = re.findall(r"mesg=(\d+)", text)
        return int(found[-1]) if found else 0

    def wait_for(self, expected: int, limit: float = 5.0) -> int:
        """The counter once it reaches ``expected`` (or stops moving for ``limit`` seconds)."""
        deadline = time.monotonic() + limit
        seen = self.received()
        while seen < expected and time.monotonic() < deadline:
            time.sleep(0.05)
            seen = self.received()
        return seen

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout=3)
                except subprocess.TimeoutExpired:
                    _kill_group(self.proc)
            self.proc = None
        if self.pidfile:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.pidfile)


# ---------------------------------------------------------------------- one run


@dataclass
class Run:
    """One sender subprocess: what it said and what the OS and the sink saw."""

    sender: str
    count: int
    rate: float
    elapsed: float
    cpu_us_per_msg: float
    cpu_total_s: float
    maxrss_mb: float
    sink_received: int
    extra: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "rate": round(self.rate, 1),
            "elapsed_s": round(self.elapsed, 4),
            "cpu_us_per_msg": round(self.cpu_us_per_msg, 1),
            "cpu_total_s": round(self.cpu_total_s, 3),
            "maxrss_mb": round(self.maxrss_mb, 1),
            "count": self.count,
            "sink_received": self.sink_received,
            **{k: v for k, v in self.extra.items() if k in ("reactor", "loop")},
        }


def run_child(
    python: str,
    sender: str,
    sink: Sink,
    count: int,
    connections: int,
    timeout: float,
    workdir: Path,
    profile_out: str | None = None,
) -> Run:
    """Run one sender in a fresh subprocess; check the sink received every message."""
    if not sink.alive():
        raise BenchError("smtp-sink has died")
    before = sink.received()
    cmd = [
        python,
        str(SENDERS_PY),
        sender,
        "--port",
        str(sink.port),
        "--count",
        str(count),
        "--connections",
        str(connections),
    ]
    if profile_out:
        cmd += ["--profile-out", profile_out]
    out_path, err_path = workdir / "child.out", workdir / "child.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    try:
        status, rusage = _wait_with_rusage(proc, timeout)
    finally:
        _kill_group(proc)
    stderr = err_path.read_text(errors="replace")
    if status is None:
        raise BenchError(f"{sender}: no result within {timeout:.0f} s (killed)\n{stderr[-2000:]}")
    if status != 0:
        raise BenchError(f"{sender}: exited with status {status}\n{stderr[-3000:]}")
    lines = out_path.read_text().strip().splitlines()
    try:
        report = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError) as e:
        raise BenchError(f"{sender}: no JSON on stdout ({e})\n{stderr[-2000:]}") from e

    received = sink.wait_for(before + count) - before
    if report["sent"] != count or received != count:
        raise BenchError(
            f"{sender}: {count} messages asked, the sender reports {report['sent']} accepted "
            f"and {report['failed']} failed, the sink counted {received}. "
            f"First errors: {report.get('errors')}"
        )
    elapsed = float(report["elapsed"])
    return Run(
        sender=sender,
        count=count,
        rate=count / elapsed,
        elapsed=elapsed,
        cpu_us_per_msg=float(report["cpu"]) / count * 1e6,
        cpu_total_s=rusage.ru_utime + rusage.ru_stime,
        maxrss_mb=rusage.ru_maxrss / 1024,  # KiB on Linux
        sink_received=received,
        extra=report,
    )


def run_counted(
    cmd: list[str],
    *,
    label: str,
    sink: Sink,
    expected: int,
    timeout: float,
    workdir: Path,
    env: dict[str, str],
    name: str,
) -> tuple[float, Any, int, Path]:
    """Run a whole-process sender ``cmd`` and check it: exit 0 and exactly ``expected`` more
    messages at the sink. ``(wall seconds, rusage, messages counted, stdout file)``; its output
    goes to ``workdir/NAME.out`` and ``.err``."""
    before = sink.received()
    out_path, err_path = workdir / f"{name}.out", workdir / f"{name}.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd,
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    try:
        status, rusage = _wait_with_rusage(proc, timeout)
    finally:
        elapsed = time.perf_counter() - t0
        _kill_group(proc)
    tail = (
        out_path.read_text(errors="replace")[-1500:]
        + "\n"
        + err_path.read_text(errors="replace")[-2500:]
    )
    if status is None:
        raise BenchError(f"{label}: not finished within {timeout:.0f} s (killed)\n{tail}")
    if status != 0:
        raise BenchError(f"{label}: exited with status {status}\n{tail}")
    received = sink.wait_for(before + expected, 5.0 if expected else 0.2) - before
    if received != expected:
        raise BenchError(
            f"{label}: exit status 0 but the sink counted {received} messages, "
            f"expected {expected}\n{tail}"
        )
    return elapsed, rusage, received, out_path


def _wait_with_rusage(proc: subprocess.Popen[bytes], timeout: float) -> tuple[int | None, Any]:
    """``(exit status, rusage)`` of the child, or ``(None, None)`` after ``timeout``.

    Returns as the child exits (a pidfd becomes readable then): a whole-process time is the
    child's, not rounded up to a polling step (polling every 0.1 s added 0-100 ms, 50 ms on
    average, to a ~2 s drain: about 2 %, and as much noise between runs).
    """
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # not Linux 5.3+: poll, in steps of at most 2 ms
        pidfd = None
    if pidfd is not None:
        try:
            exited, _, _ = select.select([pidfd], [], [], timeout)
        finally:
            os.close(pidfd)
        if not exited:
            return None, None
        # It has exited: the loop's first wait4 reaps it.
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while True:
        pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            code = os.waitstatus_to_exitcode(status)
            proc.returncode = code
            return code, rusage
        if time.monotonic() > deadline:
            return None, None
        time.sleep(delay)
        delay = min(delay * 2, 0.002)
