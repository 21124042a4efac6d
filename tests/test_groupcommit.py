"""GroupCommit: what is submitted during a commit goes together in the next group."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from twistmail.groupcommit import GroupCommit


class GroupCommitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.groups: list[tuple[list[str], defer.Deferred[list[Any]]]] = []

        def commit(items: list[str]) -> defer.Deferred[list[Any]]:
            d: defer.Deferred[list[Any]] = defer.Deferred()
            self.groups.append((items, d))
            return d

        self.group: GroupCommit[str] = GroupCommit(commit)

    def test_items_submitted_during_a_commit_share_the_next_group(self) -> None:
        first = self.group.submit("a")
        second, third = self.group.submit("b"), self.group.submit("c")
        self.assertEqual([items for items, _ in self.groups], [["a"]])
        self.groups[0][1].callback(["A"])
        self.assertEqual(self.successResultOf(first), "A")
        self.assertEqual([items for items, _ in self.groups], [["a"], ["b", "c"]])
        idle = self.group.idle()
        self.assertNoResult(idle)
        self.groups[1][1].callback(["B", "C"])
        self.assertEqual((self.successResultOf(second), self.successResultOf(third)), ("B", "C"))
        self.assertEqual(self.group.commits, 2)
        self.successResultOf(idle)

    def test_a_failed_commit_fails_its_whole_group_and_counts_nothing(self) -> None:
        first, second = self.group.submit("a"), self.group.submit("b")
        self.groups[0][1].errback(RuntimeError("disk full"))
        self.failureResultOf(first, RuntimeError)
        self.groups[1][1].errback(RuntimeError("disk full"))
        self.failureResultOf(second, RuntimeError)
        self.assertEqual(self.group.commits, 0)
        self.successResultOf(self.group.idle())

    def test_what_a_waiter_submits_joins_the_next_group(self) -> None:
        later: list[defer.Deferred[Any]] = []
        self.group.submit("a").addCallback(lambda _: later.append(self.group.submit("x")))
        self.group.submit("b")
        self.groups[0][1].callback([1])
        self.assertEqual([items for items, _ in self.groups], [["a"], ["b", "x"]])
