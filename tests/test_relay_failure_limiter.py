"""The relay's failure limiter (SMTP AUTH's 421, the HTTP tokens' 429), on a task.Clock."""

from __future__ import annotations

from twisted.internet.task import Clock

from twistmail.relay.auth import FailureLimiter


def test_an_address_is_blocked_after_the_limit_until_its_window_passes() -> None:
    clock = Clock()
    limiter = FailureLimiter(clock, limit=3, window=60)
    for _ in range(2):
        limiter.failed("192.0.2.1")
    assert not limiter.blocked("192.0.2.1")
    clock.advance(10)
    limiter.failed("192.0.2.1")
    assert limiter.blocked("192.0.2.1")
    assert not limiter.blocked("192.0.2.2")
    assert limiter.retry_after("192.0.2.1") == 50  # the oldest failure leaves the window then
    clock.advance(50)
    assert not limiter.blocked("192.0.2.1")
    assert limiter.retry_after("192.0.2.1") == 0


def test_it_remembers_a_bounded_number_of_addresses_blocked_ones_kept_first() -> None:
    clock = Clock()
    limiter = FailureLimiter(clock, limit=2, window=60, max_addresses=3)
    limiter.failed("old")
    clock.advance(61)  # "old" failed outside the window: the first to be forgotten
    for _ in range(2):
        limiter.failed("attacker")
    limiter.failed("b")
    limiter.failed("c")  # a fourth address: "old" goes, the others stay
    assert len(limiter._failures) == 3
    assert "old" not in limiter._failures
    assert limiter.blocked("attacker")
    for n in range(100):  # many addresses at once: never more than three remembered
        limiter.failed(f"198.51.100.{n}")
        assert len(limiter._failures) <= 3
