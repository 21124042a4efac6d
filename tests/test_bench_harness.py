"""The benchmark driver's own measuring (``scripts/benchlib``): what it times is the child's."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from benchlib import runner


def child(seconds: float) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"])


def test_a_whole_process_wait_ends_when_the_child_exits_not_at_a_polling_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Polling in steps growing to 0.1 s added up to 100 ms to each whole-process time.
    def no_polling(_: float) -> None:
        raise AssertionError("polled")

    monkeypatch.setattr(runner.time, "sleep", no_polling)
    proc = child(0.05)
    status, rusage = runner._wait_with_rusage(proc, 30.0)
    assert status == 0
    assert proc.returncode == 0
    assert rusage.ru_maxrss > 0


def test_a_whole_process_wait_gives_up_after_its_timeout() -> None:
    proc = child(30)
    try:
        started = time.monotonic()
        assert runner._wait_with_rusage(proc, 0.2) == (None, None)
        assert time.monotonic() - started < 10
    finally:
        proc.kill()
        proc.wait()
