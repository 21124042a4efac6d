"""What each backend does beyond the shared contract (tests/test_backends.py)."""

from __future__ import annotations

import email
import io
import itertools
import os
import re
import subprocess
import sys
import textwrap
from email import policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer

import twistmail.testing
from twistmail import envelope_from_message, get_backend
from twistmail.backends import locmem
from twistmail.backends.console import SEPARATOR
from twistmail.backends.file import FileBackend, eml_name
from twistmail.backends.smtp import DEFAULT_URL, SMTPBackend
from twistmail.errors import ConnectError
from twistmail.message import unstuff

_ids = itertools.count()


def message(subject: str, **headers: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "sender@example.com"
    msg["To"] = "user@example.org"
    for name, value in headers.items():
        msg[name] = value
    msg["Subject"] = subject
    # Given, so that rendering the message again gives the same bytes.
    msg["Date"] = "Mon, 02 Nov 2026 10:00:00 +0000"
    msg["Message-ID"] = f"<m{next(_ids)}@example.com>"
    msg.set_content(f"Body of {subject}.\n")
    return msg


# smtp ----------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_smtp_reuses_its_connection_across_calls_until_close(capture_server: Any) -> None:
    server = capture_server()
    backend = get_backend("smtp", url=f"smtp://127.0.0.1:{server.port}", concurrency=1)
    await backend.open()
    assert server.connections == 1  # open() connects
    for i in range(3):
        assert await backend.send_messages([message(f"m{i}"), message(f"n{i}")]) == 2
    assert server.connections == 1
    await backend.close()
    assert await backend.send_messages([message("again")]) == 1
    await backend.close()
    assert server.connections == 2  # a new pool after close()
    assert len(server.messages) == 7


@pytest_twisted.ensureDeferred
async def test_smtp_counts_a_partly_refused_message_as_sent(capture_server: Any) -> None:
    server = capture_server(rcpt_replies={"gone": (550, "5.1.1 gone")})
    backend = get_backend("smtp", url=f"smtp://127.0.0.1:{server.port}")
    partly = message("partly", Cc="gone@example.org")
    assert await backend.send_messages([partly]) == 1
    await backend.close()
    assert server.messages[0].recipients == [b"user@example.org"]


@pytest_twisted.ensureDeferred
async def test_smtp_open_fails_without_a_server_unless_fail_silently(
    capture_server: Any,
) -> None:
    server = capture_server()
    port = server.port
    await server.stop()  # nothing listens on this port any more
    url = f"smtp://127.0.0.1:{port}"
    loud = get_backend("smtp", url=url, max_attempts=1, connect_timeout=5)
    with pytest.raises(ConnectError):
        await loud.open()
    with pytest.raises(ConnectError):
        await loud.send_messages([message("lost")])
    quiet = get_backend("smtp", url=url, max_attempts=1, fail_silently=True)
    assert await quiet.open() is None
    assert await quiet.send_messages([message("lost")]) == 0
    await loud.close()
    await quiet.close()


def test_smtp_url_defaults_to_the_environment_then_localhost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TWISTMAIL_SMTP_URL", raising=False)
    assert DEFAULT_URL == "smtp://localhost:25"
    server = SMTPBackend().mailer.server
    assert (server.host, server.port) == ("localhost", 25)
    monkeypatch.setenv("TWISTMAIL_SMTP_URL", "smtp://mail.example.com:2525")
    server = SMTPBackend().mailer.server
    assert (server.host, server.port) == ("mail.example.com", 2525)
    server = SMTPBackend(url="smtp://other.example.com").mailer.server
    assert (server.host, server.port) == ("other.example.com", 25)


def test_smtp_backend_repr_hides_the_password() -> None:
    backend = SMTPBackend(url="smtp://alice:s3cret@mail.example.com")
    assert "s3cret" not in repr(backend)
    assert "mail.example.com" in repr(backend)


def test_smtp_refuses_unknown_options_and_bad_urls_at_construction() -> None:
    with pytest.raises(TypeError, match="concurency"):
        get_backend("smtp", url="smtp://localhost", concurency=3)
    with pytest.raises(ValueError, match=r"http"):
        get_backend("smtp", url="http://localhost")


# console -------------------------------------------------------------------------------------


class _RecordingStream(io.StringIO):
    """A real text stream that also remembers each write call."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


@pytest_twisted.ensureDeferred
async def test_console_writes_each_message_and_separator_in_one_write() -> None:
    stream = _RecordingStream()
    backend = get_backend("console", stream=stream)
    calls = [backend.send_messages([message(f"c{i}"), message(f"d{i}")]) for i in range(10)]
    assert await defer.gatherResults(calls) == [2] * 10
    assert len(stream.writes) == 20
    for text in stream.writes:
        assert text.endswith("\n" + SEPARATOR)
        parsed = email.message_from_string(text[: -len(SEPARATOR)], policy=policy.default)
        assert parsed["To"] == "user@example.org"
        assert parsed.get_content().strip().startswith("Body of ")
    assert stream.getvalue() == "".join(stream.writes)


@pytest_twisted.ensureDeferred
async def test_console_defaults_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    assert await get_backend("console").send_messages([message("to stdout")]) == 1
    out = capsys.readouterr().out
    assert "Subject: to stdout\n" in out
    assert out.endswith("\n" + "-" * 79 + "\n")
    assert "\r" not in out


# file ----------------------------------------------------------------------------------------

_NAME = re.compile(r"\d{20}-\d+-\d{8}-[0-9a-f]{8}\.eml")


def test_eml_names_sort_by_time_and_never_repeat() -> None:
    names = [eml_name() for _ in range(2000)]
    assert all(_NAME.fullmatch(name) for name in names)
    assert len(set(names)) == len(names)
    assert sorted(names) == names


@pytest_twisted.ensureDeferred
async def test_file_writes_exact_bytes_off_the_reactor_thread(tmp_path: Path) -> None:
    msg = message("exact", Bcc="hidden@example.org")
    backend = get_backend("file", file_path=tmp_path)
    d = backend.send_messages([msg])
    assert not d.called  # the write happens in the thread pool, not here
    assert list(tmp_path.iterdir()) == []
    assert await d == 1
    await backend.close()
    [path] = tmp_path.iterdir()
    assert _NAME.fullmatch(path.name)
    assert path.read_bytes() == unstuff(envelope_from_message(msg).payload)
    assert b"hidden@example.org" not in path.read_bytes()


@pytest_twisted.ensureDeferred
async def test_file_close_waits_for_writes_in_flight(tmp_path: Path) -> None:
    backend = get_backend("file", file_path=tmp_path)
    sending = backend.send_messages([message(f"f{i}") for i in range(50)])
    await backend.close()
    assert len(list(tmp_path.glob("*.eml"))) == 50
    assert await sending == 50


@pytest_twisted.ensureDeferred
async def test_file_path_that_is_a_file_fails_unless_fail_silently(tmp_path: Path) -> None:
    not_a_directory = tmp_path / "taken"
    not_a_directory.write_text("x")
    loud = get_backend("file", file_path=not_a_directory)
    with pytest.raises(OSError, match="exists"):
        await loud.send_messages([message("nowhere")])
    quiet = get_backend("file", file_path=not_a_directory, fail_silently=True)
    assert await quiet.send_messages([message("nowhere")]) == 0
    assert not_a_directory.read_text() == "x"


def test_file_path_is_required() -> None:
    with pytest.raises(TypeError, match="file_path"):
        get_backend("file")


_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from twisted.internet import defer, task
    from twistmail.backends.file import FileBackend

    directory, count, tag = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    messages = [
        ("s@example.com", ["r@example.org"], f"Subject: {tag}-{i}\\r\\n\\r\\nhi\\r\\n".encode())
        for i in range(count)
    ]

    async def main(reactor):
        backend = FileBackend(file_path=directory, reactor=reactor)
        sent = await backend.send_messages(messages)
        await backend.close()
        print(sent)

    sys.stdin.readline()  # start writing together with the other process
    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
    """
)


def test_file_names_never_collide_across_processes(tmp_path: Path) -> None:
    directory, count = tmp_path / "out", 400
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    writers = [
        subprocess.Popen(
            [sys.executable, str(script), str(directory), str(count), tag],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for tag in ("a", "b")
    ]
    for writer in writers:  # both are ready; let them go
        assert writer.stdin is not None
        writer.stdin.write("go\n")
        writer.stdin.flush()
    outputs = [writer.communicate(timeout=120) for writer in writers]
    for writer, (out, err) in zip(writers, outputs, strict=True):
        assert writer.returncode == 0, err
        assert out.strip() == str(count)
    names = sorted(path.name for path in directory.iterdir())
    assert len(names) == 2 * count
    assert all(_NAME.fullmatch(name) for name in names)  # no temporary file left
    pids = {name.split("-")[1] for name in names}
    assert pids == {str(writer.pid) for writer in writers}
    subjects = sorted(
        str(email.message_from_bytes((directory / n).read_bytes())["Subject"]) for n in names
    )
    assert subjects == sorted(f"{tag}-{i}" for tag in "ab" for i in range(count))


# locmem --------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_locmem_outbox_keeps_envelope_headers_bodies_and_exact_bytes() -> None:
    msg = message("Grüße", Bcc="hidden@example.org")
    msg.add_alternative("<p>Body</p>\n", subtype="html")
    msg.set_boundary("fixed-boundary")  # so that rendering it again gives the same bytes
    assert await get_backend("locmem").send_messages([msg]) == 1
    [sent] = twistmail.testing.outbox
    assert sent["Subject"] == "Grüße"
    assert sent["X-Missing"] is None
    assert sent.subject == "Grüße"
    assert sent.sender == "sender@example.com"
    assert sent.recipients == ["user@example.org", "hidden@example.org"]
    assert sent["Bcc"] is None  # not part of what is sent
    assert sent.body == "Body of Grüße.\n"
    assert sent.html == "<p>Body</p>\n"
    assert sent.data == unstuff(envelope_from_message(msg).payload)
    msg.replace_header("Subject", "changed later")
    assert sent["Subject"] == "Grüße"  # a snapshot, not the caller's object


def test_locmem_outbox_is_the_testing_outbox_and_starts_empty(
    mail_outbox: list[locmem.OutboxMessage],
) -> None:
    assert twistmail.testing.outbox is locmem.outbox is mail_outbox
    assert mail_outbox == []


@pytest_twisted.ensureDeferred
async def test_mail_backend_fixture_fills_mail_outbox(
    mail_backend: Any, mail_outbox: list[locmem.OutboxMessage]
) -> None:
    assert await mail_backend.send_messages([message("one"), message("two")]) == 2
    assert [m.subject for m in mail_outbox] == ["one", "two"]
    assert mail_outbox[0].html is None


# dummy ---------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_dummy_counts_without_delivering(mail_outbox: list[locmem.OutboxMessage]) -> None:
    backend = get_backend("dummy")
    assert await backend.send_messages([message(str(i)) for i in range(5)]) == 5
    assert mail_outbox == []


def test_file_backend_class_is_exported() -> None:
    assert FileBackend.__module__ == "twistmail.backends.file"
    assert os.path.basename(__file__) == "test_backend_kinds.py"
