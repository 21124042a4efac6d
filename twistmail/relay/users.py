"""The relay's users file and the AUTH checker that reads it.

The file holds one ``name:hash`` line per user (blank lines and ``#`` comments are ignored).
A hash is ``$scrypt$ln=L,r=R,p=P$SALT$KEY`` (base64 salt and derived key, N = 2**L): the
parameters travel with each hash, so the defaults can grow later without invalidating old
lines. ``twistmail users add|remove|list`` writes it (atomically, mode 0600); the relay reads it
through :class:`UsersChecker`. A name is 1-256 characters, none of them ``:``, whitespace or a
control character; a password is 1-1024 bytes of UTF-8.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import getpass
import hashlib
import hmac
import os
import re
import secrets
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Final, TextIO, TypeVar

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, threads
from twisted.internet.interfaces import IReactorFromThreads, IReactorThreads, IReactorTime
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from ..errors import TwistmailError
from . import DEFAULT_USERS_FILE

__all__ = [
    "DEFAULT_USERS_FILE",
    "UsersChecker",
    "UsersFileError",
    "WatchedFile",
    "check_name",
    "check_password",
    "hash_password",
    "parse_entries",
    "parse_users",
    "read_entries",
    "read_users",
    "update_entries",
    "update_users",
    "users_command",
    "write_entries",
    "write_users",
]

log = Logger()

SCRYPT_LOG_N: Final = 14
SCRYPT_R: Final = 8
SCRYPT_P: Final = 1
_SALT_BYTES: Final = 16
_KEY_BYTES: Final = 32
_MAX_PASSWORD_BYTES: Final = 1024
_MAX_NAME_CHARS: Final = 256
# 128 * r * N bytes of memory per hash: refuse parameters needing more (a hostile or mistyped
# line must not make every login allocate gigabytes).
_MAX_MEMORY: Final = 64 * 1024 * 1024
_HASH = re.compile(
    r"\$scrypt\$ln=(\d{1,2}),r=(\d{1,3}),p=(\d{1,2})\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)"
)
_BAD_NAME = re.compile(r"[:\s\x00-\x1f\x7f]")

_T = TypeVar("_T")


class UsersFileError(TwistmailError, ValueError):
    """A users file, name or password that cannot be used (the text names the file and line)."""


# Hashes. ----------------------------------------------------------------------------------


def _scrypt(password: bytes, salt: bytes, log_n: int, r: int, p: int, size: int) -> bytes:
    return hashlib.scrypt(
        password, salt=salt, n=1 << log_n, r=r, p=p, maxmem=_MAX_MEMORY + 1024 * 1024, dklen=size
    )


def hash_password(
    password: str | bytes, *, log_n: int = SCRYPT_LOG_N, r: int = SCRYPT_R, p: int = SCRYPT_P
) -> str:
    """The stored form of ``password``: scrypt with a random salt and its parameters."""
    secret = _password_bytes(password)
    salt = secrets.token_bytes(_SALT_BYTES)
    key = _scrypt(secret, salt, log_n, r, p, _KEY_BYTES)
    return f"$scrypt$ln={log_n},r={r},p={p}${_b64(salt)}${_b64(key)}"


def check_password(password: bytes, stored: str) -> bool:
    """Whether ``password`` matches the stored hash; compared in constant time.

    :raises UsersFileError: if ``stored`` is not a hash this module can check.
    """
    log_n, r, p, salt, key = _parse_hash(stored)
    candidate = _scrypt(password, salt, log_n, r, p, len(key))
    return hmac.compare_digest(candidate, key)


def _parse_hash(stored: str) -> tuple[int, int, int, bytes, bytes]:
    match = _HASH.fullmatch(stored)
    if match is None:
        raise UsersFileError("not a $scrypt$ hash written by twistmail users add")
    log_n, r, p = (int(match.group(i)) for i in (1, 2, 3))
    if not (1 <= log_n <= 24 and 1 <= r <= 64 and 1 <= p <= 16) or 128 * r << log_n > _MAX_MEMORY:
        raise UsersFileError(f"scrypt parameters out of range (ln={log_n}, r={r}, p={p})")
    try:
        salt, key = (base64.b64decode(match.group(i), validate=True) for i in (4, 5))
    except ValueError as e:
        raise UsersFileError("the hash's salt or key is not base64") from e
    if len(salt) < 8 or len(key) < 16:
        raise UsersFileError("the hash's salt or key is too short")
    return log_n, r, p, salt, key


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _password_bytes(password: str | bytes) -> bytes:
    secret = password.encode("utf-8") if isinstance(password, str) else password
    if not 1 <= len(secret) <= _MAX_PASSWORD_BYTES:
        raise UsersFileError(f"a password must be 1 to {_MAX_PASSWORD_BYTES} bytes long")
    return secret


# A dummy hash with the default parameters: an unknown user costs the same scrypt work as a
# known one. Random salt and key, so no password matches it.
_DUMMY_HASH: Final = (
    f"$scrypt$ln={SCRYPT_LOG_N},r={SCRYPT_R},p={SCRYPT_P}$"
    f"{_b64(secrets.token_bytes(_SALT_BYTES))}${_b64(secrets.token_bytes(_KEY_BYTES))}"
)


# The file. --------------------------------------------------------------------------------


def check_name(name: str) -> str:
    """``name`` if it can be a user's name, else :class:`UsersFileError` saying why."""
    if not 1 <= len(name) <= _MAX_NAME_CHARS:
        raise UsersFileError(f"a user name must be 1 to {_MAX_NAME_CHARS} characters long")
    if _BAD_NAME.search(name):
        raise UsersFileError(f"user name {name!r} contains ':', whitespace or a control character")
    return name


def parse_users(text: str, path: str) -> dict[str, str]:
    """The ``name -> hash`` entries of a users file's text; errors name ``path`` and the line."""
    return parse_entries(text, path, _parse_hash, "user", "NAME:HASH")


def parse_entries(
    text: str, path: str, check_value: Callable[[str], object], kind: str, shape: str
) -> dict[str, str]:
    """The ``name -> value`` entries of a ``NAME:VALUE`` file's text (a ``kind`` a line, each
    value checked by ``check_value``); errors name ``path`` and the line."""
    entries: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, colon, stored = line.partition(":")
        try:
            if not colon:
                raise UsersFileError(f"expected {shape}")
            check_name(name)
            check_value(stored)
            if name in entries:
                raise UsersFileError(f"{kind} {name!r} appears twice")
        except UsersFileError as e:
            raise UsersFileError(f"{path}, line {number}: {e}") from None
        entries[name] = stored
    return entries


def read_users(path: str | os.PathLike[str]) -> dict[str, str]:
    """The entries of the users file at ``path`` ({} if it does not exist)."""
    return read_entries(path, parse_users)


def read_entries(
    path: str | os.PathLike[str], parse: Callable[[str, str], dict[str, str]]
) -> dict[str, str]:
    """``parse(text, path)`` of the file at ``path`` ({} if it does not exist)."""
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8") as f:
            return parse(f.read(), name)
    except FileNotFoundError:
        return {}
    except UnicodeDecodeError as e:
        raise UsersFileError(f"{name}: not UTF-8 text ({e.reason})") from None


_USERS_HEADER: Final = "# twistmail users: NAME:HASH, written by `twistmail users add`"


def write_users(path: str | os.PathLike[str], users: Mapping[str, str]) -> None:
    """Replace the file at ``path`` with ``users``, atomically, readable by its owner only.

    A reader sees the old file or the new one, never a part; the new one is fsync'd, and so
    is its directory, before this returns.
    """
    write_entries(path, users, _USERS_HEADER)


def write_entries(path: str | os.PathLike[str], entries: Mapping[str, str], header: str) -> None:
    """Replace ``path`` with a ``header`` comment and ``NAME:VALUE`` lines, as
    :func:`write_users` does (atomically, mode 0600, fsync'd)."""
    name = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(name))
    text = header + "\n" + "".join(f"{key}:{value}\n" for key, value in sorted(entries.items()))
    fd, temp = tempfile.mkstemp(prefix=".twistmail-users.", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, name)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def update_users(path: str | os.PathLike[str], change: Callable[[dict[str, str]], _T]) -> _T:
    """Read the users file, let ``change`` edit the entries, write them back; its result.

    Writers are serialised by a lock on the file's directory, so two concurrent updates both
    land. Nothing is written when ``change`` raises.
    """
    return update_entries(path, read_users, _USERS_HEADER, change)


def update_entries(
    path: str | os.PathLike[str],
    read: Callable[[str], dict[str, str]],
    header: str,
    change: Callable[[dict[str, str]], _T],
) -> _T:
    """:func:`update_users` for any ``NAME:VALUE`` file read by ``read``."""
    name = os.fspath(path)
    with _directory_lock(os.path.dirname(os.path.abspath(name))):
        entries = read(name)
        result = change(entries)
        write_entries(name, entries, header)
    return result


@contextlib.contextmanager
def _directory_lock(directory: str) -> Iterator[None]:
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


# The checker. -----------------------------------------------------------------------------


class WatchedFile:
    """A ``NAME:VALUE`` file (a ``kind``, read by ``read``) as last read, read again when it
    changed; safe to use from threads. A file that cannot be read keeps the last good entries."""

    def __init__(
        self,
        path: str,
        read: Callable[[str], dict[str, str]] = read_users,
        kind: str = "users file",
    ) -> None:
        self.path = path
        self._read = read
        self._kind = kind
        self._lock = threading.Lock()
        self._signature: tuple[int, int, int, int] | None = None
        self._users: dict[str, str] = {}
        self.generation = 0

    def current(self) -> tuple[dict[str, str], int, str | None]:
        """(the entries, the file's generation, a problem to log), the file read if changed."""
        with self._lock:
            try:
                info = os.stat(self.path)
                signature = (info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
            except FileNotFoundError:
                signature = (0, 0, 0, 0)
            problem = None
            if signature != self._signature:
                self._signature = signature
                self.generation += 1
                try:
                    self._users = self._read(self.path)
                    if signature == (0, 0, 0, 0):
                        problem = f"{self.path}: no such {self._kind}; every login is refused"
                    elif stat.S_IMODE(info.st_mode) & 0o077:
                        problem = f"{self.path}: readable by other users (chmod 600 it)"
                except (UsersFileError, OSError) as e:
                    # Keep the last good entries: a half-edited file must not lock everyone out.
                    problem = f"{e}; keeping the entries read before"
            return self._users, self.generation, problem


class _UsersFile(WatchedFile):
    """The users file, checking passwords."""

    def verify(self, name: str | None, password: bytes) -> tuple[bool, int, str | None]:
        """(whether the password is ``name``'s, the file's generation, a problem to log)."""
        users, generation, problem = self.current()
        stored = users.get(name) if name is not None else None
        try:
            matches = check_password(password, stored or _DUMMY_HASH)
        except UsersFileError:  # an entry parse_users accepted: cannot happen, but never 5xx
            matches = False
        return matches and stored is not None, generation, problem


def _text(value: str | bytes) -> str | None:
    if isinstance(value, str):
        return value
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return None


@implementer(ICredentialsChecker)
class UsersChecker:
    """Checks ``IUsernamePassword`` credentials against a users file, for ``twisted.cred``.

    ``requestAvatarId`` fires with the user's name (UTF-8 bytes) or fails with
    ``UnauthorizedLogin`` — the same failure, after the same scrypt work, for an unknown
    user and a wrong password. The scrypt work runs on ``threadpool`` (default: the reactor's
    pool), never on the reactor thread. The file is read again whenever it has changed.

    Credentials verified in the last ``cache_seconds`` (by ``clock``) are accepted without
    scrypt work, because applications log in once per message. The cache holds only a keyed
    hash of name and password (the key random per process) and at most ``cache_size``
    entries; it is emptied when the file is seen to change, so a removed user or a changed
    password takes effect at once for new credentials and within ``cache_seconds`` for cached
    ones.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(
        self,
        path: str | os.PathLike[str],
        clock: IReactorTime | None = None,
        *,
        reactor: IReactorFromThreads | None = None,
        threadpool: ThreadPool | None = None,
        cache_seconds: float = 60.0,
        cache_size: int = 1024,
    ) -> None:
        """``reactor`` delivers results from the pool (default: the global reactor)."""
        if reactor is None or clock is None or threadpool is None:
            from twisted.internet import reactor as global_reactor

            if reactor is None:
                reactor = IReactorFromThreads(global_reactor)
            if clock is None:
                clock = IReactorTime(global_reactor)
            if threadpool is None:
                threadpool = IReactorThreads(reactor).getThreadPool()
        self.path = os.fspath(path)
        self._file = _UsersFile(self.path)
        self._clock = clock
        self._reactor = reactor
        self._pool = threadpool
        self._ttl = cache_seconds
        self._cache_size = cache_size
        self._key = secrets.token_bytes(32)
        self._cache: dict[bytes, tuple[float, bytes]] = {}  # keyed hash -> (expiry, avatar id)
        self._generation = 0

    def requestAvatarId(self, credentials: IUsernamePassword) -> defer.Deferred[bytes | tuple[()]]:
        """Fire with the user's name if the password is right, else fail (UnauthorizedLogin)."""
        name = _text(credentials.username)
        password = credentials.password
        if isinstance(password, str):
            password = password.encode("utf-8")
        if name is None or len(password) > _MAX_PASSWORD_BYTES or not password:
            name, password = None, b"x"  # the same work, then a refusal
        key = self._cache_key(name, password)
        hit = self._cache.get(key)
        if hit is not None:
            if hit[0] > self._clock.seconds():
                return defer.succeed(hit[1])
            del self._cache[key]
        d = threads.deferToThreadPool(self._reactor, self._pool, self._file.verify, name, password)

        def verified(result: tuple[bool, int, str | None]) -> bytes | tuple[()]:
            matches, generation, problem = result
            if problem is not None:
                log.error("users file: {problem}", problem=problem)
            if generation > self._generation:
                self._generation = generation
                self._cache.clear()
            if not matches or name is None:
                raise UnauthorizedLogin()
            avatar = name.encode("utf-8")
            if generation == self._generation:
                self._remember(key, avatar)
            return avatar

        return d.addCallback(verified)

    def _cache_key(self, name: str | None, password: bytes) -> bytes:
        encoded = (name or "").encode("utf-8")
        message = len(encoded).to_bytes(4, "big") + encoded + password
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def _remember(self, key: bytes, avatar: bytes) -> None:
        now = self._clock.seconds()
        if len(self._cache) >= self._cache_size:
            for stale in [k for k, (expiry, _) in self._cache.items() if expiry <= now]:
                del self._cache[stale]
            while len(self._cache) >= self._cache_size:
                del self._cache[next(iter(self._cache))]  # the oldest entry
        self._cache[key] = (now + self._ttl, avatar)


# The command. -----------------------------------------------------------------------------


def _read_password(name: str, stdin: TextIO) -> str:
    """A new password: prompted twice on a terminal, else the first line of ``stdin``."""
    if stdin.isatty():
        first = getpass.getpass(f"Password for {name}: ")
        if getpass.getpass("Again: ") != first:
            raise UsersFileError("the two passwords differ; nothing changed")
        return first
    return stdin.readline().rstrip("\r\n")


def users_command(
    action: str,
    name: str | None,
    path: str,
    *,
    stdin: TextIO,
    stdout: TextIO,
    stderr: TextIO,
) -> int:
    """``twistmail users add|remove|list``; its exit status (0 done, 1 no such user, 2 error).

    ``add`` sets (or changes) ``name``'s password, read with :func:`_read_password` — never
    from the command line.
    """
    try:
        if action == "list":
            for user in sorted(read_users(path)):
                print(user, file=stdout)
            return 0
        assert name is not None
        check_name(name)
        if action == "remove":

            def remove(users: dict[str, str]) -> bool:
                return users.pop(name, None) is not None

            if not update_users(path, remove):
                print(f"error: no user {name!r} in {path}", file=stderr)
                return 1
            print(f"removed user {name} from {path}", file=stdout)
            return 0
        stored = hash_password(_read_password(name, stdin))

        def add(users: dict[str, str]) -> bool:
            existed = name in users
            users[name] = stored
            return existed

        changed = update_users(path, add)
        verb = "changed the password of" if changed else "added user"
        print(f"{verb} {name} in {path}", file=stdout)
        return 0
    except (UsersFileError, OSError) as e:
        print(f"error: {e}", file=stderr)
        return 2
