"""The reply reader alone: chunks of bytes in, whole SMTP replies out (no protocol, no I/O)."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from twistmail.smtp._replies import MALFORMED, MAX_LINE, OVERLONG, ReplyReader, reply_code

STREAM = (
    b"250 2.1.0 Ok\r\n"
    b"250-first line\r\n250-second\r\n250 last\r\n"
    b"354 End data with <CR><LF>.<CR><LF>\r\n"
    b"451 4.3.0 try later\n"  # a bare LF ends a line too
    b"221\r\n"  # a code alone
    b"550-5.1.1 no such\r\n550 5.1.1 user\r\n"
)
REPLIES = [
    (250, b"2.1.0 Ok"),
    (250, b"first line\nsecond\nlast"),
    (354, b"End data with <CR><LF>.<CR><LF>"),
    (451, b"4.3.0 try later"),
    (221, b""),
    (550, b"5.1.1 no such\n5.1.1 user"),
]


def test_a_stream_in_one_chunk() -> None:
    assert ReplyReader().feed(STREAM) == REPLIES


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_any_chunking_gives_the_same_replies(cuts: list[int]) -> None:
    # Lines (and CRLFs) split anywhere across reads.
    bounds = [0, *sorted(cuts), len(STREAM)]
    reader = ReplyReader()
    got = []
    for start, end in itertools.pairwise(bounds):
        got += reader.feed(STREAM[start:end])
    assert got == REPLIES


def test_an_incomplete_reply_waits_for_its_last_line() -> None:
    reader = ReplyReader()
    assert reader.feed(b"250-one\r\n250-two\r") == []
    assert reader.feed(b"\n250 three") == []
    assert reader.feed(b"\r\n") == [(250, b"one\ntwo\nthree")]


def test_only_the_line_ending_cr_goes() -> None:
    assert ReplyReader().feed(b"250 a\rb\r\r\n") == [(250, b"a\rb\r")]


def test_a_malformed_line_ends_the_stream_after_the_replies_before_it() -> None:
    reader = ReplyReader()
    assert reader.feed(b"250 ok\r\n25x nonsense\r\n250 never read\r\n") == [
        (250, b"ok"),
        (MALFORMED, b"25x nonsense"),
    ]
    assert reader.feed(b"250 more\r\n") == []


def test_reply_codes() -> None:
    assert reply_code(b"250") == 250
    assert reply_code(b"421 4.4.2 bye") == 421
    for line in (b"199 low", b"600 high", b"abc", b"25", b"250x", b"", b"2500 ok"):
        assert reply_code(line) == MALFORMED, line


def test_an_endless_line_is_refused_once_over_the_limit() -> None:
    reader = ReplyReader()
    assert reader.feed(b"250 ok\r\n250 " + b"x" * (MAX_LINE - 4)) == [(250, b"ok")]
    assert reader.feed(b"xx") == [(OVERLONG, b"")]
    assert reader.feed(b"\r\n") == []
