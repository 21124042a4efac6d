"""GroupCommit: what is submitted during a commit goes together in the next group, which the
committing thread takes itself."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from twistmail.groupcommit import GroupCommit


class GroupCommitTests(SynchronousTestCase):
    """The thread and the reactor are two lists of calls, run by hand."""

    def setUp(self) -> None:
        self.groups: list[list[str]] = []
        self.thread: list[Callable[[], None]] = []
        self.reactor: list[tuple[Callable[..., None], tuple[Any, ...]]] = []
        self.during_commit: Callable[[], None] | None = None
        self.fail_with: Exception | None = None

        def commit(items: list[str]) -> list[Any]:
            self.groups.append(items)
            if self.during_commit is not None:
                during, self.during_commit = self.during_commit, None
                during()
            if self.fail_with is not None:
                raise self.fail_with
            return [item.upper() for item in items]

        self.group: GroupCommit[str] = GroupCommit(
            commit,
            self.thread.append,
            lambda f, *args: self.reactor.append((f, args)),
            burst=3,
        )

    def run_thread(self) -> None:
        while self.thread:
            self.thread.pop(0)()

    def run_reactor(self) -> None:
        while self.reactor:
            f, args = self.reactor.pop(0)
            f(*args)

    def test_items_submitted_during_a_commit_share_the_next_group_taken_by_the_thread(
        self,
    ) -> None:
        first = self.group.submit("a")
        later: list[defer.Deferred[Any]] = []
        self.during_commit = lambda: later.extend([self.group.submit("b"), self.group.submit("c")])
        self.assertEqual(len(self.thread), 1)  # one start for the thread, not one per item
        self.thread.pop(0)()
        # The thread took the second group at once: the reactor has not run in between.
        self.assertEqual(self.groups, [["a"], ["b", "c"]])
        idle = self.group.idle()
        self.assertNoResult(first)
        self.assertNoResult(idle)
        self.run_reactor()
        self.assertEqual(self.successResultOf(first), "A")
        self.assertEqual([self.successResultOf(d) for d in later], ["B", "C"])
        self.assertEqual(self.group.commits, 2)
        self.successResultOf(idle)

    def test_after_a_burst_of_groups_the_thread_lets_other_work_go_first(self) -> None:
        def more(n: int) -> Callable[[], None]:
            def submit() -> None:
                self.group.submit(str(n))
                if n < 5:
                    self.during_commit = more(n + 1)

            return submit

        self.group.submit("0")
        self.during_commit = more(1)
        self.thread.pop(0)()
        self.assertEqual(self.groups, [["0"], ["1"], ["2"]])  # burst=3
        self.assertEqual(len(self.thread), 1)  # queued again, behind whatever waits
        self.run_thread()
        self.assertEqual(self.groups, [["0"], ["1"], ["2"], ["3"], ["4"], ["5"]])
        self.run_reactor()
        self.assertEqual(self.group.commits, 6)
        self.successResultOf(self.group.idle())
        self.group.submit("again")
        self.assertEqual(len(self.thread), 1)  # the thread had stopped: started again

    def test_a_failed_commit_fails_its_whole_group_and_counts_nothing(self) -> None:
        first, second = self.group.submit("a"), self.group.submit("b")
        self.fail_with = RuntimeError("disk full")
        self.run_thread()
        self.run_reactor()
        self.failureResultOf(first, RuntimeError)
        self.failureResultOf(second, RuntimeError)
        self.assertEqual(self.group.commits, 0)
        self.successResultOf(self.group.idle())
        self.fail_with = None
        third = self.group.submit("c")
        self.run_thread()
        self.run_reactor()
        self.assertEqual(self.successResultOf(third), "C")

    def test_what_a_waiter_submits_joins_a_later_group_and_idle_waits_for_it(self) -> None:
        later: list[defer.Deferred[Any]] = []
        self.group.submit("a").addCallback(lambda _: later.append(self.group.submit("x")))
        self.group.submit("b")
        self.run_thread()
        idle = self.group.idle()
        self.run_reactor()
        self.assertNoResult(idle)  # "x" is still to be committed
        self.run_thread()
        self.run_reactor()
        self.assertEqual(self.groups, [["a", "b"], ["x"]])
        self.assertEqual(self.successResultOf(later[0]), "X")
        self.successResultOf(idle)

    def test_idle_with_nothing_submitted_fires_at_once(self) -> None:
        self.successResultOf(self.group.idle())
