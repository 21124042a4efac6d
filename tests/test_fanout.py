"""fan_out: N cooperative workers over shared work, on a task.Clock."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from twistmail.fanout import fan_out


class FanOutTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.pending: list[defer.Deferred[None]] = []
        self.items = iter(range(10))
        self.cancelled: list[defer.Deferred[None]] = []

    def work(self) -> Iterator[defer.Deferred[Any] | None]:
        for _ in self.items:  # the iterator is shared: each item is taken once
            d: defer.Deferred[None] = defer.Deferred(self.cancelled.append)
            self.pending.append(d)
            yield d

    def spin(self) -> None:
        for _ in range(5):
            self.clock.advance(0)

    def test_at_most_n_in_flight_and_every_item_once(self) -> None:
        done = fan_out(self.clock, self.work, 3)
        finished = 0
        while True:
            self.spin()
            live = [d for d in self.pending if not d.called]
            self.assertLessEqual(len(live), 3)
            if not live:
                break
            live[0].callback(None)
            finished += 1
        self.spin()
        self.successResultOf(done)
        self.assertEqual(finished, 10)
        self.assertEqual(len(self.pending), 10)

    def test_first_failure_is_passed_on_and_the_rest_stop(self) -> None:
        done = fan_out(self.clock, self.work, 3)
        self.spin()
        self.assertEqual(len(self.pending), 3)
        self.pending[1].errback(RuntimeError("boom"))
        self.spin()
        self.failureResultOf(done, RuntimeError)
        self.pending[0].errback(RuntimeError("late"))  # no unhandled error, no double completion
        self.pending[2].callback(None)
        self.spin()
        self.assertEqual(len(self.pending), 3)  # nothing more was started

    def test_cancel_cancels_what_workers_wait_on(self) -> None:
        done = fan_out(self.clock, self.work, 3)
        self.spin()
        done.cancel()
        self.failureResultOf(done, defer.CancelledError)
        self.assertCountEqual(self.cancelled, self.pending)
        self.spin()
        self.assertEqual(len(self.pending), 3)
