"""The HTTP API's bearer tokens: the token file, its command, and the check of a request.

The file holds one ``name:sha256$HEX`` line per token (blank lines and ``#`` comments are
ignored): the SHA-256 of the token, never the token. A token is 32 random bytes (256 bits), so
a fast hash is enough (nothing to guess from it) and a request pays no scrypt work.
``twistmail tokens add NAME --api-token-file FILE`` makes one, stores its hash and prints it
once; ``tokens remove NAME`` deletes it. The relay reads the file again whenever it changes.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from typing import Final, TextIO

from twisted.internet import defer, threads
from twisted.internet.interfaces import IReactorFromThreads, IReactorThreads
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from .users import (
    UsersFileError,
    WatchedFile,
    check_name,
    parse_entries,
    read_entries,
    update_entries,
)

__all__ = [
    "TOKEN_PREFIX",
    "TokenChecker",
    "hash_token",
    "new_token",
    "parse_tokens",
    "read_tokens",
    "tokens_command",
]

log = Logger()

TOKEN_PREFIX: Final = "tmk_"  # noqa: S105 (a prefix, not a secret)
"""Every token starts with this (so a leaked one is easy to recognise by secret scanners)."""

_HEADER: Final = "# twistmail API tokens: NAME:sha256$HASH, written by `twistmail tokens add`"
_HASH = re.compile(r"sha256\$[0-9a-f]{64}")
_MAX_TOKEN_CHARS: Final = 256


def new_token() -> str:
    """A new random token: the prefix and 32 random bytes, URL-safe base64."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str | bytes) -> str:
    """The stored form of ``token``: ``sha256$`` and its hex digest."""
    data = token.encode("utf-8") if isinstance(token, str) else token
    return "sha256$" + hashlib.sha256(data).hexdigest()


def _check_hash(stored: str) -> None:
    if _HASH.fullmatch(stored) is None:
        raise UsersFileError("not a sha256$ hash written by twistmail tokens add")


def parse_tokens(text: str, path: str) -> dict[str, str]:
    """The ``name -> hash`` entries of a token file's text; errors name ``path`` and the line."""
    return parse_entries(text, path, _check_hash, "token", "NAME:sha256$HASH")


def read_tokens(path: str) -> dict[str, str]:
    """The entries of the token file at ``path`` ({} if it does not exist)."""
    return read_entries(path, parse_tokens)


def _match(entries: dict[str, str], presented: bytes) -> str | None:
    """The name of the entry whose hash is ``presented``'s, comparing with every entry in
    constant time (no early exit, no lookup by the secret's hash)."""
    digest = hash_token(presented).encode("ascii")
    found = None
    for name, stored in entries.items():
        if hmac.compare_digest(digest, stored.encode("ascii")):
            found = name
    return found


class TokenChecker:
    """Checks a request's ``Authorization: Bearer TOKEN`` against a token file.

    :meth:`check` fires with the token's name, or None for a missing, malformed or unknown
    token. The file is looked at (and read again when it changed) on ``threadpool`` (default:
    the reactor's), never on the reactor thread.
    """

    def __init__(
        self,
        path: str,
        reactor: IReactorFromThreads,
        threadpool: ThreadPool | None = None,
    ) -> None:
        self.path = path
        self._file = WatchedFile(path, read_tokens, "token file")
        self._reactor = reactor
        self._pool = threadpool
        self._generation = 0

    def check(self, authorization: bytes | None) -> defer.Deferred[str | None]:
        """The name of the token in an ``Authorization`` header value, or None."""
        presented = _bearer(authorization)
        pool = self._pool
        if pool is None:
            pool = IReactorThreads(self._reactor).getThreadPool()
        d = threads.deferToThreadPool(self._reactor, pool, self._verify, presented)
        return d

    def stored(self, name: str) -> defer.Deferred[str | None]:
        """The stored hash of the token called ``name`` as the file has it now (None if there
        is none): it changes when the token is removed or replaced."""
        pool = self._pool
        if pool is None:
            pool = IReactorThreads(self._reactor).getThreadPool()
        return threads.deferToThreadPool(
            self._reactor, pool, lambda: self._file.current()[0].get(name)
        )

    def _verify(self, presented: bytes | None) -> str | None:
        entries, generation, problem = self._file.current()
        if generation != self._generation:
            self._generation = generation
            if problem is not None:
                log.warn("{problem}", problem=problem)
        # Hash even a missing token: the work does not tell what was wrong.
        return _match(entries, presented if presented is not None else b"")


def _bearer(authorization: bytes | None) -> bytes | None:
    """The token of a ``Bearer`` Authorization value, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(b" ")
    token = token.strip()
    if scheme.lower() != b"bearer" or not 0 < len(token) <= _MAX_TOKEN_CHARS:
        return None
    return token


def tokens_command(
    action: str, name: str | None, path: str, *, stdout: TextIO, stderr: TextIO
) -> int:
    """``twistmail tokens add|remove|list``; its exit status (0 done, 1 no such token or the
    name is taken, 2 error). ``add`` prints the new token once: only its hash is stored."""
    try:
        if action == "list":
            for entry in sorted(read_tokens(path)):
                print(entry, file=stdout)
            return 0
        assert name is not None
        check_name(name)
        if action == "remove":
            if not update_entries(path, read_tokens, _HEADER, lambda t: t.pop(name, None)):
                print(f"error: no token {name!r} in {path}", file=stderr)
                return 1
            print(f"removed token {name} from {path}", file=stderr)
            return 0
        token = new_token()

        def add(entries: dict[str, str]) -> bool:
            if name in entries:
                return False
            entries[name] = hash_token(token)
            return True

        if not update_entries(path, read_tokens, _HEADER, add):
            print(f"error: token {name!r} exists in {path}; remove it first", file=stderr)
            return 1
        print(f"added token {name} to {path}; it is shown only this once:", file=stderr)
        print(token, file=stdout)
        return 0
    except (UsersFileError, OSError) as e:
        print(f"error: {e}", file=stderr)
        return 2
