"""The relay's options: defaults as the issue lists them, and a UsageError naming the option."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
from pathlib import Path

import pytest
from twisted.python import usage

from twistmail.relay.tap import Options

UPSTREAM = ["--smtp", "smtp://127.0.0.1:2600"]


def parse(*argv: str, env: dict[str, str] | None = None) -> Options:
    options = Options()
    options.parseOptions([*UPSTREAM, *argv])
    return options


def test_defaults_are_a_local_postfix_relays() -> None:
    config = parse().config
    assert config.queue_url == "sqlite:twistmail-queue.db"
    assert config.submission == "tcp:2525:interface=127.0.0.1"
    assert config.http == "tcp:8025:interface=127.0.0.1"
    assert (config.retry_delay, config.max_retry_delay) == (300.0, 4000.0)
    assert config.max_attempts is None
    assert config.retry_policy().can_retry(10_000)  # no attempt limit: --max-age decides
    assert config.max_age == 5 * 86400
    assert config.allow_from == (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    assert config.max_message_size == 25 * 1024 * 1024
    assert config.max_recipients == 1000
    assert (config.max_connections, config.max_connections_per_client) == (100, 20)
    assert config.bounces


def test_values_with_units_and_none_listeners() -> None:
    config = parse(
        "--max-age",
        "2d",
        "--retry-delay",
        "5m",
        "--max-message-size",
        "10m",
        "--http",
        "none",
        "--submission",
        "None",
        "--allow-from",
        "10.0.0.0/8, 192.168.1.7",
        "--max-attempts",
        "3",
    ).config
    assert config.max_age == 2 * 86400
    assert config.retry_delay == 300
    assert config.max_message_size == 10 * 1024 * 1024
    assert config.http is None
    assert config.submission is None
    assert ipaddress.ip_network("192.168.1.7/32") in config.allow_from
    assert not config.retry_policy().can_retry(3)


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        ([], "--smtp"),
        (["--smtp", "ftp://x"], "--smtp"),
        (["--smtp", "smtp://me:secret@host"], "--smtp must not contain the password"),
        (["--queue", "mysql://x"], "--queue"),
        (["--queue", "postgresql://db/mail?schema=1x"], "--queue: schema"),
        (["--allow-from", "10.0.0.0/8,everyone"], "--allow-from: 'everyone'"),
        (["--tls-cert", __file__], "--tls-cert and --tls-key"),
        (["--users-file", "/nonexistent/users"], "--users-file"),
        (["--retry-delay", "1h", "--max-retry-delay", "5m"], "--max-retry-delay"),
        (["--max-connections", "10"], "--max-connections-per-client"),
        (["--password-file", "/nonexistent/pw"], "--password-file"),
    ],
)
def test_a_bad_value_or_combination_names_the_option(argv: list[str], named: str) -> None:
    options = Options()
    base = [] if any(a == "--smtp" for a in argv) or not argv else UPSTREAM
    with pytest.raises(usage.UsageError, match=named.replace("(", r"\(")):
        options.parseOptions([*base, *argv])


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--concurrency", "0"),
        ("--max-age", "soon"),
        ("--max-message-size", "12"),
        ("--rate", "-1"),
        ("--shutdown-timeout", "inf"),
    ],
)
def test_a_bad_number_is_refused_naming_the_option(option: str, value: str) -> None:
    with pytest.raises(usage.UsageError, match=option.lstrip("-")):
        parse(option, value)


def test_the_password_is_read_from_its_file_never_the_url(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    options = Options()
    options.parseOptions(
        ["--smtp", "smtp+tls://alice@mail.example.com", "--password-file", str(secret)]
    )
    assert options.config.password == "s3cret"


def test_twistmail_serve_help_lists_the_relay_options() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "twistmail", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "--submission" in out.stdout
    assert "--max-connections-per-client" in out.stdout


def test_twistmail_serve_reports_a_bad_option_and_exits_2() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "twistmail", "serve", "--smtp", "smtp://x", "--queue", "nope"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode != 0
    assert "--queue" in out.stdout + out.stderr


def test_dkim_keys_are_read_at_start(tmp_path: Path) -> None:
    from dkimcheck import rsa_key, write_key

    key_file = write_key(tmp_path / "k.pem", rsa_key())
    config = parse("--dkim", f"example.com:s1:{key_file}", "--dkim-missing", "refuse").config
    assert config.dkim is not None
    assert config.dkim.domains == ["example.com"]
    assert config.dkim.missing == "refuse"
    from twisted.internet.testing import MemoryReactorClock

    assert config.mailer(MemoryReactorClock()).dkim is config.dkim  # the worker's Mailer signs
    (tmp_path / "bad.pem").write_text("not a key")
    with pytest.raises(usage.UsageError, match=r"bad\.pem.*not an unencrypted PEM"):
        parse("--dkim", f"example.com:s1:{tmp_path / 'bad.pem'}")
    with pytest.raises(usage.UsageError, match="--dkim-missing"):
        parse("--dkim-missing", "maybe")
    assert parse().config.dkim is None


def test_unsubscribe_options_are_checked_at_start_as_send_checks_them(tmp_path: Path) -> None:
    secret = tmp_path / "secret.key"
    secret.write_text("k1:" + "x" * 43 + "\n")
    url = "https://mail.example.com/unsubscribe/{token}"
    config = parse("--unsubscribe-url", url, "--secret-file", str(secret)).config
    assert config.unsubscribe is not None
    assert config.unsubscribe.url == url
    assert b"List-Unsubscribe-Post" in config.unsubscribe.headers("ann@example.org")
    assert parse("--unsubscribe-mailto", "u@example.com").config.unsubscribe is not None
    assert parse().config.unsubscribe is None
    with pytest.raises(usage.UsageError, match="needs --secret-file"):
        parse("--unsubscribe-url", url)
    with pytest.raises(usage.UsageError, match="needs an https:// URL"):
        parse("--unsubscribe-url", url.replace("https", "http"), "--secret-file", str(secret))
    with pytest.raises(usage.UsageError, match="--unsubscribe-mailto"):
        parse("--unsubscribe-mailto", "not an address")


@pytest.mark.parametrize(
    ("endpoint", "local"),
    [
        ("tcp:8025:interface=127.0.0.1", True),
        ("tcp:8025:interface=127.9.9.9", True),
        ("tcp6:8025:interface=\\:\\:1", True),
        ("tcp:port=8025:interface=localhost", True),
        ("unix:/run/twistmail.sock", True),
        ("tcp:8025", False),
        ("tcp:8025:interface=0.0.0.0", False),
        ("tcp:8025:interface=10.0.0.5", False),
        ("tcp6:8025:interface=\\:\\:", False),
        ("tcp:8025:interface=relay.example.com", False),
    ],
)
def test_loopback_only_reads_the_interface(endpoint: str, local: bool) -> None:
    from twistmail.relay.tap import loopback_only

    assert loopback_only(endpoint) is local


def test_http_beyond_loopback_needs_a_token_file(tmp_path: Path) -> None:
    with pytest.raises(usage.UsageError, match="--http tcp:8025 listens beyond loopback"):
        parse("--http", "tcp:8025")
    tokens = tmp_path / "tokens"
    tokens.write_text("")
    config = parse(
        "--http", "tcp:8025", "--api-token-file", str(tokens), "--http-hosts", "A.test, b"
    ).config
    assert config.api_token_file == str(tokens)
    assert config.http_hosts == ("a.test", "b")
    with pytest.raises(usage.UsageError, match="--api-token-file: no such file"):
        parse("--http", "tcp:8025", "--api-token-file", str(tmp_path / "missing"))
