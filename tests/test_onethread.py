"""twistmail._onethread.OneThread: Twisted's ThreadPool contract with one thread."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from typing import Any

import pytest
from twisted.python.failure import Failure

from twistmail._onethread import OneThread, run_in_background


def test_jobs_run_in_order_on_one_named_thread_and_report_results() -> None:
    pool = OneThread("twistmail-test")
    results: list[tuple[bool, Any, str]] = []

    def on_result(ok: bool, result: Any) -> None:
        results.append((ok, result, threading.current_thread().name))

    def boom() -> None:
        raise ValueError("boom")

    pool.callInThreadWithCallback(on_result, lambda: 1)  # queued before start: waits for it
    pool.start()
    for n in (2, 3):
        pool.callInThreadWithCallback(on_result, lambda n=n: n)
    pool.callInThreadWithCallback(on_result, boom)
    ran = threading.Event()
    pool.callInThread(ran.set)
    pool.stop()  # runs what is queued, then joins
    assert ran.is_set()
    assert [r[1] for r in results[:3]] == [1, 2, 3]
    assert all(ok for ok, _, _ in results[:3])
    ok, failure, _ = results[3]
    assert not ok
    assert isinstance(failure, Failure)
    assert failure.check(ValueError)
    assert {name for _, _, name in results} == {"PoolThread-twistmail-test-1"}
    assert not [t for t in threading.enumerate() if "twistmail-test" in t.name]

    pool.callInThreadWithCallback(on_result, lambda: 4)  # after stop: dropped
    assert len(results) == 4


def policy_of_a_pool_thread() -> int:
    pool = OneThread("twistmail-policy")
    pool.start()
    seen: list[int] = []
    pool.callInThread(lambda: seen.append(os.sched_getscheduler(0)))
    pool.stop()
    return seen[0]


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="Linux scheduling policies")
def test_threads_are_background_work_only_where_the_process_says_so() -> None:
    # A library user's threads keep the default policy; a command's are SCHED_BATCH, so that
    # waking one does not preempt the reactor thread that holds the interpreter lock.
    assert policy_of_a_pool_thread() == os.SCHED_OTHER
    run_in_background()
    try:
        assert policy_of_a_pool_thread() == os.SCHED_BATCH
    finally:
        run_in_background(False)
    assert policy_of_a_pool_thread() == os.SCHED_OTHER


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="Linux scheduling policies")
def test_the_commands_run_their_store_threads_in_the_background() -> None:
    script = (
        "import os\n"
        "from twisted.internet import defer\n"
        "from twistmail.cli import _react_exit\n"
        "from twistmail._onethread import OneThread\n"
        "def command(reactor):\n"
        "    pool = OneThread('twistmail-policy')\n"
        "    pool.start()\n"
        "    d = defer.Deferred()\n"
        "    pool.callInThreadWithCallback(\n"
        "        lambda ok, policy: reactor.callFromThread(d.callback, policy),\n"
        "        os.sched_getscheduler, 0)\n"
        "    def done(policy):\n"
        "        pool.stop()\n"
        "        return 0 if policy == os.SCHED_BATCH else 3\n"
        "    return d.addCallback(done)\n"
        "_react_exit(command)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
