"""The garbage-collector settings of twistmail's own processes (``twistmail._heap``)."""

from __future__ import annotations

import gc
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from twistmail._heap import YOUNG_THRESHOLD, hold, resume, settle
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


def test_resume_restarts_only_what_hold_stopped() -> None:
    assert gc.isenabled()
    try:
        hold()
        assert not gc.isenabled()
        resume()
        assert gc.isenabled()
        gc.disable()  # the embedding program's choice: hold and resume leave it alone
        hold()
        resume()
        assert not gc.isenabled()
    finally:
        gc.enable()


# `python -m twistmail ARGS`, counting the collections made once twistmail's entry point has
# started (it imports twistmail._heap first) and before the heap is settled (frozen).
_MAIN_PROBE = """
import atexit, gc, runpy, sys
early = []
def count(phase, info):
    if phase == "start" and "twistmail._heap" in sys.modules and not gc.get_freeze_count():
        early.append(info["generation"])
gc.callbacks.append(count)
atexit.register(lambda: print("early", len(early), "enabled", gc.isenabled()))
sys.argv = ["twistmail", *sys.argv[1:]]
runpy.run_module("twistmail", run_name="__main__")
"""


def _main_probe(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", _MAIN_PROBE, *args], capture_output=True, text=True, timeout=60
    )
    return done.stdout.splitlines()[-1]


async def test_a_drain_collects_nothing_before_its_heap_is_settled(tmp_path: Path) -> None:
    # Start-up's objects live as long as the process: collecting them costs ~30 ms of a
    # one-message drain. Once settled, the drain collects (young objects) as usual.
    spool = tmp_path / "empty.db"
    await (await SqliteQueue.open(spool)).close()
    out = _main_probe("drain", "--spool", str(spool), "--smtp", "smtp://127.0.0.1:9")
    assert out == "early 0 enabled True"


async def test_a_command_that_never_settles_collects_as_usual(tmp_path: Path) -> None:
    # These run no reactor, so nothing settles their heap: the entry point's hold must end.
    spool = tmp_path / "empty.db"
    await (await SqliteQueue.open(spool)).close()
    out = _main_probe("users", "list", "--users-file", str(tmp_path / "users"))
    assert out.endswith(" enabled True"), out
    out = _main_probe("drain", "--spool", str(spool), "--status")
    assert out.endswith(" enabled True"), out
