"""Unsubscribe tokens: an opaque, per-recipient value for the one-click unsubscribe URL.

A token names a recipient and a list without showing either: the address and list id are
encrypted (AES-256-CTR, a random nonce per token) and the whole token is signed with
HMAC-SHA256 (encrypt-then-MAC), under keys derived (HKDF-SHA256) from a secret of the
``--secret-file``. The token starts with the key's id in clear, so keys can rotate: the file's
first key signs new tokens, every key listed verifies. Nothing in a token can be guessed or
counted through (no sequence numbers), and a token changed in any bit fails its check.

A genuine token never stops working: it has a nominal lifetime (:data:`NOMINAL_LIFETIME`,
60 days, shown as ``expired`` once past) but still unsubscribes after it, as long as its key is
in the secret file (several countries' laws want unsubscribe links to work 30 days or more).

The secret file holds one key a line, ``KEY_ID:SECRET`` (id: 1-16 letters, digits, ``-`` or
``_``; secret: at least 32 characters, e.g. ``openssl rand -base64 32``); ``#`` starts a comment.
"""

from __future__ import annotations

import base64
import hmac
import os
import re
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from hashlib import sha256
from typing import Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import TwistmailError

__all__ = [
    "MAX_TOKEN",
    "NOMINAL_LIFETIME",
    "SecretError",
    "Subject",
    "TokenBox",
    "load_secret_file",
]

NOMINAL_LIFETIME: Final = 60 * 86400.0
"""Seconds a token is nominally valid (it still unsubscribes afterwards)."""
MAX_TOKEN: Final = 1024
"""Characters of the longest token accepted (a longer one is refused unread)."""

_VERSION: Final = 1
_NONCE: Final = 16
_TAG: Final = 16
_HEAD: Final = struct.Struct(">BI")  # version, issued (days since the epoch)
_KEY_ID: Final = re.compile(r"[A-Za-z0-9_-]{1,16}")
_MIN_SECRET: Final = 32
_DAY: Final = 86400


class SecretError(TwistmailError, ValueError):
    """A secret file that cannot be used (the error names the file and line, never a secret)."""


@dataclass(frozen=True, slots=True)
class Subject:
    """Who a genuine token unsubscribes: ``address`` from ``list_id`` ("" for all mail)."""

    address: str
    list_id: str
    issued_at: float
    key_id: str
    expired: bool
    """Past its nominal lifetime (it still unsubscribes)."""


@dataclass(frozen=True, slots=True)
class _Key:
    key_id: str
    encrypt: bytes
    sign: bytes


def _derive(secret: bytes, purpose: bytes) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"twistmail " + purpose)
    return hkdf.derive(secret)


def _key(key_id: str, secret: bytes) -> _Key:
    return _Key(
        key_id, _derive(secret, b"unsubscribe encrypt"), _derive(secret, b"unsubscribe sign")
    )


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes | None:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        return None
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:
        return None


class TokenBox:
    """Makes and checks tokens with the keys of a secret file (the first one signs).

    ``clock()`` gives now in seconds (tests pass a ``task.Clock().seconds``).
    """

    def __init__(
        self, keys: list[tuple[str, bytes]], *, clock: Callable[[], float] = time.time
    ) -> None:
        if not keys:
            raise SecretError("no unsubscribe key given")
        self._keys = [_key(key_id, secret) for key_id, secret in keys]
        self._by_id = {k.key_id: k for k in self._keys}
        self._clock = clock

    @classmethod
    def from_file(
        cls, path: str | os.PathLike[str], *, clock: Callable[[], float] = time.time
    ) -> TokenBox:
        """The box of the keys in the secret file at ``path`` (see the module docstring)."""
        return cls(load_secret_file(path), clock=clock)

    @property
    def key_id(self) -> str:
        """The id of the key new tokens are signed with."""
        return self._keys[0].key_id

    def make(self, address: str, list_id: str = "") -> str:
        """A new token for ``address`` (normalized by the caller) and ``list_id``."""
        key = self._keys[0]
        nonce = os.urandom(_NONCE)
        head = _HEAD.pack(_VERSION, int(self._clock() // _DAY))
        plain = f"{address}\n{list_id}".encode()
        encryptor = Cipher(algorithms.AES(key.encrypt), modes.CTR(nonce)).encryptor()
        sealed = head + nonce + encryptor.update(plain) + encryptor.finalize()
        tag = hmac.new(key.sign, key.key_id.encode() + b"." + sealed, sha256).digest()[:_TAG]
        return f"{key.key_id}.{_b64(sealed + tag)}"

    def open(self, token: str) -> Subject | None:
        """Who ``token`` unsubscribes; None for anything but a genuine token of a known key."""
        if len(token) > MAX_TOKEN:
            return None
        key_id, dot, rest = token.partition(".")
        key = self._by_id.get(key_id)
        data = _unb64(rest) if dot else None
        if key is None or data is None or len(data) < _HEAD.size + _NONCE + _TAG + 1:
            return None
        sealed, tag = data[:-_TAG], data[-_TAG:]
        expected = hmac.new(key.sign, key.key_id.encode() + b"." + sealed, sha256).digest()
        if not hmac.compare_digest(expected[:_TAG], tag):
            return None
        version, day = _HEAD.unpack_from(sealed)
        if version != _VERSION:
            return None
        nonce = sealed[_HEAD.size : _HEAD.size + _NONCE]
        decryptor = Cipher(algorithms.AES(key.encrypt), modes.CTR(nonce)).decryptor()
        plain = decryptor.update(sealed[_HEAD.size + _NONCE :]) + decryptor.finalize()
        address, newline, list_id = plain.decode("utf-8", "replace").partition("\n")
        if not newline or not address:
            return None
        issued = float(day * _DAY)
        return Subject(
            address, list_id, issued, key.key_id, self._clock() > issued + NOMINAL_LIFETIME
        )


def load_secret_file(path: str | os.PathLike[str]) -> list[tuple[str, bytes]]:
    """``(key id, secret)`` of each line of the secret file at ``path``, the signing key
    first. :class:`SecretError` names the file and line of what is wrong."""
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SecretError(f"{name}: cannot read the secret file ({e.__class__.__name__})") from None
    keys: list[tuple[str, bytes]] = []
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        key_id, colon, secret = text.partition(":")
        if not colon or not _KEY_ID.fullmatch(key_id):
            raise SecretError(
                f"{name}, line {number}: expected KEY_ID:SECRET (KEY_ID: 1-16 letters, digits, "
                "- or _)"
            )
        if len(secret) < _MIN_SECRET:
            raise SecretError(
                f"{name}, line {number}: key {key_id!r}: the secret needs at least "
                f"{_MIN_SECRET} characters (e.g. openssl rand -base64 32)"
            )
        if any(k == key_id for k, _ in keys):
            raise SecretError(f"{name}, line {number}: key {key_id!r} is listed twice")
        keys.append((key_id, secret.encode()))
    if not keys:
        raise SecretError(f"{name}: no key in the secret file (a line KEY_ID:SECRET)")
    return keys
