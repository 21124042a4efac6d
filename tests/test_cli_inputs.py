"""The CLI's answers to inputs that cannot be used: one clear line and exit 2, never a traceback
(issue 12, sections 3 to 5). Each runs ``python -m twistmail`` as a subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

TEMPLATE = (
    "From: shop@example.com\nTo: {{ name|mailbox(email) }}\nSubject: hi\n\nHello {{ name }}\n"
)


def twistmail(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "twistmail", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def campaign(tmp_path: Path, template: str = TEMPLATE, rows: str = "") -> tuple[str, str]:
    csv_path = tmp_path / "people.csv"
    csv_path.write_text(
        rows or 'email,name\nann@example.org,"Doe, Ann"\nbob@example.org,Bob\n', encoding="utf-8"
    )
    template_path = tmp_path / "message.txt"
    template_path.write_text(template, encoding="utf-8")
    return str(csv_path), str(template_path)


def assert_one_clear_line(proc: subprocess.CompletedProcess[str], *expected: str) -> None:
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert "Traceback" not in output
    assert "Errno" not in output
    (line,) = [line for line in output.splitlines() if line.startswith("error:")]
    for text in expected:
        assert text in line


def test_an_unknown_filter_in_the_body_is_a_template_error_exit_2(tmp_path: Path) -> None:
    csv_path, template_path = campaign(tmp_path, TEMPLATE + "{{ name|shout }}\n")
    for command in ("check", "preview"):
        proc = twistmail(command, csv_path, template_path)
        assert_one_clear_line(proc, "message.txt, line 6: No filter named 'shout'")
    proc = twistmail("send", csv_path, template_path, "--smtp", "smtp://127.0.0.1:1")
    assert_one_clear_line(proc, "line 6: No filter named 'shout'")


def test_a_missing_csv_is_one_clear_line(tmp_path: Path) -> None:
    _, template_path = campaign(tmp_path)
    missing = str(tmp_path / "nope.csv")
    expected = f"{missing}: cannot read the recipients CSV: No such file or directory"
    for args in (
        ["check", missing, template_path],
        ["preview", missing, template_path],
        ["send", missing, template_path, "--smtp", "smtp://127.0.0.1:1"],
    ):
        assert_one_clear_line(twistmail(*args), expected)
    assert not (tmp_path / "nope.journal.db").exists()


def test_check_lists_duplicate_addresses_with_their_rows(tmp_path: Path) -> None:
    csv_path, template_path = campaign(
        tmp_path,
        rows=(
            "email,name\n"
            "ann@example.org,Ann\n"
            "bob@example.org,Bob\n"
            "ANN@Example.ORG,Ann again\n"
            "bob@example.org,Bob\n"
        ),
    )
    proc = twistmail("check", csv_path, template_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert "row 3: duplicate of row 1: ANN@Example.ORG" in lines
    assert "row 4: duplicate of row 2: bob@example.org" in lines
    assert "2 row(s) repeat the address of an earlier row" in lines


def test_insecure_prints_a_warning(tmp_path: Path) -> None:
    csv_path, template_path = campaign(tmp_path)
    proc = twistmail(
        "send", csv_path, template_path, "--smtp", "smtp://127.0.0.1:1", "--insecure", "--dry-run"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "warning: --insecure" in proc.stderr
    quiet = twistmail("send", csv_path, template_path, "--smtp", "smtp://127.0.0.1:1", "--dry-run")
    assert "warning" not in quiet.stderr


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--timeout", "abc", "expected a positive number of seconds, got 'abc'"),
        ("--timeout", "-1", "expected a positive number of seconds, got '-1'"),
        ("--retry-delay", "nan", "expected a positive number of seconds, got 'nan'"),
        ("--rate", "fast", "expected a positive number of messages per second, got 'fast'"),
        ("--concurrency", "ten", "expected a whole number of at least 1, got 'ten'"),
        ("--max-attempts", "0", "expected a whole number of at least 1, got '0'"),
    ],
)
def test_numeric_options_say_what_they_expect(
    tmp_path: Path, option: str, value: str, expected: str
) -> None:
    proc = twistmail("send", "a.csv", "m.txt", "--smtp", "smtp://127.0.0.1:1", option, value)
    assert proc.returncode == 2
    assert f"argument {option}: {expected}" in proc.stderr


def test_capture_on_a_port_in_use_is_one_clear_line() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = twistmail("capture", "--port", str(port))
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"error: cannot listen on 127.0.0.1:{port}: Address already in use"
    )
    assert "Traceback" not in proc.stdout + proc.stderr


def test_capture_port_must_be_a_port() -> None:
    proc = twistmail("capture", "--port", "70000")
    assert proc.returncode == 2
    assert "expected a port number from 0 to 65535, got '70000'" in proc.stderr


def test_status_and_check_help_document_their_exit_status() -> None:
    for command in ("status", "check"):
        proc = twistmail(command, "--help")
        assert proc.returncode == 0
        text = " ".join(proc.stdout.split())
        assert "exit status: 0" in text
        assert "2 the" in text
