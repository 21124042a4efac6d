"""SMTP AUTH for the relay: the cred portal over the users file, and the failure limiter.

:func:`auth_portal` makes the portal a submission session logs in through (PLAIN and LOGIN,
verified by :class:`~twistmail.relay.users.UsersChecker`). :class:`FailureLimiter` remembers
failed logins per client address: after ``limit`` failures within ``window`` seconds that
address is refused (421 on SMTP, 429 over HTTP) until the window has passed.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from twisted.cred.portal import IRealm, Portal
from twisted.internet.interfaces import IReactorTime
from twisted.mail import smtp
from twisted.mail.imap4 import PLAINCredentials
from twisted.mail.interfaces import IMessageDelivery
from zope.interface import implementer

from .users import UsersChecker

__all__ = ["MECHANISMS", "FailureLimiter", "auth_portal"]

MECHANISMS: dict[bytes, Any] = {b"PLAIN": PLAINCredentials, b"LOGIN": smtp.LOGINCredentials}
"""The AUTH mechanisms offered (only where a password never crosses in clear)."""


@implementer(IMessageDelivery)
class _Authenticated:
    """The avatar of a logged-in client: the session handles MAIL/RCPT/DATA itself."""

    def __init__(self, name: bytes) -> None:
        self.name = name

    def receivedHeader(self, helo: Any, origin: Any, recipients: Any) -> None:
        return None

    def validateFrom(self, helo: Any, origin: Any) -> Any:
        return origin

    def validateTo(self, user: Any) -> Any:
        raise smtp.SMTPBadRcpt(user)


@implementer(IRealm)
class _Realm:
    def requestAvatar(self, avatar_id: Any, mind: Any, *interfaces: Any) -> Any:
        if IMessageDelivery not in interfaces:
            raise NotImplementedError("the relay's realm gives IMessageDelivery avatars only")
        return IMessageDelivery, _Authenticated(avatar_id), lambda: None


def auth_portal(users_file: str, clock: IReactorTime) -> Portal:
    """The portal checking logins against ``users_file``."""
    return Portal(_Realm(), [UsersChecker(users_file, clock=clock)])


class FailureLimiter:
    """Failed logins per address; ``blocked(address)`` once ``limit`` fell within ``window``.

    At most ``max_addresses`` addresses are remembered (clients from many addresses cannot
    grow it without bound): past that, those whose failures are all older than ``window``
    are forgotten, then, if that is not enough, the longest remembered.
    """

    def __init__(
        self,
        clock: IReactorTime,
        *,
        limit: int = 5,
        window: float = 600.0,
        max_addresses: int = 10_000,
    ) -> None:
        self._clock = clock
        self.limit = limit
        self.window = window
        self.max_addresses = max_addresses
        self._failures: dict[str, deque[float]] = {}

    def failed(self, address: str) -> None:
        """``address`` gave a wrong name or password."""
        failures = self._failures
        times = failures.get(address)
        if times is None:
            if len(failures) >= self.max_addresses:
                self._forget()
            times = failures[address] = deque(maxlen=self.limit)
        times.append(self._clock.seconds())

    def _forget(self) -> None:
        """Make room for one more address (see the class's docstring)."""
        failures = self._failures
        since = self._clock.seconds() - self.window
        for address in [a for a, times in failures.items() if times[-1] <= since]:
            del failures[address]
        while len(failures) >= self.max_addresses:
            del failures[next(iter(failures))]

    def blocked(self, address: str) -> bool:
        """Whether ``address`` failed ``limit`` times in the last ``window`` seconds."""
        times = self._failures.get(address)
        if times is None:
            return False
        now = self._clock.seconds()
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[address]
            return False
        return len(times) >= self.limit

    def retry_after(self, address: str) -> int:
        """Whole seconds until ``address`` is no longer blocked (0 if it is not)."""
        if not self.blocked(address):
            return 0
        oldest = self._failures[address][0]
        return max(1, math.ceil(oldest + self.window - self._clock.seconds()))
