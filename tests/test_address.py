"""Tests for twistmail.address: parsing, validation, IDNA, SMTPUTF8 and CR/LF refusal."""

from __future__ import annotations

import re

import idna
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from twistmail import address
from twistmail.address import (
    Address,
    check_header_value,
    parse_address,
    parse_address_list,
    parse_sender,
)
from twistmail.errors import AddressError, HeaderInjectionError

ATEXT = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+/=?^_`{|}~-"
LINE_BREAKS = "\r\n\x00\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"

atoms = st.text(alphabet=ATEXT, min_size=1, max_size=10)
dot_atoms = st.lists(atoms, min_size=1, max_size=3).map(".".join).filter(lambda s: len(s) <= 64)
labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True).filter(
    lambda s: "--" not in s
)
domains = st.lists(labels, min_size=1, max_size=4).map(".".join)
plain_addresses = st.builds(lambda local, domain: f"{local}@{domain}", dot_atoms, domains)


# -- parse_address: accepted forms -------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "local", "domain"),
    [
        ("user@example.com", "user", "example.com"),
        ("first.last+tag@Example.COM", "first.last+tag", "Example.COM"),
        ("Name <user@example.com>", "user", "example.com"),
        ("<user@example.com>", "user", "example.com"),
        ("  user@example.com  ", "user", "example.com"),
        ('"Smith, John" <user@example.com>', "user", "example.com"),
        ("J. R. Smith <user@example.com>", "user", "example.com"),
        ("user@example.com (a comment)", "user", "example.com"),
        ('"john doe"@example.com', "john doe", "example.com"),
        ('Name <"quote\\"inside"@example.com>', 'quote"inside', "example.com"),
        ("user@[127.0.0.1]", "user", "[127.0.0.1]"),
        ("user@[IPv6:2001:db8::1]", "user", "[IPv6:2001:db8::1]"),
        ("Jürgen <jürgen@bücher.de>", "jürgen", "bücher.de"),
        ("user@localhost", "user", "localhost"),
    ],
)
def test_parse_address_accepts(value: str, local: str, domain: str) -> None:
    assert parse_address(value) == Address(local, domain)


# -- parse_address: refusals ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "empty address"),
        ("   ", "empty address"),
        ("foo", "missing '@'"),
        ("@example.com", "empty local part"),
        ('""@example.com', "empty local part"),
        ("user@", "empty domain"),
        ("john doe@example.com", "space in an unquoted local part"),
        ("user@exa mple.com", "space in domain"),
        ("a@b.com, c@d.com", "more than one address"),
        ("<a@b.com> <c@d.com>", "more than one address"),
        ("a@b@c.com", "more than one '@'"),
        ("a..b@example.com", "invalid local part"),
        (".a@example.com", "invalid local part"),
        ("a.@example.com", "invalid local part"),
        ("user@example..com", "empty label"),
        ("user@.example.com", "empty label"),
        ("user@example.com.", "empty label"),
        ("user@under_score.com", "not a valid IDNA name"),
        ("user@-leading.com", "not a valid IDNA name"),
        ("user@☃.net", "not a valid IDNA name"),
        ("user@xn--zz.com", "not a valid IDNA name"),
        ("user@[1.2.3]", "invalid address literal"),
        ("user@[no-such-literal]", "invalid address literal"),
        ("a" * 65 + "@example.com", "local part longer than 64"),
        ("a" * 10 + "@" + ".".join(["b" * 60] * 4) + ".com", "address longer than 254"),
        ("a@" + ".".join(["b" * 63] * 4) + ".com", "domain longer than 253"),
        ("a@" + "b" * 64 + ".com", "not a valid IDNA name"),
        ("x <a@b.com> y", "unexpected text"),
        ("<a@b.com", "missing '>'"),
        ("a@b.com>", "unexpected '>'"),
        ('"unterminated@b.com', "unterminated quoted string"),
        ("a@b.com (open", "unterminated comment"),
        ("alice@example.org)<bob@example.org>", "unbalanced ')'"),
        ("a@b.com <c@d.com>", "unquoted special character in display name"),
        ("G: a@b.com;", "group is not a single address"),
        ("<>", "empty address"),
        ("a@b.com\r\nBcc: evil@x.com", "control character"),
        ("a@b.com\n", "control character"),
        ("a\x00@b.com", "control character"),
        ("Name\t<a@b.com>", "control character"),
        ("a@b.com\u2028", "control character"),
    ],
)
def test_parse_address_refuses(value: str, reason: str) -> None:
    with pytest.raises(AddressError, match=re.escape(reason)) as info:
        parse_address(value, field="To")
    assert info.value.field == "To"
    assert f"invalid address {value!r} in field To" in str(info.value)


def test_refusal_message_names_value_and_field() -> None:
    with pytest.raises(AddressError) as info:
        parse_address("foo", field="To")
    assert str(info.value) == "invalid address 'foo' in field To: missing '@'"
    assert info.value.address == "foo"


def test_bytes_are_refused() -> None:
    with pytest.raises(AddressError, match="expected str, got bytes"):
        parse_address(b"user@example.com", field="From")  # type: ignore[arg-type]


def test_quoted_local_part_at_64_octets_limit_counts_the_quotes() -> None:
    assert parse_address(f'"{"a b" * 20}x"@example.com').local == "a b" * 20 + "x"
    with pytest.raises(AddressError, match="longer than 64"):
        parse_address(f'"{"a b" * 21}"@example.com')


def test_utf8_local_part_length_is_counted_in_octets() -> None:
    parse_address("é" * 32 + "@example.com")
    with pytest.raises(AddressError, match="longer than 64"):
        parse_address("é" * 33 + "@example.com")


@given(plain_addresses)
def test_plain_addresses_parse_to_their_parts(value: str) -> None:
    local, domain = value.split("@")
    assert parse_address(value) == Address(local, domain)
    assert parse_address(f"Display Name <{value}>") == Address(local, domain)


# -- CR/LF can never get through -------------------------------------------------------------


@given(st.text(), st.sampled_from("\r\n"), st.text())
@example("user@example.com", "\r\n", "")
@example("", "\n", "user@example.com")
def test_parse_address_never_accepts_cr_or_lf(before: str, brk: str, after: str) -> None:
    value = before + brk + after
    with pytest.raises(AddressError):
        parse_address(value)
    with pytest.raises(AddressError):
        parse_address_list(value)
    with pytest.raises(AddressError):
        parse_sender(value)


@given(plain_addresses, st.integers(min_value=0), st.sampled_from(LINE_BREAKS))
def test_line_break_inside_a_valid_address_is_refused(value: str, at: int, brk: str) -> None:
    at %= len(value) + 1
    with pytest.raises(AddressError, match="control character"):
        parse_address(value[:at] + brk + value[at:])


# -- Address properties ----------------------------------------------------------------------


def test_ascii_domain_is_lower_case_a_label() -> None:
    assert Address("user", "Bücher.DE").ascii_domain == "xn--bcher-kva.de"
    assert Address("user", "EXAMPLE.com").ascii_domain == "example.com"
    assert Address("user", "XN--BCHER-KVA.de").ascii_domain == "xn--bcher-kva.de"


def test_ascii_domain_keeps_address_literals() -> None:
    assert Address("user", "[IPv6:2001:DB8::1]").ascii_domain == "[IPv6:2001:DB8::1]"


@given(domains)
def test_ascii_domain_agrees_with_idna(domain: str) -> None:
    assert Address("u", domain.upper()).ascii_domain == idna.encode(domain, uts46=True).decode()


def test_ascii_domain_refuses_invalid_domain_of_directly_built_address() -> None:
    with pytest.raises(AddressError, match="not a valid IDNA name"):
        _ = Address("user", "bad_domain.com").ascii_domain


def test_needs_smtputf8_only_for_non_ascii_local_part() -> None:
    assert Address("jürgen", "example.com").needs_smtputf8
    assert not Address("user", "bücher.de").needs_smtputf8
    assert not Address("user", "example.com").needs_smtputf8


def test_smtp_path_ascii() -> None:
    assert parse_address("Name <User@Example.COM>").smtp_path() == b"User@example.com"


def test_smtp_path_uses_a_label_for_non_ascii_domain() -> None:
    address = parse_address("user@bücher.de")
    assert address.smtp_path() == b"user@xn--bcher-kva.de"
    assert address.smtp_path(utf8=True) == "user@bücher.de".encode()


def test_smtp_path_utf8_for_non_ascii_local_part() -> None:
    address = parse_address("jürgen@bücher.de")
    assert address.smtp_path(utf8=True) == "jürgen@bücher.de".encode()
    with pytest.raises(AddressError, match="needs SMTPUTF8"):
        address.smtp_path()


@pytest.mark.parametrize(
    ("local", "path"),
    [
        ("john doe", b'"john doe"@example.com'),
        ('say "hi"', b'"say \\"hi\\""@example.com'),
        ("back\\slash", b'"back\\\\slash"@example.com'),
        ("a..b", b'"a..b"@example.com'),
        ("plain.dot", b"plain.dot@example.com"),
    ],
)
def test_smtp_path_quotes_local_part_that_is_not_a_dot_atom(local: str, path: bytes) -> None:
    assert Address(local, "example.com").smtp_path() == path


def test_smtp_path_of_null_reverse_path_is_empty() -> None:
    assert Address("", "").smtp_path() == b""
    assert Address("", "").smtp_path(utf8=True) == b""


@pytest.mark.parametrize(
    "address",
    [
        Address("evil\r\nRCPT TO:<x", "example.com"),
        Address("user", "example.com>\r\nRCPT TO:<x@y"),
        Address("user", ""),
        Address("", "example.com"),
    ],
)
def test_smtp_path_refuses_directly_built_bad_address(address: Address) -> None:
    with pytest.raises(AddressError):
        address.smtp_path()
    with pytest.raises(AddressError):
        address.smtp_path(utf8=True)


def test_str() -> None:
    assert str(Address("user", "example.com")) == "user@example.com"
    assert str(Address("john doe", "example.com")) == '"john doe"@example.com'
    assert str(Address("", "")) == ""


@given(
    st.one_of(dot_atoms, st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126))),
    domains,
)
@example("x" * 64, "example.com")
@example("x y" * 20 + "z", "example.com")
@example("x y" * 20 + "zz", "example.com")
def test_str_round_trips_through_parse(local: str, domain: str) -> None:
    address = Address(local, domain)
    quoted_local_octets = len(str(address)) - len(domain) - 1
    if not local or quoted_local_octets > 64:
        # an empty local part, or one longer than 64 octets once quoted, is refused
        with pytest.raises(AddressError, match=r"empty local part|longer than 64"):
            parse_address(str(address))
    else:
        assert parse_address(str(address)) == address


# -- parse_sender ----------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["", "<>", "  <>  "])
def test_parse_sender_null_reverse_path(value: str) -> None:
    sender = parse_sender(value)
    assert sender == Address("", "")
    assert sender.is_null


def test_parse_sender_parses_normal_address() -> None:
    assert parse_sender("Bounce <b@example.com>") == Address("b", "example.com")


def test_parse_sender_does_not_take_line_break_for_empty() -> None:
    with pytest.raises(AddressError, match="control character"):
        parse_sender("\r\n", field="sender")


def test_parse_address_refuses_null_path() -> None:
    with pytest.raises(AddressError):
        parse_address("<>")


# -- parse_address_list ----------------------------------------------------------------------


def test_parse_address_list_in_order() -> None:
    value = '"Doe, Jane" <jane@example.com>, bob@example.org,  Carol <carol@example.net>'
    assert parse_address_list(value) == [
        Address("jane", "example.com"),
        Address("bob", "example.org"),
        Address("carol", "example.net"),
    ]


def test_parse_address_list_groups() -> None:
    assert parse_address_list("Undisclosed recipients: ;") == []
    assert parse_address_list("Team: a@x.com, B <b@y.com>;, c@z.com") == [
        Address("a", "x.com"),
        Address("b", "y.com"),
        Address("c", "z.com"),
    ]


def test_parse_address_list_skips_empty_elements() -> None:
    assert parse_address_list("a@x.com, , b@y.com,") == [
        Address("a", "x.com"),
        Address("b", "y.com"),
    ]
    assert parse_address_list("") == []


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("a@x.com, foo", "invalid address 'foo' in field Cc: missing '@'"),
        ("G: a@x.com", "unterminated group"),
        ("a@x.com;", "unexpected ';'"),
        ("G: H: a@x.com;;", "nested group"),
        ("a@x.com, c d@y.com", "space in an unquoted local part"),
    ],
)
def test_parse_address_list_refuses(value: str, reason: str) -> None:
    with pytest.raises(AddressError, match=re.escape(reason)) as info:
        parse_address_list(value, field="Cc")
    assert info.value.field == "Cc"


@given(st.lists(plain_addresses, max_size=5))
def test_parse_address_list_round_trips_joined_addresses(values: list[str]) -> None:
    expected = [Address(*value.split("@")) for value in values]
    assert parse_address_list(", ".join(values)) == expected


# -- check_header_value ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "value", ["x\r\nBcc: evil@x.com", "x\nBcc: y", "x\rBcc: y", "x\x00", "x\u2028Bcc: y"]
)
def test_check_header_value_refuses_line_breaks(value: str) -> None:
    with pytest.raises(HeaderInjectionError, match="header 'Subject' value contains CR or LF") as e:
        check_header_value("Subject", value)
    assert e.value.field == "Subject"


def test_check_header_value_accepts_ordinary_text() -> None:
    check_header_value("Subject", "Hello, wörld\t(tabs are fine)")


@given(st.text(), st.sampled_from(LINE_BREAKS), st.text())
def test_check_header_value_never_accepts_line_breaks(before: str, brk: str, after: str) -> None:
    with pytest.raises(HeaderInjectionError):
        check_header_value("X-Any", before + brk + after)


@given(st.text(alphabet=st.characters(blacklist_characters=LINE_BREAKS)))
def test_check_header_value_accepts_text_without_line_breaks(value: str) -> None:
    check_header_value("X-Any", value)


def test_parse_plain_address_list_takes_only_the_plainest_form() -> None:
    from twistmail.address import parse_plain_address_list

    got = parse_plain_address_list("Ann Lee <ann@example.org>, bob@example.org")
    assert got is not None
    assert [str(a) for a in got] == ["ann@example.org", "bob@example.org"]
    assert got == tuple(parse_address_list("Ann Lee <ann@example.org>, bob@example.org"))
    for value in (
        '"Lee, Ann" <ann@example.org>',  # quoted
        "Ann <ann@example.org>,bob@example.org",  # not joined by ", "
        "ann@bücher.example",  # non-ASCII
        "Team: ann@example.org;",  # a group
        "ann@exa_mple.org",  # not a host name
    ):
        assert parse_plain_address_list(value) is None, value
    # An IDNA A-label domain is checked by the full parser, not refused.
    (idna,) = parse_plain_address_list("a@xn--bcher-kva.example") or ()
    assert idna.domain == "xn--bcher-kva.example"


def test_atext_is_rfc5322_atext_and_the_non_ascii_rfc6532_allows() -> None:
    # address._ATEXT is written as a complement (it compiles faster); every code point must
    # fall on the same side as in the positive definition.
    positive = re.compile(
        "[A-Za-z0-9!#$%&'*+/=?^_`{|}~\\-\u00a0-\u2027\u202a-\ud7ff\ue000-\U0010ffff]"
    )
    every = "".join(map(chr, range(0x110000)))
    refused = positive.sub("", every)
    assert re.sub(address._ATEXT, "", every) == refused
    assert len(refused) == 0x20 + 1 + len('"(),.:;<>@[\\]') + 1 + 0x20 + 2 + 0x800
