"""The garbage-collector settings of twistmail's own processes (``twistmail._heap``)."""

from __future__ import annotations

import gc
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from twistmail._heap import YOUNG_THRESHOLD, settle
from twistmail.queue.sqlite import SqliteQueue


@pytest.fixture
def restored_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


def test_settle_freezes_start_up_objects_and_collects_the_young_less_often(
    restored_gc: None,
) -> None:
    gc.unfreeze()
    middle, old = gc.get_threshold()[1:]
    settle()
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == (YOUNG_THRESHOLD, middle, old)


# The commands' process: what ``twistmail drain`` runs under once its reactor is up.
_PROBE = """
import atexit, gc, sys
from twistmail import cli
atexit.register(lambda: print("gc", gc.get_freeze_count() > 0, gc.get_threshold()[0]))
cli.main(sys.argv[1:])
"""


async def test_a_command_settles_its_heap_before_its_work(tmp_path: Path) -> None:
    spool = tmp_path / "empty.db"
    await (await SqliteQueue.open(spool)).close()  # a spool with nothing to send
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _PROBE,
            "drain",
            "--spool",
            str(spool),
            "--smtp",
            "smtp://127.0.0.1:9",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert f"gc True {YOUNG_THRESHOLD}" in done.stdout
