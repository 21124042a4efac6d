"""The relay run as the real ``twistd twistmail`` in a subprocess, for tests that talk to it with
smtplib (and so must not run a reactor in the test's own thread)."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
_LISTENING = re.compile(r"SMTP submission listening on [^:]+:(\d+)")


class RelayProcess:
    """``twistd -n twistmail`` relaying to ``127.0.0.1:upstream_port`` from ``queue_path`` (or
    the ``queue_url``, run in ``queue_path``'s directory).

    :attr:`port` is the submission port (the OS picks it); :attr:`lines` every log line so far.
    """

    def __init__(
        self,
        queue_path: Path,
        upstream_port: int,
        *options: str,
        http: str = "none",
        port: int = 0,
        interface: str = "127.0.0.1",
        queue_url: str | None = None,
    ) -> None:
        self.queue_path = queue_path
        self.argv = [
            *TWISTD,
            "-n",
            "--pidfile=",
            "twistmail",
            "--smtp",
            f"smtp://127.0.0.1:{upstream_port}",
            "--queue",
            queue_url or f"sqlite:{queue_path}",
            "--submission",
            f"tcp:{port}:interface={interface}",
            "--http",
            http,
            "--hostname",
            "relay.test",
            *options,
        ]
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.port = 0
        self.process: subprocess.Popen[str] | None = None

    def start(self, timeout: float = 30.0) -> RelayProcess:
        """Start it and wait until it listens (or fail with its output)."""
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(
            self.argv,
            cwd=self.queue_path.parent,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        threading.Thread(target=self._read, args=(self.process,), daemon=True).start()
        line = self.wait_for(_LISTENING, timeout)
        match = _LISTENING.search(line)
        assert match is not None
        self.port = int(match.group(1))
        return self

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: re.Pattern[str] | str, timeout: float = 30.0) -> str:
        """The first log line (from now on, or already seen) matching ``pattern``."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        for line in self.lines:
            if regex.search(line):
                return line
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = self._queue.get(timeout=max(0.01, remaining))
            except queue.Empty:
                line = None
                remaining = 0
            if line is None:
                if remaining <= 0 or self.process is None or self.process.poll() is not None:
                    raise AssertionError(
                        f"no log line matching {regex.pattern!r}; output:\n" + "\n".join(self.lines)
                    )
                continue
            self.lines.append(line)
            if regex.search(line):
                return line

    def count(self, pattern: str) -> int:
        """How many log lines seen so far match ``pattern``."""
        self._drain()
        regex = re.compile(pattern)
        return sum(1 for line in self.lines if regex.search(line))

    def _drain(self) -> None:
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                return
            if line is not None:
                self.lines.append(line)

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait(self, timeout: float = 60.0) -> int:
        """Wait for the process to exit; its status."""
        assert self.process is not None
        code = self.process.wait(timeout)
        time.sleep(0)  # let the reader thread queue the last lines
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=0.5)
            except queue.Empty:
                break
            if line is None:
                break
            self.lines.append(line)
        return code

    def stop(self) -> int:
        """SIGTERM, then wait; the exit status (SIGKILL if it hangs)."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.signal(signal.SIGTERM)
        try:
            return self.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.wait(10)

    def __enter__(self) -> RelayProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
