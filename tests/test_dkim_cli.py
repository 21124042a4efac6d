"""``twistmail dkim keygen``, ``send --dkim``, ``drain --dkim`` and ``worker --dkim`` as
subprocesses."""

from __future__ import annotations

import re
import signal
import stat
from collections.abc import Callable
from pathlib import Path

import dkim
import pytest
import pytest_twisted
from servers import CueServer
from test_cli_e2e import twistmail, write_campaign
from test_drain_e2e import enqueue, finish, start_drain, triple
from test_worker_e2e import finish as worker_finish
from test_worker_e2e import start_worker
from waiting import until

Cue = Callable[..., CueServer]

MARKDOWN = """\
From: Shop <shop@example.com>
To: {{ name }} <{{ email }}>
Subject: Hello {{ name }}
Content-Type: text/markdown
List-Unsubscribe: <https://example.com/u/{{ code }}>
List-Unsubscribe-Post: List-Unsubscribe=One-Click

# Dear {{ name }}

.a line that starts with a dot
your code is **{{ code }}**.
"""


def keygen(tmp: Path, selector: str = "s1", domain: str = "example.com") -> tuple[str, bytes]:
    """A new key file and the TXT record value ``dkim keygen`` printed for it."""
    key_file = tmp / f"{selector}.pem"
    done = twistmail(
        "dkim", "keygen", "--domain", domain, "--selector", selector, "--key-file", str(key_file)
    )
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    line = next(x for x in done.stdout.splitlines() if "._domainkey." in x)
    assert line.startswith(f"{selector}._domainkey.{domain}. IN TXT ")
    record = "".join(re.findall(r'"([^"]*)"', line)).encode()
    return str(key_file), record


def verifies(data: bytes, published: dict[bytes, bytes]) -> bool:
    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        return published.get(name, b"")

    try:
        return bool(dkim.verify(data, dnsfunc=dnsfunc))
    except dkim.ValidationError:
        return False


def test_keygen_refuses_to_overwrite(tmp_path: Path) -> None:
    key_file, _ = keygen(tmp_path)
    before = Path(key_file).read_bytes()
    again = twistmail(
        "dkim", "keygen", "--domain", "example.com", "--selector", "s1", "--key-file", key_file
    )
    assert again.returncode == 2
    assert "File exists" in again.stderr
    assert Path(key_file).read_bytes() == before


def test_send_markdown_campaign_is_signed(cue_server: Cue, tmp_path: Path) -> None:
    server = cue_server()
    key_file, record = keygen(tmp_path)
    rows = [{"email": f"p{i}@example.org", "name": f"P{i}", "code": str(i)} for i in range(5)]
    csv_path, template = write_campaign(tmp_path, rows, MARKDOWN)
    done = twistmail(
        "send", csv_path, template, "--smtp", f"smtp://127.0.0.1:{server.port}",
        "--dkim", f"example.com:s1:{key_file}",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(server.received) == 5
    published = {b"s1._domainkey.example.com.": record}
    for received in server.received:
        assert b"multipart/alternative" in received.data
        head = received.data.split(b"\r\n\r\n", 1)[0].replace(b"\r\n\t", b"")
        assert b"list-unsubscribe:list-unsubscribe-post" in head
        assert verifies(received.data, published)


def test_send_refuses_a_from_domain_without_key_before_sending(
    cue_server: Cue, tmp_path: Path
) -> None:
    server = cue_server()
    key_file, _ = keygen(tmp_path, domain="other.example")
    csv_path, template = write_campaign(
        tmp_path, [{"email": "a@example.org", "name": "A", "code": "1"}], MARKDOWN
    )
    done = twistmail(
        "send", csv_path, template, "--smtp", f"smtp://127.0.0.1:{server.port}",
        "--dkim", f"other.example:s1:{key_file}",
    )  # fmt: skip
    assert done.returncode == 2
    assert "no --dkim key for the From domain example.com" in done.stderr
    assert server.received == []


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        ("example.com:s1:{tmp}/nope.pem", "cannot read it"),
        ("example.com:s1:{tmp}/bad.pem", "not an unencrypted PEM private key"),
        ("example.com:{tmp}/bad.pem", "DOMAIN:SELECTOR:KEYFILE"),
    ],
)
def test_send_bad_key_is_an_error_at_start(
    cue_server: Cue, tmp_path: Path, option: str, expected: str
) -> None:
    server = cue_server()
    secret = "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleS1ieXRlcw==\n-----END PRIVATE KEY-----\n"
    (tmp_path / "bad.pem").write_text(secret)
    csv_path, template = write_campaign(
        tmp_path, [{"email": "a@example.org", "name": "A", "code": "1"}], MARKDOWN
    )
    done = twistmail(
        "send", csv_path, template, "--smtp", f"smtp://127.0.0.1:{server.port}",
        "--dkim", option.format(tmp=tmp_path),
    )  # fmt: skip
    assert done.returncode == 2
    assert expected in done.stderr
    assert "c2VjcmV0" not in done.stderr + done.stdout
    assert server.received == []


@pytest_twisted.ensureDeferred
async def test_drain_signs_and_sends_unsigned_for_other_domains(
    cue_server: Cue, tmp_path: Path
) -> None:
    server = cue_server()
    key_file, record = keygen(tmp_path)
    spool = tmp_path / "spool.db"
    other = ("x@elsewhere.test", ["o@example.org"], b"From: x@elsewhere.test\r\n\r\nhi\r\n")
    await enqueue(spool, [triple(1), triple(2), other])
    code, output = await finish(
        start_drain(
            "--spool",
            str(spool),
            "--smtp",
            f"smtp://127.0.0.1:{server.port}",
            "--dkim",
            f"example.com:s1:{key_file}",
        )
    )
    assert code == 0, output
    published = {b"s1._domainkey.example.com.": record}
    signed = [r for r in server.received if r.data.startswith(b"DKIM-Signature:")]
    assert len(signed) == 2
    assert all(verifies(r.data, published) for r in signed)
    assert len(server.received) == 3
    assert "no DKIM key for the From domain elsewhere.test" in output


@pytest_twisted.ensureDeferred
async def test_worker_signs_as_drain_does(cue_server: Cue, tmp_path: Path) -> None:
    server = cue_server()
    key_file, record = keygen(tmp_path)
    spool = tmp_path / "spool.db"
    await enqueue(spool, [triple(1), triple(2)])
    log = tmp_path / "worker.log"
    worker = start_worker(
        log,
        "--queue",
        f"sqlite:{spool}",
        "--smtp",
        f"smtp://127.0.0.1:{server.port}",
        "--dkim",
        f"example.com:s1:{key_file}",
    )
    try:
        await until(lambda: len(server.received) == 2, "both messages delivered", 60)
    finally:
        worker.send_signal(signal.SIGTERM)
        code = await worker_finish(worker)
    assert code == 0, log.read_text()
    published = {b"s1._domainkey.example.com.": record}
    assert all(verifies(r.data, published) for r in server.received)
