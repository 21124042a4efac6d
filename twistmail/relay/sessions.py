"""Signed session cookies for the relay's status page.

A person logs in by POSTing an API token once; the page then knows them by a cookie that says
which token logged in and when, signed with HMAC-SHA256 under a key the relay draws at start
(so a restart ends every session). The signature also covers the token's stored hash, so a
session ends when its token is removed or replaced in the token file. The cookie holds no
secret: it cannot be made or changed without the key, and it stops working after ``max_age``
seconds. Signatures are compared in constant time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from typing import Final

__all__ = ["COOKIE", "Sessions"]

COOKIE: Final = b"twistmail_session"
"""The session cookie's name."""

_VERSION: Final = b"v1"
_MAX_COOKIE: Final = 512


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _unb64(data: bytes) -> bytes:
    return base64.urlsafe_b64decode(data + b"=" * (-len(data) % 4))


class Sessions:
    """Issues and checks session cookie values (see the module's docstring).

    ``key``: the signing key (default: 32 random bytes drawn now). ``clock()`` gives the time
    in seconds; a value is good for ``max_age`` seconds after it was issued.
    """

    def __init__(
        self,
        key: bytes | None = None,
        *,
        max_age: float = 8 * 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._key = key if key is not None else secrets.token_bytes(32)
        if len(self._key) < 16:
            raise ValueError("a session key must be at least 16 bytes")
        self.max_age = max_age
        self._clock = clock

    def _sign(self, body: bytes, bound: str) -> bytes:
        mac = hmac.new(self._key, body + b"\n" + bound.encode("utf-8"), hashlib.sha256)
        return _b64(mac.digest())

    def issue(self, name: str, bound: str = "") -> bytes:
        """A cookie value for the token called ``name``, good from now for ``max_age`` and
        only while ``bound`` (the token's stored hash) stays the same."""
        issued = b"%d" % int(self._clock())
        body = b".".join((_VERSION, _b64(name.encode("utf-8")), issued))
        return body + b"." + self._sign(body, bound)

    @staticmethod
    def claimed(value: bytes | None) -> str | None:
        """The token name a cookie value claims, not yet checked (to look up its ``bound``)."""
        if not value or len(value) > _MAX_COOKIE:
            return None
        parts = value.split(b".")
        if len(parts) != 4 or parts[0] != _VERSION:
            return None
        try:
            return _unb64(parts[1]).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return None

    def verify(self, value: bytes | None, bound: str = "") -> str | None:
        """The token name of a cookie value this relay issued with ``bound`` and that has not
        expired; None for a missing, malformed, forged, altered or expired value."""
        name = self.claimed(value)
        if name is None or value is None:
            return None
        body, _, signature = value.rpartition(b".")
        if not hmac.compare_digest(self._sign(body, bound), signature):
            return None
        issued = body.rsplit(b".", 1)[1]
        if not issued.isdigit():
            return None
        age = self._clock() - int(issued)
        if not -60 <= age <= self.max_age:  # a minute of clock slack, no more
            return None
        return name
