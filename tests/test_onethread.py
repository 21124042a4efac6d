"""twistmail._onethread.OneThread: Twisted's ThreadPool contract with one thread."""

from __future__ import annotations

import threading
from typing import Any

from twisted.python.failure import Failure

from twistmail._onethread import OneThread


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
