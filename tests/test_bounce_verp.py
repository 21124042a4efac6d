"""Signed VERP return paths: twistmail.bounces.verp."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twistmail.address import parse_address
from twistmail.bounces.verp import VerpKeys, VerpRef, VerpSigner, _key_ref, read_verp_keys

OLD = ("k1", b"o" * 40)
NEW = ("k2", b"n" * 40)


def signer(*keys: tuple[str, bytes]) -> VerpSigner:
    return VerpSigner(VerpKeys(keys or (NEW,)), "Bounce.Example.COM")


def test_a_queued_recipients_return_path_names_it_and_verifies() -> None:
    verp = signer()
    address = verp.for_queued(123456, 2, "Ann@Example.org")
    local, _, domain = address.partition("@")
    assert domain == "bounce.example.com"
    assert local.startswith(f"bounces+{_key_ref('k2')}-q")
    assert len(local.encode()) <= 64
    parse_address(address)  # a valid address, sendable as MAIL FROM
    ref = verp.verify(address)
    assert ref == VerpRef("queue", 123456, "", 2, ref.tag if ref else "", _key_ref("k2"))
    assert verp.names(ref, "ann@example.org")  # the recipient's case does not matter
    assert not verp.names(ref, "bob@example.org")


def test_a_campaign_rows_return_path() -> None:
    verp = signer()
    address = verp.for_campaign("9f86d081884c7d659a2feaa0", 41, "ann@example.org")
    ref = verp.verify(address)
    assert ref is not None
    assert (ref.kind, ref.campaign, ref.number) == ("campaign", "9f86d08188", 41)


def test_the_largest_ids_stay_within_64_octets() -> None:
    verp = signer()
    for address in (
        verp.for_queued(2**63 - 1, 2**31, "a@example.org"),
        verp.for_campaign("z" * 40, 2**63 - 1, "a@example.org"),
    ):
        assert len(address.partition("@")[0]) <= 64
        assert verp.verify(address) is not None


def test_a_server_that_changes_case_does_not_break_it() -> None:
    verp = signer()
    address = verp.for_queued(7, 0, "a@example.org")
    assert verp.verify(address.upper()) is not None


@pytest.mark.parametrize(
    "forge",
    [
        lambda a: a.replace("-q7-", "-q8-"),  # another message
        lambda a: a.replace("-0-", "-1-"),  # another recipient
        lambda a: (
            a[: a.index("@") - 1] + ("a" if a[a.index("@") - 1] != "a" else "b") + a[a.index("@") :]
        ),
        lambda a: a.replace("bounces+", "other+"),
        lambda a: a.replace("@bounce.example.com", "@example.com"),
        lambda a: "bounces@bounce.example.com",
        lambda a: a.split("-q7-")[0] + "-q7-0-aaaaaaaaaaaaaaaaaaaaaaaa@bounce.example.com",
    ],
)
def test_a_forged_or_altered_return_path_does_not_verify(forge: object) -> None:
    verp = signer()
    address = verp.for_queued(7, 0, "a@example.org")
    assert verp.verify(address) is not None
    assert callable(forge)
    assert verp.verify(forge(address)) is None


def test_keys_rotate_the_first_signs_every_one_verifies() -> None:
    before = signer(OLD)
    old_address = before.for_queued(1, 0, "a@example.org")
    after = signer(NEW, OLD)
    assert after.for_queued(1, 0, "a@example.org").startswith(f"bounces+{_key_ref('k2')}-")
    assert after.verify(old_address) is not None
    # A key taken out of the file no longer verifies what it signed.
    assert signer(NEW).verify(old_address) is None


def test_the_same_key_id_with_another_secret_does_not_verify() -> None:
    address = signer(("k2", b"x" * 40)).for_queued(1, 0, "a@example.org")
    assert signer(NEW).verify(address) is None


def test_the_secret_file(tmp_path: Path) -> None:
    path = tmp_path / "verp.key"
    # The unsubscribe links' format (KEY_ID:SECRET): one file for both.
    path.write_text("# rotate: new key first\nk2:" + "n" * 40 + "\n\nk1:" + "o" * 40 + "\n")
    keys = read_verp_keys(path)
    assert keys.keys == (NEW, OLD)
    old = VerpSigner(VerpKeys((OLD,)), "bounce.example.com").for_queued(1, 0, "a@example.org")
    assert VerpSigner(keys, "bounce.example.com").verify(old) is not None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no key"),
        ("k1:short\n", "line 1"),
        ("k 1:" + "x" * 40, "line 1"),
        ("k1 " + "x" * 40, "line 1"),
        ("k1:" + "x" * 40 + "\nk1:" + "y" * 40, "listed twice"),
    ],
)
def test_a_bad_secret_file_is_a_clear_error_without_the_secret(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "verp.key"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as caught:
        read_verp_keys(path)
    assert "x" * 40 not in str(caught.value)


def test_a_missing_secret_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read"):
        read_verp_keys(tmp_path / "nope")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=120))
def test_verify_never_raises(text: str) -> None:
    assert signer().verify(text + "@bounce.example.com") is None or "+" in text


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**63), st.integers(0, 10**6))
def test_every_made_path_verifies_to_what_it_names(message: int, position: int) -> None:
    verp = signer()
    ref = verp.verify(verp.for_queued(message, position, "a@example.org"))
    assert ref is not None
    assert (ref.message, ref.number) == (message, position)
