"""Signed VERP return paths (pure): ``bounces+TOKEN@domain`` naming what a bounce is about.

With VERP (variable envelope return path) every recipient's message goes out with its own
envelope sender, so the bounce a remote server sends back arrives at an address that says which
queued message and recipient (or which campaign row) it concerns, whatever the bounce's format.
The token is signed, so nobody can make up addresses at the bounce domain, and nobody holding
one return path can use it to have another address suppressed:

``bounces+K-qID-POS-TAGMAC@domain`` (queued message ``ID``, recipient position ``POS``) or
``bounces+K-cCAMPAIGN-ROW-TAGMAC@domain`` (campaign ``CAMPAIGN``'s journal row ``ROW``), where
``K`` names the key (4 characters derived from its id; keys rotate: every key in the secret file
is accepted, the first signs), numbers are base 36, ``TAG`` (8 characters) is a keyed hash of
the recipient's address and ``MAC`` (16 characters) an HMAC-SHA256 of the rest (80 bits). All
of it is lower case, since some servers change the case of a local part, and it stays within
the 64 octets RFC 5321 allows a local part.

The secret file is the one the unsubscribe links use (``--secret-file``): one key a line,
``KEY_ID:SECRET`` (``KEY_ID``: 1-16 letters, digits, ``-`` or ``_``; ``SECRET``: at least 32
characters, e.g. ``openssl rand -base64 32``); blank lines and ``#`` comments are ignored; the
first key signs. The VERP keys are derived from those secrets (HMAC-SHA256 with a label of their
own), so a return path and an unsubscribe token never share a key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from dataclasses import dataclass
from typing import Final, Literal

from ..address import mailbox_key

__all__ = ["VerpKeys", "VerpRef", "VerpSigner", "read_verp_keys"]

_KEY_ID = re.compile(r"[A-Za-z0-9_-]{1,16}")
_PREFIX = re.compile(r"[a-z0-9][a-z0-9._-]{0,11}")
_CAMPAIGN = re.compile(r"[a-z0-9]{1,10}")
_MIN_SECRET: Final = 32
_TAG_CHARS: Final = 8
_MAC_CHARS: Final = 16
_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"


def _key_ref(key_id: str) -> str:
    """The 4 lower-case characters naming key ``key_id`` in a return path."""
    return _b32(hashlib.sha256(b"twistmail-verp-key-id\0" + key_id.encode()).digest()[:3])[:4]


@dataclass(frozen=True, slots=True)
class VerpKeys:
    """The keys of a secret file, ``(key id, secret)``: the first signs, every one verifies."""

    keys: tuple[tuple[str, bytes], ...]

    def __post_init__(self) -> None:
        if not self.keys:
            raise ValueError("no VERP key")
        for key_id, secret in self.keys:
            if _KEY_ID.fullmatch(key_id) is None:
                raise ValueError(f"key id {key_id!r}: expected 1-16 letters, digits, - or _")
            if len(secret) < _MIN_SECRET:
                raise ValueError(f"key {key_id!r}: the secret must be at least {_MIN_SECRET} bytes")

    @property
    def current(self) -> tuple[str, bytes]:
        """The signing key: its reference in return paths and its derived VERP secret."""
        key_id, secret = self.keys[0]
        return _key_ref(key_id), _derived(secret)

    def secret(self, ref: str) -> bytes | None:
        """The derived VERP secret of the key referred to as ``ref``, if it is listed."""
        for key_id, secret in self.keys:
            if hmac.compare_digest(_key_ref(key_id), ref):
                return _derived(secret)
        return None


def _derived(secret: bytes) -> bytes:
    return hmac.new(secret, b"twistmail-verp-key", hashlib.sha256).digest()


def read_verp_keys(path: str | os.PathLike[str]) -> VerpKeys:
    """The keys of secret file ``path`` (the unsubscribe links' format, read by
    :func:`twistmail.unsubscribe.tokens.load_secret_file`).

    :raises ValueError: naming the file and line (never the secret) when it cannot be used.
    """
    from ..unsubscribe.tokens import load_secret_file

    return VerpKeys(tuple(load_secret_file(path)))


@dataclass(frozen=True, slots=True)
class VerpRef:
    """What a verified return path names."""

    kind: Literal["queue", "campaign"]
    message: int
    """The queued message's id (``queue``); for ``campaign`` 0."""
    campaign: str
    """The campaign id's first characters (``campaign``); for ``queue`` ``""``."""
    number: int
    """The recipient's position in the queued message, or the campaign's journal row id."""
    tag: str
    key_id: str
    """The reference of the key that signed it (4 characters derived from its id)."""


def _base36(number: int) -> str:
    if number < 0:
        raise ValueError("a VERP number cannot be negative")
    digits = ""
    while True:
        number, digit = divmod(number, 36)
        digits = _DIGITS[digit] + digits
        if not number:
            return digits


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode("ascii").lower().rstrip("=")


_LOCAL = re.compile(
    r"(?P<prefix>[a-z0-9._-]+)\+(?P<kid>[a-z2-7]{4})-(?P<kind>[qc])(?P<first>[a-z0-9]{1,13})"
    r"-(?P<number>[a-z0-9]{1,13})-(?P<tag>[a-z2-7]{8})(?P<mac>[a-z2-7]{16})"
)


class VerpSigner:
    """Makes and checks return paths ``PREFIX+TOKEN@domain`` (see the module's docstring)."""

    def __init__(self, keys: VerpKeys, domain: str, *, prefix: str = "bounces") -> None:
        domain = domain.strip().lower().rstrip(".")
        if not domain or "@" in domain or any(c.isspace() for c in domain):
            raise ValueError(f"VERP domain {domain!r} is not a domain")
        if _PREFIX.fullmatch(prefix) is None:
            raise ValueError(f"VERP prefix {prefix!r}: 1-12 lower-case letters, digits, . _ -")
        self.keys = keys
        self.domain = domain
        self.prefix = prefix

    def _tag(self, secret: bytes, recipient: str) -> str:
        try:
            key = mailbox_key(recipient)
        except ValueError:
            key = recipient.strip().lower()
        digest = hmac.new(secret, b"twistmail-verp-rcpt\0" + key.encode(), hashlib.sha256)
        return _b32(digest.digest()[:5])

    def _mac(self, secret: bytes, signed: str) -> str:
        digest = hmac.new(secret, b"twistmail-verp\0" + signed.encode(), hashlib.sha256)
        return _b32(digest.digest()[:10])

    def _address(self, kind: str, first: str, number: int, recipient: str) -> str:
        key_id, secret = self.keys.current
        signed = f"{key_id}-{kind}{first}-{_base36(number)}-{self._tag(secret, recipient)}"
        return f"{self.prefix}+{signed}{self._mac(secret, signed)}@{self.domain}"

    def for_queued(self, message: int, position: int, recipient: str) -> str:
        """The return path for recipient ``recipient`` (at ``position``) of queued ``message``."""
        return self._address("q", _base36(message), position, recipient)

    def for_campaign(self, campaign: str, row: int, recipient: str) -> str:
        """The return path for journal row ``row`` of campaign ``campaign`` (its id's first 10
        characters are used)."""
        short = campaign.lower()[:10]
        if _CAMPAIGN.fullmatch(short) is None:
            raise ValueError(f"campaign id {campaign!r}: letters and digits expected")
        return self._address("c", short, row, recipient)

    def is_ours(self, address: str) -> bool:
        """Whether ``address`` is at the bounce domain (signed or not)."""
        _, at, domain = address.rpartition("@")
        return bool(at) and domain.strip().lower().rstrip(".") == self.domain

    def verify(self, address: str) -> VerpRef | None:
        """What ``address`` names if it is a correctly signed return path at our domain, else
        None (a forged, altered or unknown-key token, another prefix or another domain)."""
        local, at, domain = address.strip().strip("<>").rpartition("@")
        if not at or domain.lower().rstrip(".") != self.domain or len(local) > 64:
            return None
        match = _LOCAL.fullmatch(local.lower())
        if match is None or match["prefix"] != self.prefix:
            return None
        secret = self.keys.secret(match["kid"])
        if secret is None:
            return None
        signed = f"{match['kid']}-{match['kind']}{match['first']}-{match['number']}-{match['tag']}"
        if not hmac.compare_digest(self._mac(secret, signed), match["mac"]):
            return None
        number = int(match["number"], 36)
        if match["kind"] == "q":
            return VerpRef("queue", int(match["first"], 36), "", number, match["tag"], match["kid"])
        return VerpRef("campaign", 0, match["first"], number, match["tag"], match["kid"])

    def names(self, ref: VerpRef, recipient: str) -> bool:
        """Whether ``recipient`` is the address ``ref`` was made for (constant time)."""
        secret = self.keys.secret(ref.key_id)
        return secret is not None and hmac.compare_digest(self._tag(secret, recipient), ref.tag)
