"""The pure parts of submission: MAIL/RCPT arguments and a received message made ready to queue."""

from __future__ import annotations

import email
import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer

from twistmail.address import parse_address, parse_sender
from twistmail.message import unstuff
from twistmail.relay.incoming import (
    Incoming,
    LineTooLong,
    PathError,
    parse_path,
    received_header,
)

SENDER = parse_sender("app@example.com")
RCPT = parse_address("user@example.org")
RECEIVED = b"Received: from a ([127.0.0.1])\r\n\tby relay.test (twistmail) with ESMTP;\r\n\tx\r\n"


def incoming(*lines: bytes, max_size: int = 10_000) -> Incoming:
    message = Incoming(SENDER, [RCPT], max_size)
    for line in lines:
        message.line(line)
    return message


def test_parse_path_reads_the_address_and_parameters() -> None:
    address, params = parse_path(
        b"FROM:<app@example.com> SIZE=100 BODY=8BITMIME", b"FROM", null_ok=True
    )
    assert str(address) == "app@example.com"
    assert params == {"SIZE": "100", "BODY": "8BITMIME"}
    null, _ = parse_path(b"FROM:<>", b"FROM", null_ok=True)
    assert null.is_null
    routed, _ = parse_path(b"TO:<@relay.example:user@example.org>", b"TO", null_ok=False)
    assert str(routed) == "user@example.org"


def test_parse_path_gives_the_same_answer_again() -> None:
    argument = b"FROM:<again@example.com> SIZE=100"
    first, params = parse_path(argument, b"FROM", null_ok=True)
    params.pop("SIZE")  # the caller takes parameters out of its own dict
    second, params_again = parse_path(argument, b"FROM", null_ok=True)
    assert second == first
    assert params_again == {"SIZE": "100"}
    with pytest.raises(PathError):  # the keyword and null_ok still count
        parse_path(argument, b"TO", null_ok=False)
    with pytest.raises(PathError):
        parse_path(b"TO:<>", b"TO", null_ok=False)
    with pytest.raises(PathError):
        parse_path(b"TO:<>", b"TO", null_ok=False)


@pytest.mark.parametrize(
    ("argument", "keyword", "code", "text"),
    [
        (b"FROM:app@example.com", b"FROM", 501, "5.5.4"),
        (b"TO:<a@example.org>", b"FROM", 501, "5.5.4"),
        (b"FROM:<a@@example.com>", b"FROM", 553, "5.1.7"),
        (b"TO:<no-domain>", b"TO", 553, "5.1.3 invalid address 'no-domain' in field recipient"),
        (b"TO:<\xff@example.org>", b"TO", 501, "not valid UTF-8"),
    ],
)
def test_parse_path_refusals_name_the_problem(
    argument: bytes, keyword: bytes, code: int, text: str
) -> None:
    with pytest.raises(PathError) as caught:
        parse_path(argument, keyword, null_ok=keyword == b"FROM")
    assert caught.value.code == code
    assert text in caught.value.text


def test_missing_message_id_and_date_are_added_after_the_received_header() -> None:
    envelope = incoming(b"Subject: hi", b"", b"body").envelope(RECEIVED, "relay.test")
    assert envelope.payload.startswith(RECEIVED + b"Message-ID: <")
    message = email.message_from_bytes(unstuff(envelope.payload))
    assert message["Date"]
    assert envelope.message_id == message["Message-ID"]
    assert envelope.payload.endswith(b"Subject: hi\r\n\r\nbody\r\n.\r\n")


def test_present_message_id_and_date_are_kept_and_read() -> None:
    envelope = incoming(
        b"Message-ID: <x@app>", b"DATE: Tue, 01 Dec 2026 10:00:00 +0000", b"", b"b"
    ).envelope(RECEIVED, "relay.test")
    assert envelope.payload.count(b"Message-ID") == 1
    assert envelope.payload.lower().count(b"date:") == 1
    assert envelope.message_id == "<x@app>"


def test_data_without_a_header_section_becomes_a_body() -> None:
    envelope = incoming(b"just text, no headers").envelope(RECEIVED, "relay.test")
    head, _, body = envelope.payload.partition(b"\r\n\r\n")
    assert b"Message-ID" in head
    assert body == b"just text, no headers\r\n.\r\n"


def test_size_counts_octets_after_unstuffing_and_the_limit_keeps_reading() -> None:
    message = incoming(b"..", b"ab")
    assert message.size == len(b".\r\nab\r\n")
    big = incoming(b"x" * 600, b"x" * 600, max_size=1000)
    assert big.problem() == (552, "5.3.4 Message too big: the limit is 1000 octets")
    assert big.lines == []  # nothing kept once over


@pytest.mark.parametrize("line", [b"a\nb", b"a\rb", b"\r", b"x\n.\nMAIL FROM:<evil@x>"])
def test_a_bare_cr_or_lf_is_refused(line: bytes) -> None:
    assert incoming(b"Subject: s", b"", line).problem() == (
        550,
        "5.6.11 Bare CR or LF in the message: use CRLF line ends",
    )


@given(st.lists(st.binary(max_size=80).filter(lambda b: b"\r" not in b and b"\n" not in b)))
def test_the_queued_payload_unstuffs_to_the_received_lines(lines: list[bytes]) -> None:
    lines = [b"Subject: s", b"", *lines]
    envelope = incoming(*lines, max_size=10**6).envelope(RECEIVED, "h.test")
    body = unstuff(envelope.payload).split(b"\r\n\r\n", 1)[1]
    expected = b"".join(
        (line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines[2:]
    )
    assert body == expected
    assert envelope.payload.endswith(b"\r\n.\r\n")


def test_received_header_names_one_recipient_only() -> None:
    one = received_header(
        helo="app.test",
        client_ip="127.0.0.1",
        hostname="relay.test",
        protocol="ESMTPA",
        recipients=(RCPT,),
        now=0.0,
    )
    assert one.startswith(
        b"Received: from app.test ([127.0.0.1])\r\n\tby relay.test (twistmail) with ESMTPA"
    )
    assert b"for <user@example.org>" in one
    two = received_header(
        helo="bad\r\nhelo",
        client_ip="::1",
        hostname="relay.test",
        protocol="ESMTP",
        recipients=(RCPT, parse_address("b@example.org")),
        now=0.0,
    )
    assert b" for " not in two
    assert b"bad??helo" in two  # no line break smuggled in through HELO


_LINE = st.binary(max_size=40).filter(lambda b: b"\r" not in b and b"\n" not in b and b != b".")


@given(
    st.lists(_LINE, max_size=12),
    st.lists(st.integers(min_value=0, max_value=400), max_size=6),
    st.binary(max_size=10),
)
def test_data_fed_in_any_chunks_matches_line_by_line(
    lines: list[bytes], cuts: list[int], after: bytes
) -> None:
    wire = b"".join(line + b"\r\n" for line in lines) + b".\r\n"
    ends = sorted({min(cut, len(wire)) for cut in cuts} | {len(wire)})
    pieces = [wire[a:b] for a, b in zip([0, *ends[:-1]], ends, strict=True) if b > a]
    pieces[-1] += after  # what the client pipelined after the final dot is not the message's
    fed = Incoming(SENDER, [RCPT], 10_000)
    used = None
    for piece in pieces:
        assert used is None  # the end is found only in the piece holding it
        used = fed.feed(piece)
    assert used is not None
    assert pieces[-1][used:] == after
    by_line = incoming(*lines)
    assert (fed.size, fed.lines, fed.problem()) == (by_line.size, lines, None)
    assert (
        fed.envelope(RECEIVED, "h", now=0.0).payload.split(b"\r\n", 5)[5]
        == (by_line.envelope(RECEIVED, "h", now=0.0).payload.split(b"\r\n", 5)[5])
    )


@pytest.mark.parametrize("chunk", [1, 3, 7, 4096])
def test_fed_data_checks_size_bare_line_ends_and_line_length(chunk: int) -> None:
    def feed(wire: bytes, max_size: int = 1000) -> Incoming:
        message = Incoming(SENDER, [RCPT], max_size, max_line=100)
        for i in range(0, len(wire), chunk):
            if message.feed(wire[i : i + chunk]) is not None:
                return message
        raise AssertionError("the end was not found")

    exact = b"".join([b".." + b"x" * 7 + b"\r\n"] * 100)  # 1,000 octets once unstuffed
    assert feed(exact + b".\r\n").problem() is None
    assert feed(exact + b"y\r\n.\r\n").problem() == (
        552,
        "5.3.4 Message too big: the limit is 1000 octets",
    )
    big = feed(b"x" * 90 + b"\r\n" + (b"y" * 90 + b"\r\n") * 10_000 + b".\r\n")
    assert big.too_big
    assert len(big._buf) < 200  # what was over the limit was not kept
    for smuggled in (b"a\n.\nMAIL FROM:<e@x>\r\n", b"a\r.\r\r\n", b"x\r\r\n", b"\n\r\n"):
        assert feed(b"Subject: s\r\n\r\n" + smuggled + b".\r\n").problem() == (
            550,
            "5.6.11 Bare CR or LF in the message: use CRLF line ends",
        )
    assert feed(b"x" * 100 + b"\r\n.\r\n").problem() is None
    with pytest.raises(LineTooLong):
        feed(b"x\r\n" + b"x" * 101 + b"\r\n.\r\n")
    with pytest.raises(LineTooLong):
        feed(b"x" * 50 + b"\r\n" + b"x" * 200)


def test_allow_from_is_answered_the_same_for_many_clients_asked_again() -> None:
    from twisted.internet.task import Clock

    from twistmail.relay.config import RelayConfig
    from twistmail.relay.listener import SubmissionFactory

    config = RelayConfig(
        smtp_url="smtp://127.0.0.1:2",
        allow_from=(ipaddress.ip_network("10.0.0.0/16"), ipaddress.ip_network("::1/128")),
    )
    factory = SubmissionFactory(config, lambda envelope, client: defer.succeed(1), clock=Clock())
    # More than the memo keeps (4,096): it starts again on the way.
    clients = [f"10.{a}.{b}.{c}" for a in (0, 1) for b in range(256) for c in range(1, 10)]
    for _ in range(2):
        answers = [factory.allowed(ip) for ip in clients]
        assert answers == [ip.startswith("10.0.") for ip in clients]
    assert factory.allowed("::1")
    assert factory.allowed("::ffff:10.0.0.9")
    assert not factory.allowed("not an address")
