"""Messages ready for the wire: the SMTP envelope, the DATA payload and what the server must offer.

Everything here is pure (no I/O). :func:`envelope_from_bytes` takes an already rendered message,
:func:`envelope_from_message` renders an :class:`~email.message.EmailMessage`; both give an
:class:`Envelope` whose ``payload`` can be written after ``DATA`` in one piece.
"""

from __future__ import annotations

import copy
import dataclasses
import email
import email.utils
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from email import policy
from email.headerregistry import Address as HeaderAddress
from email.headerregistry import Group, HeaderRegistry
from email.message import EmailMessage
from typing import TypeAlias

from twistmail._flatten import Flat, check_headers, flatten_simple, id_line, unfold
from twistmail.address import (
    Address,
    parse_address,
    parse_address_list,
    parse_sender,
)
from twistmail.errors import AddressError, MessageError
from twistmail.mime import local_now

__all__ = [
    "Envelope",
    "MessageLike",
    "envelope_from_bytes",
    "envelope_from_message",
    "reflatten_7bit",
    "to_envelope",
    "to_wire",
    "unstuff",
]

_SMTP_7BIT = policy.SMTP.clone(cte_type="7bit")
# Headers whose addresses are rendered into the message (Bcc never is).
_ADDRESS_HEADERS = ("From", "Sender", "Reply-To", "To", "Cc")
_ADDRESS_HEADER_KEYS = frozenset(name.lower() for name in _ADDRESS_HEADERS)
_RECIPIENT_HEADERS = ("To", "Cc", "Bcc")
_HEADER_REGISTRY = HeaderRegistry()


@dataclass(slots=True)
class Envelope:
    """One message ready for the wire."""

    sender: Address
    """The reverse-path (``MAIL FROM``); may be the null path."""
    recipients: tuple[Address, ...]
    """The forward-paths (``RCPT TO``): at least one, without duplicates, in the order given."""
    payload: bytes
    """The DATA content: CRLF line ends, dot-stuffed, ending with ``b"\\r\\n.\\r\\n"``."""
    size: int
    """Octets of the message before dot-stuffing, for the ``SIZE=`` parameter."""
    eight_bit: bool
    """Whether the message has any byte above 127 (so needs 8BITMIME)."""
    smtputf8: bool
    """Whether an address or the header block needs SMTPUTF8."""
    message_id: str | None
    """The Message-ID header value, when the message has one."""
    source: EmailMessage | None = None
    """The message this was rendered from (None for raw bytes), for a 7-bit re-rendering."""
    rendered: bool = False
    """The payload was rendered by twistmail (a mail merge), so it may be re-encoded as 7-bit
    from the bytes themselves; raw bytes from a caller are never changed."""
    unsigned: Envelope | None = None
    """For a DKIM-signed 8-bit envelope: the envelope before signing (its 7-bit rendering is
    signed again by ``resign``)."""
    resign: Callable[[Envelope], Envelope] | None = None
    """For a DKIM-signed 8-bit envelope: signs a new rendering of ``unsigned``."""


MessageLike: TypeAlias = EmailMessage | Envelope | tuple[str, Iterable[str], bytes]
"""What :class:`twistmail.Mailer` and the backends send: an ``EmailMessage``, an
:class:`Envelope` or a ``(sender, recipients, data_bytes)`` triple."""


# sender and recipients are not keyword-only: filling keyword-only defaults costs ~300
# instructions a call, and send_many calls this once per message.
def to_envelope(
    message: MessageLike | bytes,
    sender: str | Address | None = None,
    recipients: Iterable[str | Address] | None = None,
) -> Envelope:
    """The envelope for anything :class:`twistmail.Mailer` and the backends send.

    ``message`` is a ``(sender, recipients, data_bytes)`` triple, an :class:`Envelope` (used as
    it is), an ``EmailMessage`` (:func:`envelope_from_message`, with ``sender`` and
    ``recipients`` overriding its headers) or raw ``bytes`` (which need both). Anything that
    cannot be sent raises :class:`MessageError` or a subclass: a ``str`` body, a single ``str``
    as the recipient list, another type, a bad address or header.
    """
    try:
        if isinstance(message, tuple) and len(message) == 3:  # the bulk case first
            triple_sender, triple_recipients, data = message
            return envelope_from_bytes(triple_sender, triple_recipients, data)
        if isinstance(message, Envelope):
            return message
        if isinstance(message, EmailMessage):
            return envelope_from_message(message, sender=sender, recipients=recipients)
        if isinstance(message, bytes | bytearray):
            if sender is None or recipients is None:
                raise MessageError("raw bytes need an explicit sender= and recipients=")
            return envelope_from_bytes(sender, recipients, bytes(message))
    except TypeError as error:  # a str body or recipient list, a non-str address ...
        raise MessageError(str(error)) from error
    raise MessageError(
        f"cannot send {type(message).__name__}: give an EmailMessage, an Envelope "
        "or a (sender, recipients, bytes) triple"
    )


def to_wire(data: bytes) -> bytes:
    """The DATA payload for ``data``: CRLF line ends, a final CRLF, dot-stuffing and ``.\\r\\n``.

    Bare LF, bare CR and CRLF all become CRLF; data already using CRLF is never given
    ``\\r\\r\\n``.
    """
    return _to_wire(data)[0]


def unstuff(payload: bytes) -> bytes:
    """The message carried by a DATA payload: the inverse of :func:`to_wire`.

    Raises :class:`MessageError` when ``payload`` is not terminated by ``CRLF . CRLF``.
    """
    if payload == b".\r\n":
        return b""
    if not payload.endswith(b"\r\n.\r\n"):
        raise MessageError("DATA payload does not end with CRLF.CRLF")
    body = payload[:-3]
    if body.startswith(b"."):
        body = body[1:]
    return body.replace(b"\r\n.", b"\r\n")


def envelope_from_bytes(
    sender: str | Address, recipients: Iterable[str | Address], data: bytes
) -> Envelope:
    """An envelope for an already rendered message.

    CRLF-formatted ``data`` is sent as it is apart from dot-stuffing and termination; other line
    ends are normalised. String addresses are parsed and validated; an empty recipient list is
    refused with :class:`AddressError`.
    """
    if not isinstance(data, bytes):
        raise TypeError(f"data must be bytes, not {type(data).__name__}")
    envelope_sender = sender if isinstance(sender, Address) else _cached_sender(sender)
    forward_paths = _unique_recipients(
        _parsed_recipients(recipients), field="recipients", empty="no recipients"
    )
    return _envelope(envelope_sender, forward_paths, data, None)


def _envelope_from_crlf(
    sender: Address,
    recipients: list[Address],
    data: bytes,
    header_end: int,
    message_id: str,
) -> Envelope:
    """An envelope for ``data`` that its caller built with CRLF line ends only.

    For the mail merge's direct renderer, which knows where its header block ends and what
    Message-ID it wrote: only dot-stuffing is left to check. Raises :class:`AddressError`
    like :func:`envelope_from_bytes` for the recipients.
    """
    forward_paths = _unique_recipients(recipients, field="recipients", empty="no recipients")
    if data.startswith(b".") or data.find(b"\n.") >= 0:
        payload, size = _to_wire(data)
        header_end = _header_end(payload)  # a stuffed dot may have moved it
    else:
        payload, size = data + b".\r\n", len(data)
    return _built(sender, forward_paths, payload, size, header_end, message_id)


# Bulk mail repeats one sender: parse each sender string once (Address is immutable).
_SENDERS: dict[str, Address] = {}
_MAX_SENDERS = 1024


def _cached_sender(sender: str) -> Address:
    if type(sender) is not str:
        return parse_sender(sender, field="sender")
    address = _SENDERS.get(sender)
    if address is None:
        address = parse_sender(sender, field="sender")
        if len(_SENDERS) >= _MAX_SENDERS:
            _SENDERS.clear()
        _SENDERS[sender] = address
    return address


def envelope_from_message(
    msg: EmailMessage,
    *,
    sender: str | Address | None = None,
    recipients: Iterable[str | Address] | None = None,
) -> Envelope:
    """An envelope for ``msg``, rendered with :data:`email.policy.SMTP`.

    The envelope sender defaults to the first From address and the recipients to every To, Cc
    and Bcc address. Bcc is left out of what is sent; ``msg`` itself is not changed. A header
    with a non-ASCII local part makes the rendering use :data:`email.policy.SMTPUTF8`; non-ASCII
    domains in address headers are written as A-labels otherwise. A header value carrying a line
    break is refused with :class:`HeaderInjectionError`.
    """
    flat = flatten_simple(msg)
    if flat is not None:
        return _envelope_from_flat(msg, flat, sender, recipients)
    return envelope_from_generator(msg, sender, recipients)


def envelope_from_generator(
    msg: EmailMessage,
    sender: str | Address | None = None,
    recipients: Iterable[str | Address] | None = None,
) -> Envelope:
    """:func:`envelope_from_message` through the email package's generator, for any message
    (the direct writer's reference, and the path of what it leaves)."""
    check_headers(msg)
    header_addresses = {name: _header_addresses(msg, name) for name in _ADDRESS_HEADERS}
    envelope_sender, forward_paths = _paths(
        header_addresses.get, lambda: _header_addresses(msg, "Bcc"), sender, recipients
    )
    msg = _dated_and_identified(msg, header_addresses["From"] or [envelope_sender])
    rendered, utf8_headers = _prepare(msg, header_addresses)
    data = rendered.as_bytes(policy=policy.SMTPUTF8 if utf8_headers else policy.SMTP)
    return _envelope(envelope_sender, forward_paths, data, msg)


def _envelope_from_flat(
    msg: EmailMessage,
    flat: Flat,
    sender: str | Address | None,
    recipients: Iterable[str | Address] | None,
) -> Envelope:
    """The envelope of a message :func:`flatten_simple` wrote, with the Date and Message-ID
    it lacks added as :func:`_dated_and_identified` adds them (and to its source)."""
    found = flat.addresses
    authors = found.get("from") or []
    envelope_sender, forward_paths = _paths(
        lambda name: found.get(name.lower()) or [],
        lambda: found.get("bcc") or [],
        sender,
        recipients,
    )
    date = None if flat.dated else email.utils.format_datetime(local_now())
    message_id = None if flat.identified else new_message_id(authors or [envelope_sender])
    lines = flat.lines
    if date is not None:
        lines.append(f"Date: {date}\r\n".encode("ascii"))
    if message_id is not None:
        lines.append(id_line(message_id))
    head = b"".join(lines)
    body = flat.body  # CRLF line ends only, as flatten_simple wrote it
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"  # as _to_wire ends it
    data = head + b"\r\n" + body
    source: EmailMessage | None = msg
    if date is not None or message_id is not None:
        # Only an 8-bit message is ever rendered again (as 7-bit): it gets a copy carrying the
        # added headers; a 7-bit one needs none.
        source = None if data.isascii() else _stamped(msg, date, message_id)
    line_ends = head.count(b"\r\n")
    if (
        head.count(b"\n") != line_ends
        or head.count(b"\r") != line_ends
        or data.startswith(b".")
        or data.find(b"\n.") >= 0
    ):  # a header the email package folded with a lone CR or LF, or a line to dot-stuff
        return _envelope(envelope_sender, forward_paths, data, source)
    # CRLF only, nothing to stuff: only the body was not looked at again (it was written so).
    payload = data + b".\r\n"
    header_end = len(head)
    if message_id is None:
        message_id = _message_id(payload, header_end)
    return _built(
        envelope_sender, forward_paths, payload, len(data), header_end, message_id, source
    )


def _paths(
    addresses_of: Callable[[str], list[Address] | None],
    bcc: Callable[[], list[Address]],
    sender: str | Address | None,
    recipients: Iterable[str | Address] | None,
) -> tuple[Address, tuple[Address, ...]]:
    """The envelope sender and recipients: given, or from the From, To, Cc and Bcc headers."""
    froms = addresses_of("From") or []
    if sender is None:
        if not froms:
            raise AddressError("no sender: the message has no From address", field="From")
        envelope_sender = froms[0]
    elif isinstance(sender, Address):
        envelope_sender = sender
    else:
        envelope_sender = parse_sender(sender, field="sender")
    if recipients is None:
        forward_paths = _unique_recipients(
            [
                *(addresses_of("To") or ()),
                *(addresses_of("Cc") or ()),
                *bcc(),
            ],
            field="To",
            empty="no recipients: the message has no To, Cc or Bcc address",
        )
    else:
        forward_paths = _unique_recipients(
            _parsed_recipients(recipients), field="recipients", empty="no recipients"
        )
    return envelope_sender, forward_paths


def new_message_id(authors: Iterable[Address]) -> str:
    """A new Message-ID at the first author's domain (``localhost`` without one)."""
    domain = next((a.ascii_domain for a in authors if not a.is_null), "localhost")
    return email.utils.make_msgid(domain=domain)


def _dated_and_identified(msg: EmailMessage, authors: list[Address]) -> EmailMessage:
    """``msg``, or a copy of it with the ``Date`` and ``Message-ID`` it lacks (RFC 5322 wants
    both; a Message-ID is what lets a resent message be recognised). ``msg`` is not changed."""
    return _stamped(
        msg,
        email.utils.formatdate(localtime=True) if msg.get("Date") is None else None,
        new_message_id(authors) if msg.get("Message-ID") is None else None,
    )


def _stamped(msg: EmailMessage, date: str | None, message_id: str | None) -> EmailMessage:
    """``msg``, or a copy of it with a ``Date`` and a ``Message-ID`` added (those not None)."""
    if date is None and message_id is None:
        return msg
    stamped = copy.copy(msg)
    # A shallow copy shares the header list: give the copy its own before adding to it.
    fields = vars(stamped)
    fields["_headers"] = list(fields["_headers"])
    # As raw strings: written as they are (folded if long), without parsing them again.
    if date is not None:
        stamped.set_raw("Date", date)
    if message_id is not None:
        stamped.set_raw("Message-ID", message_id)
    return stamped


def reflatten_7bit(envelope: Envelope) -> Envelope | None:
    """The envelope re-rendered with 7-bit transfer encodings, for a server without 8BITMIME.

    Returns ``envelope`` itself when it is already 7-bit, and None when no 7-bit form exists:
    raw bytes from a caller (no ``source``, not ``rendered``) or headers that need SMTPUTF8.
    """
    if not envelope.eight_bit:
        return envelope
    if envelope.unsigned is not None and envelope.resign is not None:
        plain = reflatten_7bit(envelope.unsigned)
        return None if plain is None else envelope.resign(plain)
    msg = envelope.source
    if msg is None:
        if not envelope.rendered:
            return None
        parsed = email.message_from_bytes(unstuff(envelope.payload), policy=policy.SMTP)
        assert isinstance(parsed, EmailMessage)
        msg = parsed
    rendered, utf8_headers = _prepare(
        msg, {name: _header_addresses(msg, name) for name in _ADDRESS_HEADERS}
    )
    if utf8_headers:
        return None
    payload, size = _to_wire(rendered.as_bytes(policy=_SMTP_7BIT))
    if not payload.isascii():
        return None
    return dataclasses.replace(
        envelope,
        payload=payload,
        size=size,
        eight_bit=False,
        smtputf8=_addresses_need_smtputf8(envelope.sender, envelope.recipients),
    )


# -- internals -------------------------------------------------------------------------------


def _envelope(
    sender: Address, recipients: tuple[Address, ...], data: bytes, source: EmailMessage | None
) -> Envelope:
    payload, size = _to_wire(data)
    header_end = _header_end(payload)
    return _built(
        sender, recipients, payload, size, header_end, _message_id(payload, header_end), source
    )


def _built(
    sender: Address,
    recipients: tuple[Address, ...],
    payload: bytes,
    size: int,
    header_end: int,
    message_id: str | None,
    source: EmailMessage | None = None,
    eight_bit: bool | None = None,
) -> Envelope:
    if eight_bit is None:
        eight_bit = not payload.isascii()
    return Envelope(
        sender=sender,
        recipients=recipients,
        payload=payload,
        size=size,
        eight_bit=eight_bit,
        smtputf8=_addresses_need_smtputf8(sender, recipients)
        or (eight_bit and not payload[:header_end].isascii()),
        message_id=message_id,
        source=source,
    )


def _to_wire(data: bytes) -> tuple[bytes, int]:
    """The DATA payload for ``data`` and the size of the message before dot-stuffing."""
    line_ends = data.count(b"\r\n")
    if (
        # As many CR and as many LF as CRLF pairs: no bare CR, no bare LF. (These counts and
        # the find cost fewer instructions per byte than any regex or `in` on a pair.)
        data.count(b"\n") == line_ends
        and data.count(b"\r") == line_ends
        and data.find(b"\r\n.") < 0
        and not data.startswith(b".")
    ):
        # Already CRLF-clean with nothing to stuff: the common case costs one concatenation.
        if data.endswith(b"\r\n"):
            return data + b".\r\n", len(data)
        if not data:
            return b".\r\n", 0
        return data + b"\r\n.\r\n", len(data) + 2
    text = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if text and not text.endswith(b"\r\n"):
        text += b"\r\n"
    size = len(text)
    if text.startswith(b"."):
        text = b"." + text
    return text.replace(b"\r\n.", b"\r\n..") + b".\r\n", size


def _header_end(payload: bytes) -> int:
    """Index just past the header block (its last CRLF) in a DATA payload."""
    if payload.startswith(b"\r\n"):
        return 0
    blank = payload.find(b"\r\n\r\n")
    return blank + 2 if blank >= 0 else len(payload) - 3


def _message_id(payload: bytes, header_end: int) -> str | None:
    """The (unfolded) Message-ID value from the header block, found case-insensitively."""
    if payload.startswith(b"Message-ID:"):
        start = 11
    else:
        found = payload.find(b"\r\nMessage-ID:", 0, header_end)
        if found >= 0:
            start = found + 13
        else:
            lowered = payload[:header_end].lower()
            if lowered.startswith(b"message-id:"):
                start = 11
            else:
                found = lowered.find(b"\r\nmessage-id:")
                if found < 0:
                    return None
                start = found + 13
    stop = start
    while True:
        stop = payload.find(b"\r\n", stop, header_end)
        if stop < 0:
            stop = header_end
            break
        if payload[stop + 2 : stop + 3] not in (b" ", b"\t"):
            break
        stop += 2
    value = payload[start:stop].replace(b"\r\n", b"").strip()
    return value.decode("utf-8", "replace") or None


def _addresses_need_smtputf8(sender: Address, recipients: tuple[Address, ...]) -> bool:
    if not sender.local.isascii():
        return True
    if len(recipients) == 1:
        return not recipients[0].local.isascii()
    return any(not address.local.isascii() for address in recipients)


def _parsed_recipients(recipients: Iterable[str | Address]) -> list[Address]:
    if isinstance(recipients, str):
        raise TypeError("recipients must be an iterable of addresses, not a single str")
    return [
        recipient
        if isinstance(recipient, Address)
        else parse_address(recipient, field="recipients")
        for recipient in recipients
    ]


def _unique_recipients(
    addresses: Iterable[Address], *, field: str, empty: str
) -> tuple[Address, ...]:
    """``addresses`` without repeats (domains compared case-insensitively), order kept."""
    if type(addresses) is list and len(addresses) == 1:
        only = addresses[0]
        if not only.is_null:
            return (only,)
    seen: set[tuple[str, str]] = set()
    unique: list[Address] = []
    for address in addresses:
        if address.is_null:
            raise AddressError("the null path <> cannot be a recipient", address="", field=field)
        domain = address.domain
        # An ASCII domain only needs case folding; a U-label is compared as its A-label.
        key = (address.local, domain.lower() if domain.isascii() else address.ascii_domain)
        if key not in seen:
            seen.add(key)
            unique.append(address)
    if not unique:
        raise AddressError(empty, field=field)
    return tuple(unique)


def _header_addresses(msg: EmailMessage, name: str) -> list[Address]:
    addresses: list[Address] = []
    for value in msg.get_all(name) or ():
        addresses.extend(parse_address_list(unfold(str(value)), field=name))
    return addresses


def _prepare(
    msg: EmailMessage, header_addresses: dict[str, list[Address]]
) -> tuple[EmailMessage, bool]:
    """A copy of ``msg`` ready to render, and whether its headers need SMTPUTF8.

    The copy has no Bcc and, when SMTPUTF8 is not needed, A-label domains in address headers.
    """
    rendered = copy.copy(msg)
    # Message.__delitem__ builds a new header list, so the caller's msg keeps its own.
    del rendered["Bcc"]
    addresses = [a for name in _ADDRESS_HEADERS for a in header_addresses[name]]
    if any(address.needs_smtputf8 for address in addresses):
        return rendered, True
    if not all(address.domain.isascii() for address in addresses):
        _use_a_labels(rendered)
    return rendered, False


def _use_a_labels(msg: EmailMessage) -> None:
    """Rewrite non-ASCII domains in ``msg``'s address headers as A-labels, keeping header order.

    policy.SMTP would otherwise write a U-label as an encoded-word inside the address, which no
    server can deliver to.
    """
    items = list(msg.raw_items())
    for name in {name.lower() for name, _ in items}:
        del msg[name]
    for name, value in items:
        if name.lower() in _ADDRESS_HEADER_KEYS and not str(value).isascii():
            groups = getattr(value, "groups", None)
            if groups is None:
                groups = _HEADER_REGISTRY(name, unfold(str(value))).groups  # type: ignore[attr-defined]
            value = _HEADER_REGISTRY(
                name,
                [
                    Group(
                        group.display_name,
                        [
                            HeaderAddress(
                                item.display_name,
                                item.username,
                                Address(item.username, item.domain).ascii_domain,
                            )
                            for item in group.addresses
                        ],
                    )
                    for group in groups
                ],
            )
        msg.set_raw(name, value)


def envelope_from_stuffed(
    sender: Address,
    recipients: list[Address],
    payload: bytes,
    size: int,
    header_end: int,
    message_id: str,
    eight_bit: bool | None = None,
) -> Envelope:
    """An envelope for a DATA ``payload`` its caller built with CRLF line ends only, dot-stuffed
    and ended with ``b".\r\n"`` itself; ``size`` is its length before stuffing. ``eight_bit``
    says whether the payload has a byte over 127, when its caller knows (None: it is scanned).

    For the mail merge's direct renderer, which stuffs only the pieces of a message that can
    need it (a cached attachment part is checked once, not once per row). Raises
    :class:`AddressError` like :func:`envelope_from_bytes` for the recipients.
    """
    forward_paths = _unique_recipients(recipients, field="recipients", empty="no recipients")
    return _built(sender, forward_paths, payload, size, header_end, message_id, eight_bit=eight_bit)
