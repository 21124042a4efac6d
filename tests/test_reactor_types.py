"""The reactor type (``twistmail._twisted.Reactor``) takes real and memory reactors (per mypy)."""

from __future__ import annotations

from pathlib import Path

from mypy import api

HERE = Path(__file__).resolve().parent


def test_reactor_parameters_type_check() -> None:
    stdout, stderr, status = api.run(
        [
            "--config-file",
            str(HERE.parent / "pyproject.toml"),
            "--cache-dir",
            str(HERE.parent / ".mypy_cache"),
            str(HERE / "reactor_types.py"),
        ]
    )
    assert status == 0, stdout + stderr
    assert "Success" in stdout
