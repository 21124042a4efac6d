"""DKIM signing (RFC 6376): ``rsa-sha256`` and ``ed25519-sha256`` (RFC 8463), relaxed/relaxed.

Canonicalization and hashing follow RFC 6376 sections 3.4 and 3.7; the signature itself is made
by ``cryptography``. A :class:`DkimSigner` holds the keys per From domain and signs
:class:`~twistmail.message.Envelope` objects: the signature covers the message as it is before
dot-stuffing, and the ``DKIM-Signature`` header goes in front of the DATA payload as it is (a
header line never starts with a dot, so it needs no stuffing).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeAlias

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from twisted.logger import Logger

from .address import parse_address_list
from .errors import MessageError, TwistmailError
from .message import Envelope, unstuff

__all__ = [
    "SIGNED_HEADERS",
    "DkimError",
    "DkimKey",
    "DkimKeyError",
    "DkimSigner",
    "Unsigned",
    "dns_record",
    "generate_key",
    "load_key",
    "parse_dkim_option",
]

log = Logger()

SIGNED_HEADERS = (
    "from",
    "to",
    "cc",
    "subject",
    "date",
    "message-id",
    "mime-version",
    "content-type",
    "reply-to",
    "list-unsubscribe",
    "list-unsubscribe-post",
)
"""The header fields signed whenever present; From is also over-signed (listed once more than
it occurs), so no From can be added to a signed message."""
_SIGNED = frozenset(name.encode("ascii") for name in SIGNED_HEADERS)
_SIGNED_ORDER = tuple(name.encode("ascii") for name in SIGNED_HEADERS)

PrivateKey: TypeAlias = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
Missing: TypeAlias = Literal["send", "refuse"]

# A run of white space that is not a lone space (a lone space is left as it is: cheaper).
_WSP_RUN = re.compile(rb"\t[ \t]*| [ \t]+")
_sha256 = hashlib.sha256
_b64 = binascii.b2a_base64
_PKCS1 = padding.PKCS1v15()
_PREHASHED = Prehashed(hashes.SHA256())
_MIN_RSA_BITS = 1024  # RFC 8301: verifiers refuse smaller keys


class DkimError(MessageError):
    """A message that cannot be signed: no key for its From domain (with ``refuse``)."""


class DkimKeyError(TwistmailError, ValueError):
    """A DKIM key or ``--dkim`` setting that cannot be used (named in the message)."""


@dataclass(frozen=True, slots=True)
class DkimKey:
    """One signing key: the ``d=`` domain, the ``s=`` selector and the private key."""

    domain: str
    selector: str
    private_key: PrivateKey

    @property
    def algorithm(self) -> str:
        """The ``a=`` tag value: ``rsa-sha256`` or ``ed25519-sha256``."""
        if isinstance(self.private_key, ed25519.Ed25519PrivateKey):
            return "ed25519-sha256"
        return "rsa-sha256"


def check_domain(domain: str, what: str) -> str:
    """``domain`` as a lower-case A-label name; :class:`DkimKeyError` naming ``what`` if invalid."""
    text = domain.strip().rstrip(".").lower()
    try:
        ascii_domain = text.encode("idna").decode("ascii") if not text.isascii() else text
    except UnicodeError as e:
        raise DkimKeyError(f"{what}: invalid domain {domain!r}") from e
    labels = ascii_domain.split(".")
    if not ascii_domain or not all(
        label and re.fullmatch(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?", label) for label in labels
    ):
        raise DkimKeyError(f"{what}: invalid domain {domain!r}")
    return ascii_domain


def check_selector(selector: str, what: str) -> str:
    """``selector`` itself; :class:`DkimKeyError` naming ``what`` if it is not a DNS label."""
    if not re.fullmatch(r"[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?(\.[A-Za-z0-9_-]+)*", selector):
        raise DkimKeyError(f"{what}: invalid selector {selector!r}")
    return selector


def load_key(domain: str, selector: str, key_file: str | os.PathLike[str]) -> DkimKey:
    """The key in the PEM file ``key_file`` (RSA of 1024 bits or more, or Ed25519).

    Raises :class:`DkimKeyError` naming the file when it cannot be read or parsed; the key's
    bytes never appear in the message.
    """
    what = f"DKIM key {os.fspath(key_file)!s} for {domain}"
    ascii_domain = check_domain(domain, what)
    check_selector(selector, what)
    try:
        data = Path(key_file).read_bytes()
    except OSError as e:
        raise DkimKeyError(f"{what}: cannot read it: {e.strerror}") from e
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise DkimKeyError(f"{what}: not an unencrypted PEM private key (RSA or Ed25519)") from e
    except Exception as e:  # cryptography's UnsupportedAlgorithm and kin
        raise DkimKeyError(f"{what}: unsupported key ({type(e).__name__})") from e
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < _MIN_RSA_BITS:
            raise DkimKeyError(
                f"{what}: an RSA key of {key.key_size} bits is too short "
                f"(at least {_MIN_RSA_BITS}; 2048 recommended)"
            )
    elif not isinstance(key, ed25519.Ed25519PrivateKey):
        raise DkimKeyError(f"{what}: a {type(key).__name__} cannot sign DKIM (RSA or Ed25519)")
    return DkimKey(ascii_domain, selector, key)


def parse_dkim_option(text: str) -> DkimKey:
    """The key a ``--dkim DOMAIN:SELECTOR:KEYFILE`` option names (the key file is read now)."""
    domain, sep, rest = text.partition(":")
    selector, sep2, key_file = rest.partition(":")
    if not (sep and sep2 and domain and selector and key_file):
        raise DkimKeyError(f"--dkim {text!r}: expected DOMAIN:SELECTOR:KEYFILE")
    return load_key(domain, selector, key_file)


def generate_key(algorithm: Literal["rsa", "ed25519"] = "rsa") -> PrivateKey:
    """A new signing key: RSA-2048 or Ed25519."""
    if algorithm == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def private_pem(key: PrivateKey) -> bytes:
    """``key`` as an unencrypted PKCS#8 PEM file's bytes."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def dns_record(key: PrivateKey) -> str:
    """The TXT record value publishing ``key``'s public half (``v=DKIM1; k=...; p=...``)."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode('ascii')}"
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode('ascii')}"


# -- canonicalization (RFC 6376 section 3.4) -------------------------------------------------


def _relaxed_value(value: bytes) -> bytes:
    """A header field's value (after the colon, with its folding) in relaxed form, no CRLF."""
    if b"\r\n" in value:
        value = value.replace(b"\r\n", b"")
    if b"\t" in value or b"  " in value:
        value = _WSP_RUN.sub(b" ", value)
    return value.strip(b" \t")


def relaxed_header(field: bytes) -> bytes:
    """One header field (name, colon, value with its folding, no final CRLF) in relaxed form,
    ending with CRLF."""
    name, _, value = field.partition(b":")
    return name.rstrip(b" \t").lower() + b":" + _relaxed_value(value) + b"\r\n"


def relaxed_body(body: bytes) -> bytes:
    """A message body (CRLF line ends) in relaxed form."""
    if b"\t" in body or b"  " in body:
        body = _WSP_RUN.sub(b" ", body)
    # Every run is one space now, so this is all trailing white space (one scan, and the same
    # object back when there is none: cheaper than looking first).
    body = body.replace(b" \r\n", b"\r\n")
    if body.endswith(b"\r\n\r\n") or not body.endswith(b"\r\n") or body == b"\r\n":
        body = body.rstrip(b"\r\n").rstrip(b" \t")
        return body + b"\r\n" if body else b""
    return body


def _body_digest(data: bytes, start: int, stop: int) -> bytes:
    """The SHA-256 digest of the body ``data[start:stop]`` in relaxed form."""
    if (
        stop - start > 2
        and data.endswith(b"\r\n", start, stop)
        and not data.endswith(b"\r\n\r\n", start, stop)
        and not data.endswith(b" \r\n", start, stop)
        and data.find(b"\t", start, stop) < 0
        and data.find(b"  ", start, stop) < 0
    ):  # most mail: only the spaces ending lines go, hashed around where the body lies
        view = memoryview(data)
        digest = _sha256()
        space = data.find(b" \r\n", start, stop)
        while space >= 0:
            digest.update(view[start:space])
            start = space + 1
            space = data.find(b" \r\n", start, stop)
        digest.update(view[start:stop])
        return digest.digest()
    return _sha256(relaxed_body(data[start:stop])).digest()


def split_message(data: bytes) -> tuple[list[bytes], bytes]:
    """The header fields (each without its final CRLF) and the body of a CRLF message."""
    if data.startswith(b"\r\n"):
        return [], data[2:]
    end = data.find(b"\r\n\r\n")
    if end < 0:
        head, body = data, b""
    else:
        head, body = data[: end + 2], data[end + 4 :]
    return _split_fields(head), body


def _split_fields(head: bytes) -> list[bytes]:
    fields: list[bytes] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b"\r\n" + line
        elif line:
            fields.append(line)
    return fields


# Field names as written (before the colon) -> their relaxed form and colon when signed, b""
# when not: bulk mail repeats a few spellings.
_NAMES: dict[bytes, bytes] = {}


def _field_name(name: bytes) -> bytes | None:
    """``b"from:"`` for a signed field's ``name`` as written, ``b""`` for another field, None
    for a line that does not start a field (a continuation: it starts with white space)."""
    if not name or name[:1] in (b" ", b"\t"):
        return None
    lowered = name.rstrip(b" \t").lower()
    relaxed = lowered + b":" if lowered in _SIGNED else b""
    if len(_NAMES) >= 1024:
        _NAMES.clear()
    _NAMES[name] = relaxed
    return relaxed


def _relaxed_fields(head: bytes) -> tuple[list[bytes], list[bytes]]:
    """The signed fields of the header block ``head`` (without its final CRLF), in order: their
    names in relaxed form with the colon, and their values in relaxed form."""
    lines = head.split(b"\r\n")
    names: list[bytes] = []
    values: list[bytes] = []
    if (
        b"\t" not in head
        and b"  " not in head
        and head.count(b"\r") == len(lines) - 1 == head.count(b"\n")
    ):  # no folding, tab, run of spaces or lone CR/LF: a value only loses its outer spaces
        known = _NAMES
        for line in lines:
            name, colon, value = line.partition(b":")
            relaxed = known.get(name)
            if relaxed is None:
                relaxed = _field_name(name)
                if relaxed is None:  # folded
                    break
            if relaxed:
                if not colon:
                    break
                names.append(relaxed)
                values.append(value.strip(b" "))
        else:
            return names, values
        names.clear()
        values.clear()
    for field in _split_fields(head):
        name, _, value = field.partition(b":")
        lowered = name.rstrip(b" \t").lower()
        if lowered in _SIGNED:
            names.append(lowered + b":")
            values.append(_relaxed_value(value))
    return names, values


class _Plan:
    """What to sign for one sequence of signed field names (bulk mail repeats one): the
    ``h=`` value, and the fields (their index, their relaxed name and colon) in that order."""

    __slots__ = ("author", "h_value", "order", "tags")

    def __init__(self, shape: tuple[bytes, ...]) -> None:
        self.author = shape.index(b"from:") if b"from:" in shape else -1
        where: dict[bytes, list[int]] = {}
        for i, name in enumerate(shape):
            where.setdefault(name[:-1], []).append(i)
        names: list[bytes] = []
        for signed in _SIGNED_ORDER:
            names.extend([signed] * len(where.get(signed, ())))
            if signed == b"from":
                names.append(signed)  # over-signed: one more than there are
        # RFC 6376 5.4.2: repeated fields are taken from the bottom up.
        self.order = [(where[name].pop(), name + b":") for name in names if where.get(name)]
        self.h_value = _fold_names([name.decode("ascii") for name in names]).encode("ascii")
        self.tags: dict[int, _Tags] = {}  # by id() of the DkimKey (the signer holds them)


def _fold_names(names: list[str]) -> str:
    """The ``h=`` value, folded so no line is much over 76 characters."""
    lines: list[str] = []
    line = ""
    for name in names:
        if line and len(line) + len(name) > 66:
            lines.append(line)
            line = ""
        line += name + ":"
    lines.append(line)
    return "\r\n\t".join(lines)[:-1]


_Tags: TypeAlias = tuple[bytes, bytes, bytes, bytes, bytes]


def _tags(key: DkimKey, h_value: bytes) -> _Tags:
    """The constant parts of a DKIM-Signature field, around its ``t=`` and ``bh=`` values and
    ending with ``b=``: as written (from the name on) and in relaxed form (after ``t=``, after
    ``bh=``)."""
    head = (
        f"DKIM-Signature: v=1; a={key.algorithm}; c=relaxed/relaxed; d={key.domain};"
        f" s={key.selector};\r\n\tt="
    ).encode("ascii")
    mid = b"; h=" + h_value + b";\r\n\tbh="
    tail = b";\r\n\tb="
    # Relaxed: the folds (CRLF TAB, the only tabs) become single spaces; no final CRLF.
    relaxed_head = b"dkim-signature:" + head[16:].replace(b"\r\n\t", b" ")
    return (
        head,
        mid,
        tail,
        relaxed_head,
        mid.replace(b"\r\n\t", b" "),
    )


Unsigned: TypeAlias = list[tuple[DkimKey, bytes, bytes]]
"""A message's signatures to make, one per key: the key, the SHA-256 digest to sign, and its
DKIM-Signature field up to ``b=``."""


def _make_signatures(unsigned: Unsigned) -> list[bytes]:
    signatures = []
    for key, digest, _ in unsigned:
        private_key = key.private_key
        if isinstance(private_key, ed25519.Ed25519PrivateKey):
            signatures.append(private_key.sign(digest))
        else:
            signatures.append(private_key.sign(digest, _PKCS1, _PREHASHED))
    return signatures


def _signature_fields(unsigned: Unsigned, signatures: list[bytes]) -> bytes:
    """The DKIM-Signature fields, each ``b=`` value folded at 72 characters."""
    fields = []
    for (_, _, field), signature in zip(unsigned, signatures, strict=True):
        b = _b64(signature, newline=False)
        fields.append(field)
        fields.extend(b[i : i + 72] + b"\r\n\t" for i in range(0, len(b) - 72, 72))
        fields.append(b[(len(b) - 1) // 72 * 72 :])
        fields.append(b"\r\n")
    return b"".join(fields)


class DkimSigner:
    """Signs messages with the key(s) of their From domain.

    ``keys`` may hold an RSA and an Ed25519 key for one domain: both sign. A From domain with no
    key of its own uses its parent domain's (relaxed DMARC alignment); with none at all the
    message goes unsigned (``missing="send"``, logged once per domain, or given to ``warn``)
    or is refused with :class:`DkimError` (``missing="refuse"``). One signer may sign on
    several threads at once.
    """

    def __init__(
        self,
        keys: Iterable[DkimKey],
        *,
        missing: Missing = "send",
        clock: Callable[[], float] = time.time,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        if missing not in ("send", "refuse"):
            raise ValueError(f"missing must be 'send' or 'refuse', not {missing!r}")
        self.missing: Missing = missing
        self._clock = clock
        self._warn = warn
        self._keys: dict[str, list[DkimKey]] = {}
        for key in keys:
            if any(k.selector == key.selector for k in self._keys.get(key.domain, ())):
                raise DkimKeyError(f"DKIM: two keys for {key.selector}._domainkey.{key.domain}")
            self._keys.setdefault(key.domain, []).append(key)
        if not self._keys:
            raise DkimKeyError("DKIM: no key given")
        self._signing: dict[bytes, tuple[str | None, list[DkimKey]]] = {}
        self._warned: set[str] = set()
        self._plans: dict[tuple[bytes, ...], _Plan] = {}
        # The last t= value, as (seconds, tag): one object, replaced whole, so threads signing
        # at once never pair one second's tag with another's.
        self._t_tag: tuple[int, bytes] = (-1, b"")

    @property
    def domains(self) -> list[str]:
        """The domains with a key."""
        return sorted(self._keys)

    def keys_for(self, domain: str) -> list[DkimKey]:
        """The keys signing mail From ``domain`` (an A-label or U-label), parents included."""
        name = domain.lower().rstrip(".")
        if not name.isascii():
            try:
                name = name.encode("idna").decode("ascii")
            except UnicodeError:
                return []
        while True:
            keys = self._keys.get(name)
            if keys is not None:
                return keys
            _, dot, name = name.partition(".")
            if not dot:
                return []

    def sign(self, envelope: Envelope) -> Envelope:
        """``envelope`` with DKIM-Signature header(s) in front, or ``envelope`` itself when its
        From domain has no key and ``missing`` is ``"send"``; raises :class:`DkimError` for
        ``"refuse"``."""
        unsigned = self.prepare(envelope)
        if unsigned is None:
            return envelope
        return self.finish(envelope, unsigned, self.make_signatures(unsigned))

    def prepare(self, envelope: Envelope) -> Unsigned | None:
        """What signing ``envelope`` takes, up to the signatures themselves (None: it goes
        unsigned; :class:`DkimError` with ``"refuse"``). :meth:`make_signatures` makes them
        (on any thread) and :meth:`finish` puts them in: :meth:`sign` in three steps, so that
        threads can make the signatures while another thread does the rest."""
        payload = envelope.payload
        stop = len(payload) - 3  # before the final ".\r\n"
        if (
            payload.endswith(b"\r\n.\r\n")
            and not payload.startswith(b".")
            and payload.find(b"\r\n.", 0, stop) < 0
        ):  # nothing dot-stuffed (bulk mail): the message is the payload up to the final dot
            return self._unsigned(payload, stop)
        message = unstuff(payload)
        return self._unsigned(message, len(message))

    def make_signatures(self, unsigned: Unsigned) -> list[bytes]:
        """The signatures for what :meth:`prepare` gave, on any thread (an RSA signature is
        made without holding Python's GIL, so threads doing this sign on every core)."""
        return _make_signatures(unsigned)

    def finish(self, envelope: Envelope, unsigned: Unsigned, signatures: list[bytes]) -> Envelope:
        """``envelope`` with the signatures made for what :meth:`prepare` gave in front."""
        headers = _signature_fields(unsigned, signatures)
        signed = Envelope(
            envelope.sender,
            envelope.recipients,
            headers + envelope.payload,
            envelope.size + len(headers),
            envelope.eight_bit,
            envelope.smtputf8,
            envelope.message_id,
            envelope.source,
            envelope.rendered,
        )
        if envelope.eight_bit:
            # A 7-bit rendering for a server without 8BITMIME is signed again (reflatten_7bit).
            signed.unsigned = envelope
            signed.resign = self.sign
        return signed

    def signature_headers(self, data: bytes) -> bytes:
        """The DKIM-Signature header field(s) for the message ``data`` (CRLF line ends, not
        dot-stuffed), or ``b""`` when it goes unsigned."""
        unsigned = self._unsigned(data, len(data))
        if unsigned is None:
            return b""
        return _signature_fields(unsigned, self.make_signatures(unsigned))

    def _unsigned(self, data: bytes, stop: int) -> Unsigned | None:
        """:meth:`prepare` for the message ``data[:stop]`` (not copied)."""
        if data.startswith(b"\r\n"):
            head, start = b"", 2
        else:
            end = data.find(b"\r\n\r\n", 0, stop)
            if end < 0:
                head, start = data[:stop], stop
                if head.endswith(b"\r\n"):
                    head = head[:-2]
            else:
                head, start = data[:end], end + 4
        names, values = _relaxed_fields(head)
        shape = tuple(names)
        plan = self._plans.get(shape)
        if plan is None:
            plan = _Plan(shape)
            if len(self._plans) < 256:
                self._plans[shape] = plan
        author = values[plan.author] if plan.author >= 0 else b""
        signing = self._signing.get(author)
        if signing is None:  # bulk mail repeats one From
            domain = self._author_domain(author) if author else None
            signing = (domain, self.keys_for(domain) if domain else [])
            if len(self._signing) >= 1024:
                self._signing.clear()
            self._signing[author] = signing
        domain, keys = signing
        if not keys:
            self._no_key(domain)
            return None
        parts = [prefix + values[i] + b"\r\n" for i, prefix in plan.order]
        body_hash = _b64(_body_digest(data, start, stop), newline=False)
        timestamp = int(self._clock())
        last = self._t_tag
        if timestamp == last[0]:
            t_tag = last[1]
        else:
            t_tag = b"%d" % timestamp
            self._t_tag = (timestamp, t_tag)
        unsigned: Unsigned = []
        for key in keys:
            tags = plan.tags.get(id(key))
            if tags is None:
                tags = plan.tags[id(key)] = _tags(key, plan.h_value)
            head, mid, tail, relaxed_head, relaxed_mid = tags
            parts.append(relaxed_head + t_tag + relaxed_mid + body_hash + b"; b=")
            digest = _sha256(b"".join(parts)).digest()
            del parts[-1]
            unsigned.append((key, digest, b"".join([head, t_tag, mid, body_hash, tail])))
        return unsigned

    def _author_domain(self, author: bytes) -> str | None:
        """The domain of the first From address, given its field's value in relaxed form."""
        domain: str | None = None
        try:
            text = author.decode("utf-8", "replace")
            addresses = parse_address_list(text, field="From")
            domain = next((a.ascii_domain for a in addresses if not a.is_null), None)
        except MessageError:
            domain = None
        return domain

    def _no_key(self, domain: str | None) -> None:
        label = domain or "(no From address)"
        if self.missing == "refuse":
            raise DkimError(f"no DKIM key for the From domain {label}")
        if label not in self._warned:
            self._warned.add(label)
            text = f"no DKIM key for the From domain {label}: sending unsigned"
            if self._warn is not None:
                self._warn(text)
            else:
                log.warn("{text}", text=text)
