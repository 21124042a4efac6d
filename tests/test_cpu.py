"""twistmail._cpu: a batch command's interpreter kept on one CPU, its signing threads on all.

Each check runs in a child process: holding to one CPU is for the rest of a process's life.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs a process allowed on two CPUs or more (Linux)",
)


def run(script: str, **env: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )
    assert done.returncode == 0, done.stderr
    return done


def test_held_the_thread_and_those_it_starts_stay_on_its_cpu_signing_threads_do_not() -> None:
    done = run(
        "import os, threading\n"
        "from twistmail import _cpu\n"
        "from twistmail.mailer import signing_threads\n"
        "every = os.sched_getaffinity(0)\n"
        "assert _cpu.hold_to_one_cpu()\n"
        "held = os.sched_getaffinity(0)\n"
        "assert len(held) == 1 and held <= every, held\n"
        "assert held == {_cpu._current_cpu()}\n"
        "seen = {}\n"
        "def started():\n"
        "    seen['started'] = os.sched_getaffinity(0)\n"
        "def signer():\n"
        "    _cpu.on_every_cpu()\n"
        "    seen['signer'] = os.sched_getaffinity(0)\n"
        "for target in (started, signer):\n"
        "    t = threading.Thread(target=target); t.start(); t.join()\n"
        "assert seen['started'] == held, seen\n"
        "assert seen['signer'] == every, seen\n"
        "assert _cpu.cpus() == len(every)\n"
        "assert signing_threads(None) == len(every)\n"
        "print('ok')\n"
    )
    assert done.stdout.strip() == "ok"


@pytest.mark.parametrize("off", ["0", "false", "No", " off "])
def test_twistmail_one_cpu_off_leaves_the_process_on_every_cpu(off: str) -> None:
    done = run(
        "import os\n"
        "from twistmail import _cpu\n"
        "every = os.sched_getaffinity(0)\n"
        "assert not _cpu.hold_to_one_cpu()\n"
        "assert os.sched_getaffinity(0) == every\n"
        "print('ok')\n",
        TWISTMAIL_ONE_CPU=off,
    )
    assert done.stdout.strip() == "ok"


@pytest.mark.parametrize("one_cpu", [True, False])
def test_a_batch_command_runs_on_one_cpu_and_the_long_running_ones_on_all(one_cpu: bool) -> None:
    # send and drain run under _react_exit(..., one_cpu=True); worker and bounces without.
    done = run(
        "import os, sys\n"
        "from twisted.internet import defer\n"
        "from twistmail.cli import _react_exit\n"
        "every = len(os.sched_getaffinity(0))\n"
        "def command(reactor):\n"
        "    print(len(os.sched_getaffinity(0)), every)\n"
        "    return defer.succeed(0)\n"
        f"_react_exit(command, one_cpu={one_cpu})\n"
    )
    held, every = map(int, done.stdout.split())
    assert held == (1 if one_cpu else every)
