"""get_backend (aliases, dotted paths, clear errors), the default backend, send_mail, the pytest
plugin as installed, and the README's "Delivery backends" section."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from zope.interface import implementer

import twistmail
from twistmail import get_backend, send_mail
from twistmail.backends import (
    ALIASES,
    ConsoleBackend,
    DummyBackend,
    FileBackend,
    LocmemBackend,
    OutboxMessage,
    SMTPBackend,
    UnknownBackendError,
    configure,
    default_backend,
)
from twistmail.backends.api import _swap_default
from twistmail.errors import AddressError, HeaderInjectionError, TwistmailError
from twistmail.interfaces import IBackend

ROOT = Path(__file__).resolve().parent.parent


# get_backend ---------------------------------------------------------------------------------


def test_aliases_name_the_backend_classes(tmp_path: Path) -> None:
    assert isinstance(get_backend("smtp", url="smtp://localhost"), SMTPBackend)
    assert isinstance(get_backend("console"), ConsoleBackend)
    assert isinstance(get_backend("file", file_path=tmp_path), FileBackend)
    assert isinstance(get_backend("locmem"), LocmemBackend)
    assert isinstance(get_backend("dummy", fail_silently=True), DummyBackend)
    assert sorted(ALIASES) == ["console", "dummy", "file", "locmem", "smtp", "spool"]


def test_spool_alias_loads_the_spool_backend(tmp_path: Path) -> None:
    from twistmail.backends.spool import SpoolBackend

    assert isinstance(get_backend("spool", path=tmp_path / "s.db"), SpoolBackend)


@implementer(IBackend)
class CustomBackend(DummyBackend):
    """A backend of the user's own, found by its dotted path."""

    def __init__(self, fail_silently: bool = False, *, label: str = "") -> None:
        super().__init__(fail_silently)
        self.label = label


class NotABackend:
    def __init__(self, **options: Any) -> None:
        self.options = options


def test_a_dotted_path_loads_any_importable_class() -> None:
    backend = get_backend("test_backends_api.CustomBackend", label="mine", fail_silently=True)
    assert isinstance(backend, CustomBackend)
    assert (backend.label, backend.fail_silently) == ("mine", True)
    assert isinstance(get_backend("twistmail.backends.dummy.DummyBackend"), DummyBackend)


def test_an_unknown_alias_lists_the_aliases() -> None:
    with pytest.raises(UnknownBackendError, match=r"unknown backend 'smpt'.*console.*smtp"):
        get_backend("smpt")


def test_a_missing_module_is_named_in_the_error() -> None:
    with pytest.raises(UnknownBackendError) as info:
        get_backend("no_such_package.mail.Backend")
    message = str(info.value)
    assert "no_such_package.mail.Backend" in message
    assert "importing 'no_such_package.mail' failed" in message
    assert "No module named 'no_such_package'" in message
    assert isinstance(info.value, ImportError)
    assert isinstance(info.value, TwistmailError)
    assert info.value.name == "no_such_package"


def test_a_missing_class_is_named_in_the_error() -> None:
    with pytest.raises(UnknownBackendError, match=r"'twistmail.backends.smtp' has no attribute"):
        get_backend("twistmail.backends.smtp.NoSuchBackend")


def test_an_import_error_inside_the_backend_module_names_what_failed(tmp_path: Path) -> None:
    (tmp_path / "broken_backend_mod.py").write_text("import missing_dependency_xyz\n")
    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(UnknownBackendError, match="missing_dependency_xyz") as info:
            get_backend("broken_backend_mod.Backend")
    finally:
        sys.path.remove(str(tmp_path))
    assert "broken_backend_mod.Backend" in str(info.value)


def test_a_class_that_is_not_a_backend_is_refused() -> None:
    with pytest.raises(TypeError, match="does not provide IBackend"):
        get_backend("test_backends_api.NotABackend")


def test_an_unknown_option_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="colour"):
        get_backend("console", colour="red")


# send_mail and the default backend -----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_send_mail_builds_a_text_message_with_an_html_alternative(
    mail_outbox: list[OutboxMessage],
) -> None:
    count = await send_mail(
        "Hello",
        "Plain body\n",
        "Site <site@example.com>",
        ["ann@example.org", "bob@example.net"],
        html="<p>HTML body</p>\n",
        backend=LocmemBackend(),
    )
    assert count == 1
    [sent] = mail_outbox
    assert sent.subject == "Hello"
    assert sent["From"] == "Site <site@example.com>"
    assert sent["To"] == "ann@example.org, bob@example.net"
    assert sent.recipients == ["ann@example.org", "bob@example.net"]
    assert sent.sender == "site@example.com"
    assert sent.body == "Plain body\n"
    assert sent.html == "<p>HTML body</p>\n"
    assert sent["Message-ID"].endswith("@example.com>")
    assert sent["Date"] is not None
    assert sent.message.get_content_type() == "multipart/alternative"
    # Composed directly (twistmail.compose), not through an EmailMessage.
    assert sent.envelope.source is None


@pytest_twisted.ensureDeferred
async def test_send_mail_text_only_and_empty_recipient_list(
    mail_outbox: list[OutboxMessage],
) -> None:
    backend = LocmemBackend()
    assert await send_mail("T", "text\n", "a@example.com", ["b@example.org"], backend=backend) == 1
    assert mail_outbox[0].message.get_content_type() == "text/plain"
    assert mail_outbox[0].html is None
    assert await send_mail("T", "text\n", "a@example.com", [], backend=backend) == 0
    assert len(mail_outbox) == 1


@pytest_twisted.ensureDeferred
async def test_send_mail_refuses_invalid_input_unless_fail_silently(
    mail_outbox: list[OutboxMessage],
) -> None:
    backend = LocmemBackend()
    with pytest.raises(AddressError):
        await send_mail("s", "b", "not an address", ["b@example.org"], backend=backend)
    with pytest.raises(AddressError):
        await send_mail("s", "b", "a@example.com", ["b@@example.org"], backend=backend)
    with pytest.raises(HeaderInjectionError):
        await send_mail("s\r\nBcc: x@evil.com", "b", "a@example.com", ["b@x.org"], backend=backend)
    with pytest.raises(TypeError, match="not a single str"):
        send_mail("s", "b", "a@example.com", "b@example.org", backend=backend)
    for bad in (("s", "not an address"), ("s\nBcc: x@evil.com", "a@example.com")):
        count = await send_mail(bad[0], "b", bad[1], ["b@x.org"], fail_silently=True)
        assert count == 0
    assert mail_outbox == []


@pytest_twisted.ensureDeferred
async def test_send_mail_defaults_to_locmem_under_the_pytest_plugin(
    mail_outbox: list[OutboxMessage],
) -> None:
    assert await send_mail("Default", "b\n", "a@example.com", ["b@example.org"]) == 1
    assert [m.subject for m in mail_outbox] == ["Default"]


@pytest_twisted.ensureDeferred
async def test_configure_a_name_makes_and_closes_a_backend_per_call(
    capture_server: Any, mail_outbox: list[OutboxMessage]
) -> None:
    server = capture_server()
    configure("smtp", url=f"smtp://127.0.0.1:{server.port}")
    assert await send_mail("one", "b\n", "a@example.com", ["b@example.org"]) == 1
    assert await send_mail("two", "b\n", "a@example.com", ["b@example.org"]) == 1
    # Each call had its own backend, closed afterwards (the leak check would see a socket).
    assert server.connections == 2
    assert len(server.messages) == 2
    assert mail_outbox == []


@pytest_twisted.ensureDeferred
async def test_configure_an_instance_shares_it_and_leaves_it_open(
    mail_outbox: list[OutboxMessage],
) -> None:
    class Counting(LocmemBackend):
        closed = 0

        def close(self) -> Any:
            Counting.closed += 1
            return super().close()

    shared = Counting()
    configure(shared)
    assert default_backend() == (shared, False)
    assert await send_mail("s", "b\n", "a@example.com", ["b@example.org"]) == 1
    assert Counting.closed == 0
    assert len(mail_outbox) == 1


def test_configure_checks_names_and_types_now() -> None:
    with pytest.raises(UnknownBackendError):
        configure("nope")
    with pytest.raises(TypeError):
        configure(object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="options"):
        configure(LocmemBackend(), fail_silently=True)


def test_without_configuration_the_environment_then_smtp_decides(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    configure(None)
    monkeypatch.setenv("TWISTMAIL_BACKEND", "dummy")
    backend, owned = default_backend(fail_silently=True)
    assert isinstance(backend, DummyBackend)
    assert owned
    assert backend.fail_silently
    monkeypatch.delenv("TWISTMAIL_BACKEND")
    monkeypatch.delenv("TWISTMAIL_SMTP_URL", raising=False)
    backend, owned = default_backend()
    assert isinstance(backend, SMTPBackend)
    assert backend.mailer.server.host == "localhost"
    assert backend.mailer.server.port == 25


def test_the_plugin_restores_the_default_after_each_test() -> None:
    # The tests above called configure(...); each time the plugin put locmem back.
    assert _swap_default(None) == ("locmem", {})
    _swap_default(("locmem", {}))


# the pytest plugin, as installed -------------------------------------------------------------

_USER_TESTS = textwrap.dedent(
    """
    import pytest_twisted
    from twistmail import send_mail


    @pytest_twisted.ensureDeferred
    async def test_sends(mail_outbox):
        assert await send_mail("Hi", "body", "a@example.com", ["b@example.org"]) == 1
        assert mail_outbox[0]["Subject"] == "Hi"


    def test_outbox_is_empty_again(mail_outbox):
        assert mail_outbox == []
    """
)


def _run_pytest(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "TWISTMAIL_"))}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args, "test_user.py"],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_plugin_entry_point_gives_users_the_fixtures_without_a_conftest(tmp_path: Path) -> None:
    (tmp_path / "test_user.py").write_text(_USER_TESTS)
    assert not (tmp_path / "conftest.py").exists()
    proc = _run_pytest(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 passed" in proc.stdout
    disabled = _run_pytest(tmp_path, "-p", "no:twistmail")
    assert disabled.returncode != 0
    assert "fixture 'mail_outbox' not found" in disabled.stdout


# README --------------------------------------------------------------------------------------


def _body(path: Path) -> str:
    """A file without its module docstring."""
    return path.read_text(encoding="utf-8").split('"""\n', 2)[-1].strip()


def test_readme_shows_the_web_example_and_its_test_verbatim() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "## Delivery backends" in readme
    assert _body(ROOT / "examples" / "web_app.py") in readme
    assert _body(ROOT / "tests" / "test_web_app_example.py") in readme


def test_public_names() -> None:
    assert twistmail.get_backend is get_backend
    assert twistmail.send_mail is send_mail
