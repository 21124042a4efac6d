"""Email addresses for SMTP: parsing, validation, IDNA and SMTPUTF8, and refusal of CR/LF.

Everything here is pure (no I/O). Parsing is strict on purpose: an address that cannot be sent
exactly as written is refused with an :class:`~twistmail.errors.AddressError` naming the value and
the field, before any connection is made.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NoReturn

import idna

from twistmail.errors import AddressError, HeaderInjectionError

__all__ = [
    "Address",
    "check_header_value",
    "find_header_break",
    "format_display_name",
    "format_mailbox",
    "mailbox_key",
    "parse_address",
    "parse_address_list",
    "parse_plain_address_list",
    "parse_sender",
]

_MAX_LOCAL_OCTETS = 64
_MAX_ADDRESS_OCTETS = 254
_MAX_DOMAIN_OCTETS = 253

# RFC 5322 atext (A-Za-z0-9!#$%&'*+/=?^_`{|}~-), extended with non-ASCII characters as RFC
# 6531/6532 allow (U+00A0-U+2027, U+202A-U+D7FF, U+E000-U+10FFFF): C1 controls, the Unicode line
# and paragraph separators and lone surrogates are left out. Written as the complement (controls,
# space, the specials "(),.:;<>@[\], and those left out), which compiles in a tenth of the time:
# the listed ranges cost ~4 ms of every start-up.
_ATEXT = r'[^\x00-\x20"(),.:;<>@\[\\\]\x7f-\x9f\u2028\u2029\ud800-\udfff]'
_DOT_ATOM = re.compile(f"{_ATEXT}+(?:\\.{_ATEXT}+)*")

_LDH_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
# An ASCII host name. Without "--" in it (checked separately: "xn--" labels and other reserved
# hyphen positions need IDNA's own checks) its A-label form is simply its lower-cased self.
_PLAIN_DOMAIN = re.compile(f"{_LDH_LABEL}(?:\\.{_LDH_LABEL})*")
_PLAIN_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_SPEC = f"{_PLAIN_ATOM}(?:\\.{_PLAIN_ATOM})*@{_LDH_LABEL}(?:\\.{_LDH_LABEL})*"
# The common case, "local@domain" in plain ASCII, recognised in one regex pass.
_PLAIN_ADDRESS = re.compile(
    f"({_PLAIN_ATOM}(?:\\.{_PLAIN_ATOM})*)@({_LDH_LABEL}(?:\\.{_LDH_LABEL})*)"
)
# A plain mailbox: "local@domain", or ASCII atoms as the display name and "<local@domain>".
_PLAIN_MAILBOX = f"(?:{_PLAIN_SPEC}|{_PLAIN_ATOM}(?: {_PLAIN_ATOM})* <{_PLAIN_SPEC}>)"
_PLAIN_LIST = re.compile(f"{_PLAIN_MAILBOX}(?:, {_PLAIN_MAILBOX})*")
# The addr-specs of a value matching _PLAIN_LIST: bracketed, or a bare mailbox.
_PLAIN_LIST_SPECS = re.compile(f"<({_PLAIN_SPEC})>|(?:^|, )({_PLAIN_SPEC})(?=,|$)")
# A display name written as it is: ASCII atoms separated by single spaces.
_PLAIN_PHRASE = re.compile(f"{_PLAIN_ATOM}(?: {_PLAIN_ATOM})*")
_ADDRESS_LITERAL = re.compile(r"\[[\x21-\x5a\x5e-\x7e]+\]")

# Control characters (C0, DEL, C1) and every character str.splitlines() treats as a line break.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_HEADER_BREAK = re.compile("[\x00\n\r\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")

find_header_break: Callable[[str], re.Match[str] | None] = _HEADER_BREAK.search
"""The first character of a header value that :func:`check_header_value` refuses, or None
(the pattern's own search: no Python call, for checks made per templated header and row)."""
_QUOTED_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)
_QUOTE_NEEDED = re.compile(r'(["\\])')
_DISPLAY_NAME_SPECIALS = frozenset('@[]\\"')


@dataclass(frozen=True, slots=True)
class Address:
    """One mailbox as SMTP sees it: a local part and a domain, or the null reverse-path.

    ``local`` is the local part unquoted (it may be non-ASCII); ``domain`` is the domain as given
    (it may be a U-label). ``Address("", "")`` is the null reverse-path ``<>``.
    """

    local: str
    domain: str
    # Set by the parser for a plain ASCII dot-atom@host address, already validated: its paths
    # and string form need no second regex pass.
    _plain: bool = field(default=False, init=False, repr=False, compare=False)

    @property
    def is_null(self) -> bool:
        """Whether this is the null reverse-path ``<>``."""
        return not self.local and not self.domain

    @property
    def ascii_domain(self) -> str:
        """The domain in lower-case IDNA A-label form; address literals are returned unchanged."""
        try:
            return _ascii_domain(self.domain)
        except _Invalid as exc:
            raise AddressError(f"invalid address {str(self)!r}: {exc}", address=str(self)) from None

    @property
    def needs_smtputf8(self) -> bool:
        """Whether sending to or from this address needs the SMTPUTF8 extension.

        Only a non-ASCII local part does: a non-ASCII domain travels as its A-label.
        """
        return not self.local.isascii()

    def smtp_path(self, *, utf8: bool = False) -> bytes:
        """The bytes between the angle brackets of ``MAIL FROM:<...>`` or ``RCPT TO:<...>``.

        With ``utf8=False`` the result is ASCII with an A-label domain, and a non-ASCII local part
        is refused; with ``utf8=True`` it is UTF-8 and the domain is kept as given.
        """
        local = self.local
        if self._plain:
            return f"{local}@{self.domain if utf8 else self.domain.lower()}".encode("ascii")
        if not local and not self.domain:
            return b""
        try:
            if _DOT_ATOM.fullmatch(local) is None:
                local = _quote_local(local)
            ascii_domain = _ascii_domain(self.domain)  # validates a directly built Address too
        except _Invalid as exc:
            raise AddressError(f"invalid address {str(self)!r}: {exc}", address=str(self)) from None
        if utf8:
            return f"{local}@{self.domain}".encode()
        if not local.isascii():
            raise AddressError(
                f"address {str(self)!r} has a non-ASCII local part and needs SMTPUTF8",
                address=str(self),
            )
        return f"{local}@{ascii_domain}".encode("ascii")

    def __str__(self) -> str:
        if self._plain:
            return f"{self.local}@{self.domain}"
        if self.is_null:
            return ""
        local = self.local
        if _DOT_ATOM.fullmatch(local) is None:
            local = '"' + _QUOTE_NEEDED.sub(r"\\\1", local) + '"'
        return f"{local}@{self.domain}"


def parse_address(value: str, *, field: str | None = None) -> Address:
    """Parse one mailbox such as ``user@example.com`` or ``Name <user@example.com>``.

    Raises :class:`AddressError` naming ``value`` and ``field`` when it is not exactly one valid
    address.
    """
    plain = _parse_plain(value)
    if plain is not None:
        return plain
    mailboxes, group = _split_list(_checked_str(value, field), value, field)
    if group:
        _fail(value, field, "a group is not a single address")
    if len(mailboxes) > 1:
        _fail(value, field, "more than one address")
    if not mailboxes:
        _fail(value, field, "empty address")
    return _parse_mailbox(mailboxes[0], field)


def parse_sender(value: str, *, field: str | None = None) -> Address:
    """Parse an envelope sender: like :func:`parse_address`, but ``""`` and ``"<>"`` give the null
    reverse-path."""
    plain = _parse_plain(value)
    if plain is not None:
        return plain
    if _checked_str(value, field).strip() in ("", "<>"):
        return Address("", "")
    return parse_address(value, field=field)


def parse_address_list(value: str, *, field: str | None = None) -> list[Address]:
    """Parse a header value holding comma-separated addresses and groups, in order.

    A group contributes its members (``Undisclosed-recipients: ;`` contributes none); empty list
    elements are skipped. Every address is validated as by :func:`parse_address`.
    """
    mailboxes, _ = _split_list(_checked_str(value, field), value, field)
    return [_parse_mailbox(text, field) for text in mailboxes]


def parse_plain_address_list(value: str) -> tuple[Address, ...] | None:
    """The addresses of a header value in the plainest form, else None.

    The plainest form is what the email package writes back unchanged: mailboxes joined by
    ``", "``, each ``local@domain`` or ASCII atoms and ``<local@domain>`` (``Ann Lee
    <ann@example.org>``). Anything else (quotes, comments, groups, non-ASCII, an address the
    parser refuses) gives None: the caller then takes :func:`parse_address_list`'s full path.
    """
    if _PLAIN_LIST.fullmatch(value) is None:
        return None
    addresses = []
    for bracketed, bare in _PLAIN_LIST_SPECS.findall(value):
        spec = bracketed or bare
        address = _parse_plain(spec)
        if address is None:  # e.g. over a length limit, or an IDNA "xn--" domain
            try:
                address = parse_address(spec)
            except AddressError:
                return None
        addresses.append(address)
    return tuple(addresses)


def format_display_name(text: str) -> str:
    """``text`` as the display name of a mailbox in a header: quoted when it needs to be.

    Any text works, commas, quotes, backslashes and non-ASCII included (the message's policy
    encodes non-ASCII as RFC 2047 words); each run of whitespace becomes one space and the ends
    are trimmed, as a display name cannot keep them. Plain words stay unquoted. Control
    characters other than whitespace are kept, so a header check refuses them.
    """
    name = " ".join(text.split())
    if not name or _PLAIN_PHRASE.fullmatch(name):
        return name
    return '"' + _QUOTE_NEEDED.sub(r"\\\1", name) + '"'


def format_mailbox(display_name: str, address: str) -> str:
    """``Display Name <address>`` for a header, the name quoted as needed; the bare address when
    the name is empty. See :func:`format_display_name`."""
    name = format_display_name(display_name)
    address = address.strip()
    return f"{name} <{address}>" if name else address


def mailbox_key(address: Address | str) -> str:
    """The mailbox of ``address`` in one spelling, to tell whether two addresses are the same.

    Case is ignored in the local part and the domain, the domain is compared as its A-label,
    and a display name does not count: ``Ann <ANN@Example.org>`` and ``ann@example.org`` have the
    same key. Raises :class:`AddressError` for a value that is not one valid address.
    """
    if isinstance(address, str):
        address = parse_address(address)
    if address.is_null:
        return ""
    return f"{address.local.casefold()}@{address.ascii_domain}"


def check_header_value(name: str, value: str) -> None:
    """Refuse a header value that could end the header line early: CR, LF, any other line break
    :meth:`str.splitlines` knows (the email generator splits on all of them), or NUL."""
    if find_header_break(value) is not None:
        raise HeaderInjectionError(
            f"header {name!r} value contains CR or LF (or another line break or NUL), "
            "which could inject extra headers",
            field=name,
        )


# -- internals -------------------------------------------------------------------------------


def _fail(value: object, field: str | None, reason: str) -> NoReturn:
    where = f" in field {field}" if field else ""
    text = value if isinstance(value, str) else repr(value)
    raise AddressError(f"invalid address {value!r}{where}: {reason}", address=text, field=field)


def _parse_plain(value: object) -> Address | None:
    """The Address for a plain ASCII ``local@domain`` within the length limits, else None.

    One regex pass decides the common case; anything else takes the full parser.
    """
    if type(value) is not str:
        return None
    match = _PLAIN_ADDRESS.fullmatch(value)
    if match is None:
        return None
    local, domain = match.groups()
    if (
        len(local) > _MAX_LOCAL_OCTETS
        or len(value) > _MAX_ADDRESS_OCTETS
        or len(domain) > _MAX_DOMAIN_OCTETS
        or "--" in domain
    ):
        return None
    address = Address(local, domain)
    object.__setattr__(address, "_plain", True)
    return address


def _checked_str(value: object, field: str | None) -> str:
    """``value`` itself once it is known to be a str free of control characters."""
    if not isinstance(value, str):
        _fail(value, field, f"expected str, got {type(value).__name__}")
    if _CONTROL.search(value) is not None:
        _fail(value, field, "contains CR, LF, NUL or another control character")
    return value


class _Invalid(ValueError):
    """Why a local part or domain cannot be used; turned into an AddressError by the caller."""


def _quote_local(local: str) -> str:
    """A local part that is not a dot-string, as an RFC 5321 quoted string."""
    if not local:
        raise _Invalid("empty local part")
    if _CONTROL.search(local) is not None:
        raise _Invalid("control character in local part")
    return '"' + _QUOTE_NEEDED.sub(r"\\\1", local) + '"'


def _wire_local(local: str) -> str:
    """The local part as written in SMTP: a dot-string as is, anything else quoted."""
    return local if _DOT_ATOM.fullmatch(local) else _quote_local(local)


def _ascii_domain(domain: str) -> str:
    """The A-label form of ``domain``; raises _Invalid when it is not a usable domain."""
    if _PLAIN_DOMAIN.fullmatch(domain) and "--" not in domain:
        if len(domain) > _MAX_DOMAIN_OCTETS:
            raise _Invalid(f"domain longer than {_MAX_DOMAIN_OCTETS} octets")
        return domain.lower()
    if domain.startswith("["):
        if _ADDRESS_LITERAL.fullmatch(domain) is None:
            raise _Invalid(f"invalid address literal {domain!r}")
        return domain
    if not domain:
        raise _Invalid("empty domain")
    if "" in domain.split("."):
        raise _Invalid(f"empty label in domain {domain!r}")
    if _CONTROL.search(domain) is not None:
        raise _Invalid("control character in domain")
    try:
        return _idna_ascii(domain)
    except UnicodeError as exc:  # idna.IDNAError is a UnicodeError
        raise _Invalid(f"domain {domain!r} is not a valid IDNA name ({exc})") from None


@functools.lru_cache(maxsize=4096)
def _idna_ascii(domain: str) -> str:
    return idna.encode(domain, uts46=True).decode("ascii").lower()


def _end_of_quoted(text: str, start: int) -> int:
    """Index just after the quoted string opening at ``start``, or -1 when it is unterminated."""
    i = start + 1
    n = len(text)
    while i < n:
        char = text[i]
        if char == "\\":
            i += 2
        elif char == '"':
            return i + 1
        else:
            i += 1
    return -1


def _end_of_comment(text: str, start: int) -> int:
    """Index just after the (possibly nested) comment opening at ``start``, or -1."""
    depth = 0
    i = start
    n = len(text)
    while i < n:
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return -1


@dataclass(slots=True)
class _Mailbox:
    """The pieces of one list element: display name, angle-address (or None) and the rest."""

    text: str
    display: str
    angle: str | None


def _split_list(text: str, value: str, field: str | None) -> tuple[list[_Mailbox], bool]:
    """Split an address list into mailboxes, removing comments and resolving group syntax.

    Returns the mailboxes and whether any group syntax was seen.
    """
    mailboxes: list[_Mailbox] = []
    buf: list[str] = []
    start = 0
    display: str | None = None  # set once a "<" was seen in the current element
    angle: str | None = None  # set once the matching ">" was seen
    in_group = False
    saw_group = False

    def finish(end: int) -> None:
        nonlocal display, angle, buf, start
        rest = "".join(buf)
        element = text[start:end].strip()
        if display is not None and angle is None:
            _fail(element or value, field, "missing '>'")
        if angle is not None:
            assert display is not None
            if rest.strip():
                _fail(element, field, f"unexpected text {rest.strip()!r} after '>'")
            mailboxes.append(_Mailbox(element, display, angle))
        elif rest.strip():
            mailboxes.append(_Mailbox(element, "", rest.strip()))
        display = angle = None
        buf = []
        start = end + 1

    i = 0
    n = len(text)
    while i < n:
        char = text[i]
        if char == '"':
            end = _end_of_quoted(text, i)
            if end < 0:
                _fail(value, field, "unterminated quoted string")
            buf.append(text[i:end])
            i = end
            continue
        if char == "(":
            end = _end_of_comment(text, i)
            if end < 0:
                _fail(value, field, "unterminated comment")
            buf.append(" ")
            i = end
            continue
        if char == ")":
            _fail(value, field, "unbalanced ')'")
        if char == "[":
            end = text.find("]", i)
            if end < 0:
                _fail(value, field, "unterminated address literal")
            buf.append(text[i : end + 1])
            i = end + 1
            continue
        inside_angle = display is not None and angle is None
        if char == "<":
            if display is not None:
                _fail(value, field, "more than one address (second '<')")
            display = "".join(buf)
            buf = []
        elif char == ">":
            if not inside_angle:
                _fail(value, field, "unexpected '>'")
            angle = "".join(buf)
            buf = []
        elif not inside_angle and char in ",:;":
            if char == ",":
                finish(i)
            elif char == ":":
                if in_group:
                    _fail(value, field, "nested group")
                if display is not None:
                    _fail(value, field, "unexpected ':'")
                _check_display_name("".join(buf), value, field)
                in_group = saw_group = True
                buf = []
                start = i + 1
            else:
                if not in_group:
                    _fail(value, field, "unexpected ';' outside a group")
                finish(i)
                in_group = False
        else:
            buf.append(char)
        i += 1
    if display is not None and angle is None:
        _fail(value, field, "missing '>'")
    if in_group:
        _fail(value, field, "unterminated group (missing ';')")
    finish(n)
    return mailboxes, saw_group


def _check_display_name(display: str, value: str, field: str | None) -> None:
    plain = _QUOTED_STRING.sub("", display)
    if not _DISPLAY_NAME_SPECIALS.isdisjoint(plain):
        _fail(value, field, f"unquoted special character in display name {display.strip()!r}")


def _parse_mailbox(mailbox: _Mailbox, field: str | None) -> Address:
    if mailbox.display:
        _check_display_name(mailbox.display, mailbox.text, field)
    assert mailbox.angle is not None
    return _parse_addr_spec(mailbox.angle.strip(), mailbox.text, field)


def _parse_addr_spec(spec: str, value: str, field: str | None) -> Address:
    """Validate ``local@domain`` (the local part possibly quoted) and build the Address."""
    if not spec:
        _fail(value, field, "empty address")
    if spec.startswith('"'):
        end = _end_of_quoted(spec, 0)
        if end < 0:
            _fail(value, field, "unterminated quoted local part")
        local = _QUOTED_PAIR.sub(r"\1", spec[1 : end - 1])
        rest = spec[end:]
        if not rest.startswith("@"):
            _fail(value, field, "missing '@' after quoted local part")
        domain = rest[1:]
    else:
        at = spec.find("@")
        if at < 0:
            _fail(value, field, "missing '@'")
        local = spec[:at]
        domain = spec[at + 1 :]
        if not local:
            _fail(value, field, "empty local part")
        if " " in local or "\t" in local:
            _fail(value, field, "space in an unquoted local part")
        if _DOT_ATOM.fullmatch(local) is None:
            _fail(value, field, f"invalid local part {local!r}")
    if not local:
        _fail(value, field, "empty local part")
    if not domain:
        _fail(value, field, "empty domain")
    if "@" in domain:
        _fail(value, field, "more than one '@'")
    if " " in domain or "\t" in domain:
        _fail(value, field, "space in domain")
    if domain.startswith("["):
        _check_address_literal(domain, value, field)
    try:
        ascii_domain = _ascii_domain(domain)
        wire_local = len(_wire_local(local).encode())
    except _Invalid as exc:
        _fail(value, field, str(exc))
    if wire_local > _MAX_LOCAL_OCTETS:
        _fail(value, field, f"local part longer than {_MAX_LOCAL_OCTETS} octets")
    longest_domain = max(len(domain.encode()), len(ascii_domain))
    if wire_local + 1 + longest_domain > _MAX_ADDRESS_OCTETS:
        _fail(value, field, f"address longer than {_MAX_ADDRESS_OCTETS} octets")
    return Address(local, domain)


def _check_address_literal(domain: str, value: str, field: str | None) -> None:
    """Accept ``[IPv4]`` and ``[IPv6:...]`` address literals only."""
    inner = domain[1:-1] if domain.endswith("]") else None
    try:
        if inner is None:
            raise ValueError(inner)
        if inner[:5].lower() == "ipv6:":
            ipaddress.IPv6Address(inner[5:])
        else:
            ipaddress.IPv4Address(inner)
    except ValueError:
        _fail(value, field, f"invalid address literal {domain!r}")
