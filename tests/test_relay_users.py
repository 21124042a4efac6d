"""The relay's users file (scrypt hashes), its checker for twisted.cred, and ``twistmail users``."""

from __future__ import annotations

import os
import pty
import select
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase

from twistmail.relay import users
from twistmail.relay.users import (
    UsersChecker,
    UsersFileError,
    check_password,
    hash_password,
    parse_users,
    read_users,
    update_users,
    write_users,
)

FAST = {"log_n": 4, "r": 1, "p": 1}  # cheap parameters: tests only


def fast_hash(password: str) -> str:
    return hash_password(password, **FAST)


# Hashes and the file. ---------------------------------------------------------------------


def test_a_hash_carries_its_parameters_and_a_random_salt() -> None:
    one, two = hash_password("s3cret"), hash_password("s3cret")
    assert one.startswith("$scrypt$ln=14,r=8,p=1$")
    assert one != two  # salted
    assert "s3cret" not in one
    assert check_password(b"s3cret", one)
    assert check_password(b"s3cret", two)
    assert not check_password(b"s3cret!", one)


def test_a_hash_made_with_other_parameters_still_checks() -> None:
    stored = hash_password("pw", log_n=5, r=2, p=2)
    assert stored.startswith("$scrypt$ln=5,r=2,p=2$")
    assert check_password(b"pw", stored)
    assert not check_password(b"pW", stored)


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("alice", "expected NAME:HASH"),
        ("alice:$2b$12$abcdefghijklmnopqrstuv", "not a $scrypt$ hash"),
        ("alice:$scrypt$ln=30,r=8,p=1$AAAAAAAAAAA=$AAAAAAAAAAAAAAAAAAAAAA==", "out of range"),
        ("alice:$scrypt$ln=14,r=64,p=1$AAAAAAAAAAA=$AAAAAAAAAAAAAAAAAAAAAA==", "out of range"),
        ("ali ce:" + hash_password("x", **FAST), "whitespace"),
    ],
)
def test_a_bad_line_is_named_by_file_and_line_without_its_hash(line: str, problem: str) -> None:
    text = "# comment\n\nbob:" + hash_password("x", **FAST) + "\n" + line + "\n"
    with pytest.raises(UsersFileError) as caught:
        parse_users(text, "/etc/users")
    assert str(caught.value).startswith("/etc/users, line 4: ")
    assert problem in str(caught.value)
    assert "AAAA" not in str(caught.value)


def test_a_name_appearing_twice_is_refused() -> None:
    stored = fast_hash("x")
    with pytest.raises(UsersFileError, match="line 2: user 'a' appears twice"):
        parse_users(f"a:{stored}\na:{stored}\n", "f")


def test_the_file_is_written_atomically_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text("old contents\n")
    path.chmod(0o644)
    write_users(path, {"bob": fast_hash("b"), "alice": fast_hash("a")})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert list(read_users(path)) == ["alice", "bob"]
    assert sorted(os.listdir(tmp_path)) == ["users"]  # no temporary file left


def test_concurrent_updates_all_land(tmp_path: Path) -> None:
    path = tmp_path / "users"

    def add(name: str) -> None:
        update_users(path, lambda entries: entries.__setitem__(name, fast_hash(name)))

    workers = [threading.Thread(target=add, args=(f"user{n}",)) for n in range(8)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert sorted(read_users(path)) == sorted(f"user{n}" for n in range(8))


def test_a_missing_file_has_no_users(tmp_path: Path) -> None:
    assert read_users(tmp_path / "nothing") == {}


# The checker, with the thread pool played synchronously. ----------------------------------


class _SyncPool:
    """Runs "thread" work at once and counts it (stands in for the reactor's pool)."""

    def __init__(self) -> None:
        self.calls = 0

    def callInThreadWithCallback(
        self, on_result: Callable[[bool, Any], None], f: Callable[..., Any], *a: Any, **kw: Any
    ) -> None:
        self.calls += 1
        try:
            result = f(*a, **kw)
        except BaseException as e:
            on_result(False, e)
        else:
            on_result(True, result)


class _SyncReactor:
    def callFromThread(self, f: Callable[..., Any], *a: Any, **kw: Any) -> None:
        f(*a, **kw)


class CheckerTests(SynchronousTestCase):
    def setUp(self) -> None:
        directory = tempfile.mkdtemp(prefix="twistmail-users-")
        self.addCleanup(shutil.rmtree, directory)
        self.path = Path(directory) / "users"
        write_users(self.path, {"alice": fast_hash("wonderland"), "bob": fast_hash("builder")})
        self.clock = task.Clock()
        self.pool = _SyncPool()
        self.checker = UsersChecker(
            self.path,
            self.clock,
            reactor=_SyncReactor(),  # type: ignore[arg-type]
            threadpool=self.pool,  # type: ignore[arg-type]
        )
        self.scrypts: list[int] = []
        real = users._scrypt

        def counting(password: bytes, salt: bytes, log_n: int, *rest: Any) -> bytes:
            self.scrypts.append(log_n)
            return real(password, salt, log_n, *rest)

        self.patch(users, "_scrypt", counting)

    def login(self, name: bytes, password: bytes) -> Any:
        return self.checker.requestAvatarId(UsernamePassword(name, password))

    def test_the_right_password_gives_the_name_and_is_verified_in_the_pool(self) -> None:
        self.assertEqual(self.successResultOf(self.login(b"alice", b"wonderland")), b"alice")
        self.assertEqual(self.pool.calls, 1)
        self.assertEqual(self.scrypts, [4])

    def test_a_wrong_password_and_an_unknown_user_fail_alike_after_scrypt_work(self) -> None:
        self.failureResultOf(self.login(b"alice", b"wrong"), UnauthorizedLogin)
        self.failureResultOf(self.login(b"mallory", b"wonderland"), UnauthorizedLogin)
        self.failureResultOf(self.login(b"\xff\xfe", b"x"), UnauthorizedLogin)
        self.failureResultOf(self.login(b"alice", b""), UnauthorizedLogin)
        # The unknown, undecodable and empty cases hash against the default parameters.
        self.assertEqual(self.scrypts, [4, 14, 14, 14])
        self.assertEqual(self.pool.calls, 4)

    def test_verified_credentials_are_cached_until_they_expire(self) -> None:
        self.successResultOf(self.login(b"alice", b"wonderland"))
        self.clock.advance(59)
        self.assertEqual(self.successResultOf(self.login(b"alice", b"wonderland")), b"alice")
        self.assertEqual(self.pool.calls, 1)
        self.clock.advance(2)
        self.successResultOf(self.login(b"alice", b"wonderland"))
        self.assertEqual(self.pool.calls, 2)

    def test_a_cached_name_with_another_password_is_verified_again(self) -> None:
        self.successResultOf(self.login(b"alice", b"wonderland"))
        self.failureResultOf(self.login(b"alice", b"wonderlan"), UnauthorizedLogin)
        self.failureResultOf(self.login(b"alice", b"wonderlan"), UnauthorizedLogin)
        self.assertEqual(self.pool.calls, 3)  # failures are never cached

    def test_the_cache_keeps_no_password(self) -> None:
        self.successResultOf(self.login(b"alice", b"wonderland"))
        kept = repr(self.checker._cache)
        self.assertNotIn("wonderland", kept)
        self.assertNotIn(b"wonderland".hex(), kept)
        self.assertEqual(len(self.checker._cache), 1)

    def test_the_cache_is_bounded(self) -> None:
        checker = UsersChecker(
            self.path,
            self.clock,
            reactor=_SyncReactor(),  # type: ignore[arg-type]
            threadpool=self.pool,  # type: ignore[arg-type]
            cache_size=1,
        )
        self.successResultOf(checker.requestAvatarId(UsernamePassword(b"alice", b"wonderland")))
        self.successResultOf(checker.requestAvatarId(UsernamePassword(b"bob", b"builder")))
        self.assertEqual(len(checker._cache), 1)

    def test_a_changed_file_is_read_again_and_empties_the_cache(self) -> None:
        self.successResultOf(self.login(b"alice", b"wonderland"))
        update_users(self.path, lambda entries: entries.pop("alice"))
        update_users(self.path, lambda entries: entries.__setitem__("carol", fast_hash("c")))
        self.assertEqual(self.successResultOf(self.login(b"carol", b"c")), b"carol")
        self.failureResultOf(self.login(b"alice", b"wonderland"), UnauthorizedLogin)

    def test_a_broken_file_keeps_the_users_read_before(self) -> None:
        self.successResultOf(self.login(b"bob", b"builder"))
        self.path.write_text("this is not a users file\n")
        self.assertEqual(self.successResultOf(self.login(b"alice", b"wonderland")), b"alice")


@pytest_twisted.ensureDeferred
async def test_verification_runs_off_the_reactor_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "users"
    write_users(path, {"alice": fast_hash("wonderland")})
    seen: list[threading.Thread] = []
    real = users._scrypt

    def recording(*args: Any) -> bytes:
        seen.append(threading.current_thread())
        return real(*args)

    monkeypatch.setattr(users, "_scrypt", recording)
    checker = UsersChecker(path)
    assert await checker.requestAvatarId(UsernamePassword(b"alice", b"wonderland")) == b"alice"
    assert seen
    assert seen[0] is not threading.main_thread()


# The command. -----------------------------------------------------------------------------


def _users(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "twistmail", "users", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_users_add_list_remove_from_stdin(tmp_path: Path) -> None:
    path = str(tmp_path / "users")
    added = _users("add", "alice@example.org", "--users-file", path, stdin="open sesame\n")
    assert added.returncode == 0, added.stderr
    assert "added user alice@example.org" in added.stdout
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert "open sesame" not in Path(path).read_text() + added.stdout + added.stderr
    assert check_password(b"open sesame", read_users(path)["alice@example.org"])

    changed = _users("add", "alice@example.org", "--users-file", path, stdin="new one\n")
    assert "changed the password of alice@example.org" in changed.stdout
    assert check_password(b"new one", read_users(path)["alice@example.org"])
    assert _users("add", "bob", "--users-file", path, stdin="b\n").returncode == 0

    listed = _users("list", "--users-file", path)
    assert listed.stdout.splitlines() == ["alice@example.org", "bob"]
    assert "$scrypt$" not in listed.stdout

    assert _users("remove", "bob", "--users-file", path).returncode == 0
    again = _users("remove", "bob", "--users-file", path)
    assert again.returncode == 1
    assert "no user 'bob'" in again.stderr
    assert list(read_users(path)) == ["alice@example.org"]


@pytest.mark.parametrize(
    ("name", "password", "message"),
    [
        ("alice", "\n", "a password must be 1 to 1024 bytes long"),
        ("al:ice", "x\n", "contains ':'"),
    ],
)
def test_users_add_refuses_bad_input_and_writes_nothing(
    tmp_path: Path, name: str, password: str, message: str
) -> None:
    path = tmp_path / "users"
    result = _users("add", name, "--users-file", str(path), stdin=password)
    assert result.returncode == 2
    assert message in result.stderr
    assert not path.exists()


def _run_in_pty(argv: list[str], answers: list[tuple[bytes, bytes]]) -> tuple[int, bytes]:
    """Run ``argv`` on a new terminal, typing each answer after its prompt appears."""
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child
        os.execv(argv[0], argv)
    output = b""
    deadline = time.monotonic() + 60
    pending = list(answers)
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 1024)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
        if pending and pending[0][0] in output:
            os.write(fd, pending.pop(0)[1])
            output += b"|"  # so the same prompt is not answered twice
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), output


def test_users_add_on_a_terminal_prompts_twice(tmp_path: Path) -> None:
    path = str(tmp_path / "users")
    argv = [sys.executable, "-m", "twistmail", "users", "add", "alice", "--users-file", path]
    code, output = _run_in_pty(argv, [(b"Password for alice:", b"t0p\n"), (b"Again:", b"t0p\n")])
    assert code == 0, output
    assert b"t0p" not in output  # not echoed
    assert check_password(b"t0p", read_users(path)["alice"])

    code, output = _run_in_pty(argv, [(b"Password for alice:", b"one\n"), (b"Again:", b"two\n")])
    assert code == 2
    assert b"the two passwords differ" in output
    assert check_password(b"t0p", read_users(path)["alice"])
