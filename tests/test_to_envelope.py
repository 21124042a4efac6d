"""One envelope conversion for the Mailer and the backends: the same refusals, the same errors.

``twistmail.message.to_envelope`` turns what a caller gives into an Envelope or raises a
MessageError; ``Mailer.send``, ``Mailer.send_many`` and every backend go through it, so a message
refused by one is refused by the others in the same words (a backend only adds Django's "no
recipients: skipped").
"""

from __future__ import annotations

from email.message import EmailMessage
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from twistmail import AddressError, Envelope, Mailer, MessageError, SendResult, get_backend
from twistmail.message import to_envelope
from twistmail.testing import outbox

DATA = b"Subject: hi\r\n\r\nbody\r\n"

# (what the caller gives, words of the MessageError every door must give for it)
UNSENDABLE: list[tuple[Any, str]] = [
    (("a@example.com", ["b@example.org"], "a str body"), "must be bytes, not str"),
    (("a@example.com", "b@example.org", DATA), "not a single str"),
    (("a@example.com", [42], DATA), "int"),
    (42, "cannot send int"),
    ("Subject: hi\r\n\r\nbody\r\n", "cannot send str"),
    ({"to": "b@example.org"}, "cannot send dict"),
]
IDS = ["str-body", "str-recipients", "int-recipient", "int", "str-message", "dict"]


def failure_of(d: defer.Deferred[Any]) -> Failure:
    """The failure ``d`` has already failed with (it must not be pending or succeeded)."""
    failures: list[Failure] = []
    d.addErrback(failures.append)
    assert failures, f"{d!r} has not failed"
    return failures[0]


@pytest.mark.parametrize(("message", "words"), UNSENDABLE, ids=IDS)
def test_to_envelope_raises_a_message_error(message: Any, words: str) -> None:
    with pytest.raises(MessageError, match=words):
        to_envelope(message)


@pytest.mark.parametrize(("message", "words"), UNSENDABLE, ids=IDS)
def test_mailer_send_fails_its_deferred_with_the_same_error(message: Any, words: str) -> None:
    reactor = MemoryReactorClock()
    mailer = Mailer("smtp://127.0.0.1:2525", reactor=reactor)
    d = mailer.send(message)  # never raises: the Deferred carries the error
    failure = failure_of(d)
    assert failure.check(MessageError)
    assert words in str(failure.value)
    assert reactor.tcpClients == []  # refused before any connection


@pytest.mark.parametrize(("message", "words"), UNSENDABLE, ids=IDS)
def test_mailer_send_many_counts_it_invalid(message: Any, words: str) -> None:
    reactor = MemoryReactorClock()
    mailer = Mailer("smtp://127.0.0.1:2525", reactor=reactor)
    results: list[tuple[int, SendResult | Exception]] = []
    d = mailer.send_many([message], on_result=lambda i, r: results.append((i, r)))
    reports: list[Any] = []
    d.addCallback(reports.append)
    assert reports, "send_many did not fire"
    assert reports[0].invalid == 1
    [(index, error)] = results
    assert index == 0
    assert isinstance(error, MessageError)
    assert words in str(error)
    assert reactor.tcpClients == []


@pytest.mark.parametrize(("message", "words"), UNSENDABLE, ids=IDS)
def test_a_backend_fails_with_the_same_error(message: Any, words: str) -> None:
    outbox.clear()
    backend = get_backend("locmem")
    failure = failure_of(backend.send_messages([message]))
    assert failure.check(MessageError)
    assert words in str(failure.value)
    assert outbox == []


@pytest.mark.parametrize(("message", "words"), UNSENDABLE, ids=IDS)
def test_a_silent_backend_counts_it_unsent(message: Any, words: str) -> None:
    outbox.clear()
    backend = get_backend("locmem", fail_silently=True)
    sent: list[int] = []
    backend.send_messages([message, ("a@example.com", ["c@example.org"], DATA)]).addCallback(
        sent.append
    )
    assert sent == [1]
    assert [m.recipients for m in outbox] == [["c@example.org"]]


def test_raw_bytes_need_sender_and_recipients_in_the_mailer() -> None:
    mailer = Mailer("smtp://127.0.0.1:2525", reactor=MemoryReactorClock())
    failure = failure_of(mailer.send(DATA, sender="a@example.com"))
    assert failure.check(MessageError)
    assert "explicit sender= and recipients=" in str(failure.value)


def test_no_recipients_fails_in_the_mailer_but_is_skipped_by_a_backend() -> None:
    empty = ("a@example.com", [], DATA)
    with pytest.raises(AddressError, match="no recipients"):
        to_envelope(empty)
    outbox.clear()
    counted: list[int] = []
    get_backend("locmem").send_messages([empty]).addCallback(counted.append)
    assert counted == [0]
    assert outbox == []


def test_what_can_be_sent_comes_out_the_same_from_both() -> None:
    msg = EmailMessage()
    msg["From"] = "a@example.com"
    msg["To"] = "b@example.org"
    msg["Bcc"] = "c@example.org"
    # Given, so that each rendering of the message is the same bytes.
    msg["Date"] = "Mon, 02 Nov 2026 10:00:00 +0000"
    msg["Message-ID"] = "<same@example.com>"
    msg.set_content("hello")
    envelope = to_envelope(msg)
    assert [str(r) for r in envelope.recipients] == ["b@example.org", "c@example.org"]
    assert to_envelope(envelope) is envelope
    triple = to_envelope(("a@example.com", iter(["b@example.org"]), DATA))
    assert triple.payload == DATA + b".\r\n"
    overridden = to_envelope(msg, sender="x@example.com", recipients=["y@example.org"])
    assert (str(overridden.sender), [str(r) for r in overridden.recipients]) == (
        "x@example.com",
        ["y@example.org"],
    )
    raw = to_envelope(bytearray(DATA), sender="a@example.com", recipients=["b@example.org"])
    assert isinstance(raw, Envelope)
    assert raw.payload == triple.payload
    outbox.clear()
    counted: list[int] = []
    get_backend("locmem").send_messages(
        [msg, ("a@example.com", ["b@example.org"], DATA)]
    ).addCallback(counted.append)
    assert counted == [2]
    assert outbox[0].data == envelope.payload[: -len(b".\r\n")]
