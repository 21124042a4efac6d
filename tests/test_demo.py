"""The README's first command: the demo sends to the built-in capture server and checks it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_runs_end_to_end_as_a_subprocess() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "twistmail.demo", "30"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "sent 30 of 30 messages" in proc.stdout
    assert "the capture server received 30" in proc.stdout
    assert "first message: MAIL FROM:<demo@example.com> RCPT TO:<user0@example.org>\n" in (
        proc.stdout
    )
    assert "Subject: Hello #0 =?utf-8?" in proc.stdout  # non-ASCII subject RFC 2047-encoded


def test_readme_library_example_runs() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "library.py")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["True 250 Delivery in progress", "1000 sent, 0 failed"]


def test_readme_shows_the_library_example_verbatim() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    example = (ROOT / "examples" / "library.py").read_text(encoding="utf-8")
    body = example.split('"""\n', 2)[-1].strip()
    assert body in readme


def test_readme_first_command_runs_the_example_campaign() -> None:
    env = {**os.environ, "TWISTMAIL_VENV": sys.prefix}
    proc = subprocess.run(
        [str(ROOT / "scripts" / "demo")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "report: examples/out/report.csv (4 rows)" in proc.stdout
    assert "capture server listening on 127.0.0.1:" in proc.stdout
    report = (ROOT / "examples" / "out" / "report.csv").read_text(encoding="utf-8")
    assert report.count(",sent,") == 4
