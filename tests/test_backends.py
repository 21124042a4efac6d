"""One contract, every backend: the same tests run against smtp (two real servers), console,
file, locmem, dummy and spool (txacme-style parametrised fixture).

What each backend delivered is read back from where it went (the SMTP server, the stream, the
directory, the outbox) as the message bytes, so the suite can also check that every backend
delivers exactly what the smtp backend puts on the wire.
"""

from __future__ import annotations

import email
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer
from zope.interface.verify import verifyObject

from twistmail import Envelope, envelope_from_message, get_backend
from twistmail.backends.console import SEPARATOR
from twistmail.errors import AddressError, HeaderInjectionError, PermanentError
from twistmail.interfaces import IBackend
from twistmail.message import unstuff
from twistmail.testing import outbox

BACKENDS = ["smtp", "smtp-aiosmtpd", "console", "file", "locmem", "dummy", "spool"]


@dataclass
class Harness:
    """A way to make one kind of backend and to see what it delivered."""

    name: str
    make_backend: Callable[..., IBackend]
    delivered: Callable[[], list[bytes]] | None
    """The message bytes delivered so far (CRLF, not dot-stuffed); None when unobservable."""
    refused_recipient: str | None = None
    """A valid address the destination refuses with 550 (network backends only)."""
    made: list[IBackend] = field(default_factory=list)

    def backend(self, **options: Any) -> IBackend:
        backend = self.make_backend(**options)
        self.made.append(backend)
        return backend

    def subjects(self) -> list[str] | None:
        if self.delivered is None:
            return None
        parsed = [
            email.message_from_bytes(data, policy=policy.default) for data in self.delivered()
        ]
        return sorted(str(m["Subject"]) for m in parsed)


def _console_delivered(stream: io.StringIO) -> list[bytes]:
    chunks = stream.getvalue().split(SEPARATOR)
    assert chunks[-1] == ""  # every message ends with the separator
    return [chunk.replace("\n", "\r\n").encode("utf-8") for chunk in chunks[:-1]]


def _file_delivered(directory: Path) -> list[bytes]:
    if not directory.exists():
        return []
    assert not list(directory.glob(".*.tmp"))  # no temporary file left behind
    return [path.read_bytes() for path in sorted(directory.glob("*.eml"))]


@pytest.fixture(params=BACKENDS)
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    name: str = request.param
    if name == "smtp":
        capture = request.getfixturevalue("capture_server")(
            rcpt_replies={"refused": (550, "5.1.1 no such user")}
        )
        url = f"smtp://127.0.0.1:{capture.port}"
        h = Harness(
            name,
            lambda **o: get_backend("smtp", url=url, retry_delay=0.01, **o),
            lambda: [m.data for m in capture.messages],
            "refused@example.org",
        )
    elif name == "smtp-aiosmtpd":
        cue = request.getfixturevalue("cue_server")(
            rcpt_replies={"refused": "550 5.1.1 no such user"}
        )
        url = f"smtp://127.0.0.1:{cue.port}"
        h = Harness(
            name,
            lambda **o: get_backend("smtp", url=url, retry_delay=0.01, **o),
            lambda: [m.data for m in cue.received],
            "refused@example.org",
        )
    elif name == "console":
        stream = io.StringIO()
        h = Harness(
            name,
            lambda **o: get_backend("console", stream=stream, **o),
            lambda: _console_delivered(stream),
        )
    elif name == "file":
        directory = tmp_path / "mail" / "out"  # a missing directory is created
        h = Harness(
            name,
            lambda **o: get_backend("file", file_path=directory, **o),
            lambda: _file_delivered(directory),
        )
    elif name == "locmem":
        h = Harness(name, lambda **o: get_backend("locmem", **o), lambda: [m.data for m in outbox])
    elif name == "dummy":
        h = Harness(name, lambda **o: get_backend("dummy", **o), None)
    else:
        spool_path = tmp_path / "spool.db"
        h = Harness(name, lambda **o: get_backend("spool", path=spool_path, **o), None)
    yield h
    # A safety net: the tests close their backends themselves.
    pytest_twisted.blockon(defer.gatherResults([b.close() for b in h.made]))


def message(subject: str, to: str = "user@example.org") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "sender@example.com"
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{subject}@example.com>"
    msg.set_content(f"Body of {subject}.\n.leading dot stays\n")
    return msg


def triple(subject: str) -> tuple[str, list[str], bytes]:
    data = f"From: sender@example.com\r\nTo: t@example.org\r\nSubject: {subject}\r\n\r\nhi\r\n"
    return ("sender@example.com", ["t@example.org"], data.encode("ascii"))


def bad_address(subject: str) -> EmailMessage:
    return message(subject, to="not an address")


def header_injection(subject: str) -> EmailMessage:
    msg = message(subject)
    msg.set_raw("X-Note", "hi\r\nBcc: evil@example.com")
    return msg


def no_recipients(subject: str) -> EmailMessage:
    msg = message(subject)
    del msg["To"]
    return msg


# The contract --------------------------------------------------------------------------------


def test_provides_ibackend(harness: Harness) -> None:
    backend = harness.backend()
    assert verifyObject(IBackend, backend)
    assert backend.fail_silently is False
    assert harness.backend(fail_silently=True).fail_silently is True


@pytest_twisted.ensureDeferred
async def test_every_kind_of_message_is_delivered_and_counted(harness: Harness) -> None:
    backend = harness.backend()
    envelope = envelope_from_message(message("as-envelope"))
    assert isinstance(envelope, Envelope)
    count = await backend.send_messages([message("as-message"), triple("as-triple"), envelope])
    await backend.close()
    assert count == 3
    if harness.subjects() is not None:
        assert harness.subjects() == ["as-envelope", "as-message", "as-triple"]


@pytest_twisted.ensureDeferred
async def test_delivers_exactly_the_bytes_smtp_sends(harness: Harness) -> None:
    msg = message("exact")
    del msg["Subject"]
    msg["Subject"] = "Grüße — exact"  # non-ASCII: encoded the same way everywhere
    wire = unstuff(envelope_from_message(msg).payload)
    backend = harness.backend()
    assert await backend.send_messages([msg]) == 1
    await backend.close()
    if harness.delivered is not None:
        assert harness.delivered() == [wire]


@pytest_twisted.ensureDeferred
async def test_an_empty_list_sends_nothing(harness: Harness) -> None:
    backend = harness.backend()
    assert await backend.send_messages([]) == 0
    assert await backend.send_messages(iter(())) == 0
    await backend.close()
    if harness.subjects() is not None:
        assert harness.subjects() == []


@pytest_twisted.ensureDeferred
async def test_messages_without_recipients_are_skipped_and_not_counted(harness: Harness) -> None:
    backend = harness.backend()
    empty_envelope = Envelope(**{**vars_of(envelope_from_message(message("x"))), "recipients": ()})
    count = await backend.send_messages(
        [
            no_recipients("no-to"),
            ("sender@example.com", [], b"Subject: none\r\n\r\nhi\r\n"),
            empty_envelope,
            message("kept"),
        ]
    )
    await backend.close()
    assert count == 1
    if harness.subjects() is not None:
        assert harness.subjects() == ["kept"]


def vars_of(envelope: Envelope) -> dict[str, Any]:
    return {name: getattr(envelope, name) for name in Envelope.__dataclass_fields__}


@pytest.mark.parametrize(
    ("make_invalid", "error"),
    [(bad_address, AddressError), (header_injection, HeaderInjectionError)],
)
@pytest_twisted.ensureDeferred
async def test_an_invalid_message_fails_the_call_after_the_others_were_sent(
    harness: Harness, make_invalid: Callable[[str], EmailMessage], error: type[Exception]
) -> None:
    backend = harness.backend()
    with pytest.raises(error):
        await backend.send_messages([message("before"), make_invalid("bad"), message("after")])
    await backend.close()
    if harness.subjects() is not None:
        assert harness.subjects() == ["after", "before"]


@pytest_twisted.ensureDeferred
async def test_fail_silently_swallows_invalid_messages_and_does_not_count_them(
    harness: Harness,
) -> None:
    backend = harness.backend(fail_silently=True)
    count = await backend.send_messages(
        [bad_address("bad"), message("good"), header_injection("evil"), ("x", "y", b"z")]
    )
    await backend.close()
    assert count == 1
    if harness.subjects() is not None:
        assert harness.subjects() == ["good"]


@pytest_twisted.ensureDeferred
async def test_a_refused_message_fails_unless_fail_silently(harness: Harness) -> None:
    if harness.refused_recipient is None:
        pytest.skip("only a network backend has a server that refuses")
    refused = message("refused", to=harness.refused_recipient)
    loud = harness.backend()
    with pytest.raises(PermanentError) as info:
        await loud.send_messages([refused, message("loud-ok")])
    assert info.value.code == 550
    quiet = harness.backend(fail_silently=True)
    assert await quiet.send_messages([message("quiet-ok"), refused]) == 1
    await loud.close()
    await quiet.close()
    assert harness.subjects() == ["loud-ok", "quiet-ok"]


@pytest_twisted.ensureDeferred
async def test_concurrent_calls_each_count_their_own_messages(harness: Harness) -> None:
    backend = harness.backend()
    calls = [backend.send_messages([message(f"c{i:02d}-{j}") for j in range(3)]) for i in range(20)]
    results = await defer.DeferredList(calls, fireOnOneErrback=True, consumeErrors=True)
    await backend.close()
    assert [result for _, result in results] == [3] * 20
    if harness.subjects() is not None:
        assert harness.subjects() == sorted(f"c{i:02d}-{j}" for i in range(20) for j in range(3))


@pytest_twisted.ensureDeferred
async def test_open_and_close_are_idempotent_and_sending_reopens(harness: Harness) -> None:
    backend = harness.backend()
    assert await backend.close() is None  # never opened
    assert await backend.open() is None
    assert await backend.open() is None
    assert await backend.send_messages([message("first")]) == 1
    assert await backend.close() is None
    assert await backend.close() is None
    assert await backend.send_messages([message("second")]) == 1  # after close: reopens
    await backend.close()
    if harness.subjects() is not None:
        assert harness.subjects() == ["first", "second"]


def test_one_message_instead_of_a_list_is_a_type_error(harness: Harness) -> None:
    backend = harness.backend()
    with pytest.raises(TypeError, match="iterable of messages"):
        backend.send_messages(message("lonely"))  # type: ignore[arg-type]
