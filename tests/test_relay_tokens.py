"""The HTTP API's token file: ``twistmail tokens`` (as a subprocess) and the request check."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.python.threadpool import ThreadPool

from twistmail.relay.tokens import (
    TOKEN_PREFIX,
    TokenChecker,
    hash_token,
    new_token,
    parse_tokens,
    read_tokens,
)
from twistmail.relay.users import UsersFileError

ROOT = Path(__file__).resolve().parent.parent


def tokens(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "twistmail", "tokens", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_add_prints_the_token_once_and_stores_only_its_hash(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    done = tokens("add", "billing", "--api-token-file", str(path))
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    assert token.startswith(TOKEN_PREFIX)
    assert len(token) > 40
    text = path.read_text()
    assert token not in text
    assert f"billing:{hash_token(token)}" in text.splitlines()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = tokens("add", "billing", "--api-token-file", str(path))
    assert again.returncode == 1
    assert "exists" in again.stderr
    assert read_tokens(str(path)) == {"billing": hash_token(token)}  # unchanged
    second = tokens("add", "crm", "--api-token-file", str(path))
    assert second.returncode == 0
    assert second.stdout.strip() != token
    listed = tokens("list", "--api-token-file", str(path))
    assert listed.stdout.split() == ["billing", "crm"]
    assert tokens("remove", "billing", "--api-token-file", str(path)).returncode == 0
    assert list(read_tokens(str(path))) == ["crm"]
    missing = tokens("remove", "billing", "--api-token-file", str(path))
    assert missing.returncode == 1
    assert "no token 'billing'" in missing.stderr


def test_a_bad_name_is_refused(tmp_path: Path) -> None:
    done = tokens("add", "a:b", "--api-token-file", str(tmp_path / "t"))
    assert done.returncode == 2
    assert "contains ':'" in done.stderr
    assert not (tmp_path / "t").exists()


def test_a_bad_line_is_named() -> None:
    with pytest.raises(UsersFileError, match=r"tokens, line 2: not a sha256\$ hash"):
        parse_tokens(f"a:{hash_token('x')}\nb:secret\n", "tokens")
    with pytest.raises(UsersFileError, match="line 2: token 'a' appears twice"):
        parse_tokens(f"a:{hash_token('x')}\na:{hash_token('y')}\n", "tokens")


@pytest.fixture
def pool() -> ThreadPool:
    threads = ThreadPool(1, 1)
    threads.start()
    yield threads  # type: ignore[misc]
    threads.stop()


@pytest_twisted.ensureDeferred
async def test_the_checker_names_the_token_and_follows_the_file(
    tmp_path: Path, pool: ThreadPool
) -> None:
    path = tmp_path / "tokens"
    first, second = new_token(), new_token()
    path.write_text(f"one:{hash_token(first)}\n")
    checker = TokenChecker(str(path), reactor, pool)  # type: ignore[arg-type]
    assert await checker.check(b"Bearer " + first.encode()) == "one"
    assert await checker.check(b"bearer  " + first.encode()) == "one"
    assert await checker.check(b"Bearer " + second.encode()) is None
    assert await checker.check(b"Basic " + first.encode()) is None
    assert await checker.check(None) is None
    assert await checker.check(b"Bearer ") is None
    assert await checker.check(b"Bearer " + hash_token(first).encode()) is None
    # Changed on disk, picked up without a restart (no sleep: a new inode and size).
    path.with_name("new").write_text(f"two:{hash_token(second)}\n")
    path.with_name("new").replace(path)
    assert await checker.check(b"Bearer " + second.encode()) == "two"
    assert await checker.check(b"Bearer " + first.encode()) is None
    # A broken file keeps the tokens read before.
    path.with_name("bad").write_text("garbage\n")
    path.with_name("bad").replace(path)
    assert await checker.check(b"Bearer " + second.encode()) == "two"
