"""The one delivery loop on a MemoryReactorClock: the duplicate bound, recording, untried
attempts and server-level refusals, with the server played by the test (no real time)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from test_mailer_clock import FakeServer
from twisted.internet import defer
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from twistmail.engine import DeliveryLoop, Job
from twistmail.errors import AuthenticationError
from twistmail.mailer import Mailer
from twistmail.message import envelope_from_bytes
from twistmail.retry import Plan, RetryPolicy
from twistmail.smtp._transaction import TransactionResult

DATA = b"Subject: x\r\n\r\nhi\r\n"
ENVELOPE_OK = b"250 ok\r\n250 ok\r\n354 go\r\n"


def make_jobs(n: int) -> list[Job]:
    return [Job(envelope_from_bytes("a@example.com", [f"u{i}@x.org"], DATA)) for i in range(n)]


class ListDoor:
    """Jobs from a list; every outcome "committed" only when the test says so."""

    def __init__(self, jobs: list[Job], record: Callable[[Job, Plan], Any] | None = None) -> None:
        self.jobs = list(jobs)
        self.outcomes: list[tuple[Job, Plan]] = []
        self.commits: list[defer.Deferred[None]] = []
        self.put_backs: list[Job] = []
        self._record = record

    def next_job(self) -> Job | None:
        return self.jobs.pop(0) if self.jobs else None

    def wake_in(self) -> float | None:
        return 0.0 if self.jobs else None

    def record(self, job: Job, outcome: Plan) -> defer.Deferred[None]:
        if self._record is not None:
            return self._record(job, outcome)  # type: ignore[no-any-return]
        d: defer.Deferred[None] = defer.Deferred()
        self.outcomes.append((job, outcome))
        self.commits.append(d)
        return d

    def put_back(self, job: Job) -> None:
        self.put_backs.append(job)
        self.jobs.insert(0, job)

    def commit_all(self) -> None:
        for d in self.commits:
            if not d.called:
                d.callback(None)


def loop_on_clock(
    n: int, *, concurrency: int = 1, bound: int | None = 1, **options: Any
) -> tuple[MemoryReactorClock, Mailer, ListDoor, DeliveryLoop, defer.Deferred[None]]:
    reactor = MemoryReactorClock()
    mailer = Mailer("smtp://127.0.0.1:2525", concurrency=concurrency, reactor=reactor)
    door = ListDoor(make_jobs(n))
    policy = RetryPolicy(max_attempts=3, initial_delay=10.0, jitter=0.0)
    loop = DeliveryLoop(mailer, door, policy, clock=reactor, hold_bodies=bound, **options)
    return reactor, mailer, door, loop, loop.start()


def test_a_body_waits_until_the_earlier_delivered_message_is_committed() -> None:
    reactor, _, door, _, done = loop_on_clock(3, bound=1)
    server = FakeServer(reactor, 0)
    server.handshake()
    assert b"RCPT TO:<u0@x.org>" in server.take()
    server.say(ENVELOPE_OK)  # u0's data is wanted: nothing is at risk yet, so it goes
    sent = server.take()
    assert sent.startswith(b"Subject: x\r\n\r\nhi\r\n.\r\n")
    assert b"RCPT TO:<u1@x.org>" in sent  # the next envelope is pipelined with it
    server.say(b"250 queued\r\n" + ENVELOPE_OK)  # u0 taken; u1's data wanted
    assert len(door.outcomes) == 1
    assert door.outcomes[0][1].state == "sent"
    # u0's outcome is not committed: u1's data waits, whatever the time.
    assert server.take() == b""
    reactor.advance(100)
    assert server.take() == b""
    door.commits[0].callback(None)
    assert server.take().startswith(b"Subject: x\r\n\r\nhi\r\n.\r\n")
    server.say(b"250 queued\r\n" + ENVELOPE_OK)
    door.commit_all()
    server.take()
    server.say(b"250 queued\r\n")
    door.commit_all()
    assert [plan.state for _, plan in door.outcomes] == ["sent", "sent", "sent"]
    assert done.called


def test_without_a_bound_bodies_go_at_once() -> None:
    reactor, _, _door, _, _done = loop_on_clock(2, bound=None)
    server = FakeServer(reactor, 0)
    server.handshake()
    server.take()
    server.say(ENVELOPE_OK)
    server.take()
    server.say(b"250 queued\r\n" + ENVELOPE_OK)
    assert server.take().startswith(b"Subject: x")  # no commit needed before the next body


def test_a_failed_record_fails_the_loop_and_drops_the_held_message() -> None:
    reactor, _, door, _, done = loop_on_clock(3, bound=1)
    server = FakeServer(reactor, 0)
    server.handshake()
    server.take()
    server.say(ENVELOPE_OK)
    server.take()
    server.say(b"250 queued\r\n" + ENVELOPE_OK)  # u1's data held
    door.commits[0].errback(OSError("disk full"))
    failure = Failure(done.result) if not isinstance(done.result, Failure) else done.result
    done.addErrback(lambda _: None)
    assert failure.check(OSError)
    # The connection with u1's data held back is dropped: the server discards the message.
    assert server.transport.disconnecting


def test_no_new_job_while_outcomes_wait_for_their_commit_at_the_cap() -> None:
    reactor, _, door, _loop, _done = loop_on_clock(20, bound=1, max_recording=2)
    server = FakeServer(reactor, 0)
    server.handshake()
    refused = b"550 5.7.1 not from you\r\n550 no\r\n554 no valid recipients\r\n"
    server.take()
    server.say(refused)
    assert b"RSET" in server.take()
    server.say(b"250 reset\r\n" + refused)
    assert len(door.outcomes) == 2
    taken = 20 - len(door.jobs)
    reactor.advance(100)
    assert 20 - len(door.jobs) == taken  # nothing more read while two outcomes wait
    door.commit_all()
    assert 20 - len(door.jobs) > taken
    assert all(plan.state == "failed" for _, plan in door.outcomes)


def test_a_record_that_raises_fails_the_loop() -> None:
    reactor = MemoryReactorClock()
    mailer = Mailer("smtp://127.0.0.1:2525", concurrency=1, reactor=reactor)

    def refuse(job: Job, outcome: Plan) -> defer.Deferred[None]:
        raise RuntimeError("the journal is closed")

    door = ListDoor(make_jobs(3), refuse)
    done = DeliveryLoop(mailer, door, None, clock=reactor, hold_bodies=1).start()
    server = FakeServer(reactor, 0)
    server.handshake()
    server.take()
    server.say(ENVELOPE_OK)
    server.take()
    server.say(b"250 queued\r\n")
    failure = done.result
    done.addErrback(lambda _: None)
    assert isinstance(failure, Failure)
    assert failure.check(RuntimeError)


def test_messages_queued_on_a_connection_that_broke_are_put_back_uncounted() -> None:
    reactor, _mailer, door, _, _done = loop_on_clock(4, bound=None)
    server = FakeServer(reactor, 0)
    server.handshake()
    server.take()
    server.say(ENVELOPE_OK)
    server.take()
    server.say(b"250 queued\r\n")  # u0 delivered; u1's envelope written, u2 not yet
    server.drop()
    # u1 reached the server (its commands were written): one attempt, deferred.
    # The others never did: given back, no attempt counted.
    attempts = {str(job.envelope.recipients[0]): job.attempts for job in door.put_backs}
    assert attempts
    assert all(count == 0 for count in attempts.values())
    assert "u1@x.org" not in attempts
    states = {str(job.envelope.recipients[0]): plan.state for job, plan in door.outcomes}
    assert states == {"u0@x.org": "sent", "u1@x.org": "deferred"}


def test_a_refused_login_stops_the_loop_without_spending_an_attempt() -> None:
    reactor = MemoryReactorClock()
    mailer = Mailer("smtp://bob@127.0.0.1:2525", password="wrong", concurrency=1, reactor=reactor)
    door = ListDoor(make_jobs(5))
    loop = DeliveryLoop(mailer, door, RetryPolicy(), clock=reactor, hold_bodies=1)
    done = loop.start()
    server = FakeServer(reactor, 0)
    server.say(b"220 mx ESMTP\r\n")
    server.take()
    server.say(b"250-mx\r\n250 AUTH PLAIN\r\n")
    assert server.take().startswith(b"AUTH PLAIN")
    server.say(b"535 5.7.8 bad credentials\r\n")
    server.take()  # Twisted's client tries PLAIN once more (without an initial response)
    server.say(b"535 5.7.8 bad credentials\r\n")
    assert server.transport.disconnecting
    server.drop()
    assert done.called
    assert isinstance(loop.stopped_by, AuthenticationError)
    assert door.outcomes == []
    assert all(job.attempts == 0 for job in door.put_backs)
    assert len(reactor.tcpClients) == 1  # one connection, not one per message


def test_an_unreachable_server_pauses_with_backoff_then_stops_after_patience() -> None:
    reactor, _mailer, door, loop, done = loop_on_clock(5, bound=1, patience=7.0)
    connector = reactor.tcpClients[0][2]
    attempts_at: list[float] = []

    def refuse_all() -> None:
        while len(attempts_at) < len(reactor.tcpClients):
            index = len(attempts_at)
            attempts_at.append(reactor.seconds())
            factory = reactor.tcpClients[index][2]
            factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))

    assert connector is not None
    refuse_all()
    for _ in range(40):
        reactor.advance(0.5)
        refuse_all()
    assert done.called
    assert loop.stopped_by is not None
    assert "could not connect" in str(loop.stopped_by)
    assert door.outcomes == []  # no attempt spent on any message
    # At most one connection per backoff step (1, 2, 4 s ... of the loop, the pool's breaker
    # may refuse at once in between), never one per message or per reactor turn.
    assert 2 <= len(attempts_at) <= 4
    gaps = [b - a for a, b in itertools.pairwise(attempts_at)]
    assert all(gap >= 0.9 for gap in gaps)
    assert gaps == sorted(gaps)


def test_a_message_refused_before_sending_fails_instead_of_coming_back_for_ever() -> None:
    # The server's SIZE is too small for the message: refused locally, never written (so not
    # attempted), but about the message, not the server: it fails, it is not given back.
    reactor, _, door, _, done = loop_on_clock(1, bound=None)
    server = FakeServer(reactor, 0)
    server.say(b"220 mx ESMTP\r\n")
    server.take()
    server.say(b"250-mx\r\n250-PIPELINING\r\n250 SIZE 5\r\n")
    door.commit_all()
    assert done.called
    assert door.put_backs == []
    ((_, outcome),) = door.outcomes
    assert outcome.state == "failed"
    assert outcome.code == 552


def test_stop_lets_the_messages_in_flight_finish_whatever_the_time() -> None:
    reactor, _, door, loop, done = loop_on_clock(5, bound=None)
    server = FakeServer(reactor, 0)
    server.handshake()
    server.take()
    server.say(ENVELOPE_OK)
    assert server.take().startswith(b"Subject: x")  # u0's data; u1's envelope pipelined behind
    assert loop.in_flight == 3  # u0, u1 and u2 (queued on the connection)
    loop.stop()
    reactor.advance(50)  # long, yet within the reply timeout: stopping alone cuts nothing off
    assert not done.called
    assert not server.transport.disconnecting
    assert door.outcomes == []
    server.say(b"250 queued\r\n" + ENVELOPE_OK)  # u0 taken, u1's data wanted
    server.say(b"250 queued\r\n" + ENVELOPE_OK)  # u1 taken, u2's data wanted
    server.say(b"250 queued\r\n")
    assert b"RCPT TO:<u3@x.org>" not in server.take()  # nothing new started after stop()
    door.commit_all()
    assert done.called
    assert [plan.state for _, plan in door.outcomes] == ["sent"] * 3
    assert len(door.jobs) == 2


def test_abort_cuts_off_the_messages_in_flight() -> None:
    reactor, _, door, loop, done = loop_on_clock(5, bound=None)
    server = FakeServer(reactor, 0)
    server.handshake()
    server.take()
    server.say(ENVELOPE_OK)
    server.take()
    loop.stop()
    loop.abort()
    assert server.transport.disconnecting
    server.drop()
    door.commit_all()
    assert done.called
    assert door.outcomes
    assert {plan.state for _, plan in door.outcomes} == {"deferred"}  # a drop: tried again later


class _Handle:
    def release_body(self) -> None:
        pass

    def cancel(self) -> None:
        pass


class InstantSender:
    """A sender of capacity 1 whose attempts end when the test says, or at once."""

    capacity = 1

    def __init__(self) -> None:
        self.waiting: list[tuple[Any, Any, Any]] = []
        self.at_once = False

    def attempt(self, envelope: Any, notify: Any, context: Any, ready: Any = None) -> _Handle:
        result = TransactionResult._taken(envelope.recipients, 250, b"ok", False)
        if self.at_once:
            notify(context, result, None)
        else:
            self.waiting.append((notify, context, result))
        return _Handle()

    def abort(self) -> None:
        pass


class CountingDoor(ListDoor):
    def record(self, job: Job, outcome: Plan) -> None:  # type: ignore[override]
        self.outcomes.append((job, outcome))


def test_attempts_ending_at_once_after_one_that_ended_later_neither_recurse_nor_starve() -> None:
    """The next job started in an ended attempt's place may end at once (a dead server): the
    rest then go through the pump, a burst at a time, not one nested call per job."""
    clock = MemoryReactorClock()
    sender = InstantSender()
    door = CountingDoor(make_jobs(3000))
    loop = DeliveryLoop(sender, door, None, clock=clock)
    done = loop.start()
    assert len(sender.waiting) == 1
    sender.at_once = True
    notify, context, result = sender.waiting.pop()
    notify(context, result, None)  # ends outside the pump: its place goes to the next job
    assert 1 < len(door.outcomes) < 3000  # one burst, then the reactor's turn
    while not done.called:
        clock.advance(0)
    assert len(door.outcomes) == 3000
    assert all(outcome.state == "sent" for _, outcome in door.outcomes)
