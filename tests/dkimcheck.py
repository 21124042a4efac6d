"""Test keys and dkimpy's verifier (the independent checker) fed from a dict instead of DNS."""

from __future__ import annotations

import functools
from pathlib import Path

import dkim

from twistmail.dkim import DkimKey, DkimSigner, dns_record, generate_key, private_pem

DOMAIN = "example.com"


@functools.cache
def rsa_key() -> DkimKey:
    return DkimKey(DOMAIN, "rsa1", generate_key("rsa"))


@functools.cache
def ed_key() -> DkimKey:
    return DkimKey(DOMAIN, "ed1", generate_key("ed25519"))


def records(*keys: DkimKey) -> dict[bytes, bytes]:
    """The TXT records publishing ``keys``, by DNS name."""
    return {
        f"{k.selector}._domainkey.{k.domain}.".encode(): dns_record(k.private_key).encode()
        for k in keys
    }


def signer(ed25519: bool = False) -> DkimSigner:
    return DkimSigner([rsa_key(), ed_key()] if ed25519 else [rsa_key()])


def verify(message: bytes, index: int = 0, keys: tuple[DkimKey, ...] | None = None) -> bool:
    """Whether dkimpy finds the ``index``-th DKIM-Signature of ``message`` good."""
    published = records(*(keys or (rsa_key(), ed_key())))

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        return published.get(name, b"")

    try:
        return bool(dkim.DKIM(message).verify(idx=index, dnsfunc=dnsfunc))
    except dkim.ValidationError:
        return False


def write_key(path: Path, key: DkimKey) -> Path:
    path.write_bytes(private_pem(key.private_key))
    return path
