"""Unsubscribe tokens: opaque, unforgeable, not enumerable, rotating keys, lasting (task.Clock)."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import task

from twistmail.unsubscribe import NOMINAL_LIFETIME, SecretError, TokenBox, Unsubscribe
from twistmail.unsubscribe.tokens import MAX_TOKEN, load_secret_file

K1 = ("k1", b"a" * 40)
K2 = ("k2", b"b" * 40)


def box(*keys: tuple[str, bytes], clock: task.Clock | None = None) -> TokenBox:
    clock = clock or task.Clock()
    return TokenBox(list(keys), clock=clock.seconds)


def test_a_token_names_its_recipient_and_list_without_showing_them() -> None:
    tokens = box(K1)
    token = tokens.make("ann@example.org", "news.example.org")
    assert token.startswith("k1.")
    raw = base64.urlsafe_b64decode(token[3:] + "==")
    assert b"ann" not in raw
    assert b"news" not in raw
    subject = tokens.open(token)
    assert subject is not None
    assert (subject.address, subject.list_id, subject.key_id) == (
        "ann@example.org",
        "news.example.org",
        "k1",
    )
    # Two tokens for one recipient differ (random nonce): nothing to count through.
    assert tokens.make("ann@example.org") != tokens.make("ann@example.org")


@settings(max_examples=300)
@given(position=st.integers(min_value=0), bit=st.integers(min_value=0, max_value=5))
def test_any_change_to_a_token_is_refused(position: int, bit: int) -> None:
    tokens = box(K1)
    token = tokens.make("ann@example.org", "news.example.org")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_."
    i = 3 + position % (len(token) - 3)
    changed = alphabet[(alphabet.index(token[i]) + 1 + bit) % len(alphabet)]
    forged = token[:i] + changed + token[i + 1 :]
    if forged != token:
        assert tokens.open(forged) is None


def test_forgeries_and_garbage_are_refused() -> None:
    tokens = box(K1)
    token = tokens.make("ann@example.org")
    other = box(("k1", b"c" * 40)).make("ann@example.org")  # same key id, another secret
    for bad in (other, "", "k1", "k1.", "k9." + token[3:], token + "A", "k1.!!!", "A" * 5000):
        assert tokens.open(bad) is None
    assert tokens.open("k1." + "A" * MAX_TOKEN) is None


def test_keys_rotate_old_tokens_keep_working_while_their_key_is_listed() -> None:
    old = box(K1).make("ann@example.org", "l.example.org")
    rotated = box(K2, K1)  # k2 signs now, k1 still verifies
    assert rotated.key_id == "k2"
    assert rotated.make("bob@example.org").startswith("k2.")
    subject = rotated.open(old)
    assert subject is not None
    assert subject.key_id == "k1"
    assert box(K2).open(old) is None  # k1 retired from the file: refused


def test_a_token_still_unsubscribes_after_its_nominal_lifetime() -> None:
    clock = task.Clock()
    clock.advance(1_700_000_000)
    tokens = box(K1, clock=clock)
    token = tokens.make("ann@example.org")
    clock.advance(NOMINAL_LIFETIME - 86400)
    fresh = tokens.open(token)
    assert fresh is not None
    assert not fresh.expired
    clock.advance(400 * 86400)  # more than a year later
    late = tokens.open(token)
    assert late is not None
    assert late.address == "ann@example.org"
    assert late.expired


def test_the_secret_file_is_checked_and_its_secrets_never_shown(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# comment\n\nk2:" + "s" * 32 + "\nk1:" + "t" * 40 + "\n")
    assert [k for k, _ in load_secret_file(path)] == ["k2", "k1"]
    for text, says in (
        ("k1:tooshort-secret\n", "line 1"),
        ("no colon here at all, long enough to be a secret\n", "line 1"),
        ("bad id!:" + "s" * 40 + "\n", "line 1"),
        ("k1:" + "s" * 40 + "\nk1:" + "t" * 40 + "\n", "twice"),
        ("# only a comment\n", "no key"),
    ):
        path.write_text(text)
        with pytest.raises(SecretError, match=says) as info:
            load_secret_file(path)
        assert "tooshort" not in str(info.value)
        assert "s" * 32 not in str(info.value)
    with pytest.raises(SecretError, match="cannot read"):
        load_secret_file(tmp_path / "missing")


def test_headers_fold_between_the_two_uris_and_want_https() -> None:
    unsubscribe = Unsubscribe(box(K1), "https://m.example.com/u/{token}", "unsub@example.com")
    lines = unsubscribe.headers("ann@example.org", "l.example.org").decode()
    assert lines.startswith("List-Unsubscribe: <https://m.example.com/u/k1.")
    assert ">,\r\n <mailto:unsub@example.com?subject=unsubscribe%20k1." in lines
    assert lines.endswith("List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n")
    mailto_only = Unsubscribe(None, mailto="unsub@example.com").headers("ann@example.org")
    assert mailto_only == b"List-Unsubscribe: <mailto:unsub@example.com?subject=unsubscribe>\r\n"
