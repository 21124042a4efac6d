"""AUTH and the HTTP listener of the real ``twistd twistmail``: logins checked against a users
file written by ``twistmail users add``, only over TLS or on loopback; /healthz and /metrics."""

from __future__ import annotations

import base64
import json
import smtplib
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from prometheus_client.parser import text_string_to_metric_families
from relay_process import RelayProcess
from servers import CueServer
from waiting import wait_until

PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def users_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("users") / "users"
    done = subprocess.run(
        [sys.executable, "-m", "twistmail", "users", "add", "app", "--users-file", str(path)],
        input=PASSWORD + "\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert PASSWORD not in path.read_text()
    return path


@pytest.fixture(scope="module")
def upstream() -> Iterator[CueServer]:
    with CueServer() as server:
        yield server


def non_loopback_address() -> str | None:
    """An address of this machine other than loopback (where a plaintext AUTH is refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
            address = str(probe.getsockname()[0])
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_auth_on_loopback_lets_a_client_outside_allow_from_submit(
    users_file: Path, upstream: CueServer, tmp_path: Path
) -> None:
    options = ("--users-file", str(users_file), "--allow-from", "192.0.2.0/29")
    with RelayProcess(tmp_path / "q.db", upstream.port, *options) as relay:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as smtp:
            smtp.ehlo("app.test")
            assert "PLAIN" in smtp.esmtp_features["auth"]
            assert smtp.docmd("MAIL FROM:<app@example.com>")[0] == 530  # not without AUTH
            smtp.login("app", PASSWORD)
            smtp.sendmail(
                "app@example.com", ["authed@example.org"], b"Subject: authed\r\n\r\nx\r\n"
            )
        wait_until(lambda: any("authed@example.org" in m.recipients for m in upstream.received))
        (message,) = [m for m in upstream.received if "authed@example.org" in m.recipients]
        assert b"with ESMTPA" in message.data  # the Received: header says it was authenticated
    assert not any(PASSWORD in line for line in relay.lines)


def test_wrong_passwords_get_535_late_then_421_after_five(
    users_file: Path, upstream: CueServer, tmp_path: Path
) -> None:
    options = ("--users-file", str(users_file), "--allow-from", "192.0.2.0/29")
    with RelayProcess(tmp_path / "q.db", upstream.port, *options) as relay:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as smtp:
            smtp.ehlo("app.test")
            for _ in range(4):
                started = time.monotonic()
                code, reply = smtp.docmd(
                    "AUTH PLAIN " + base64.b64encode(b"\0app\0wrong password").decode()
                )
                assert (code, reply[:5]) == (535, b"5.7.8")
                assert time.monotonic() - started >= 0.9  # after a short delay
            code, reply = smtp.docmd("AUTH PLAIN " + base64.b64encode(b"\0app\0wrong").decode())
            assert (code, reply[:5]) == (421, b"4.7.0")
        refused = socket.create_connection(("127.0.0.1", relay.port), timeout=30)
        assert refused.recv(1000).startswith(b"421 4.7.0")  # for a while, even the right one
        refused.close()
    assert not any("wrong password" in line for line in relay.lines)
    assert sum("failed AUTH from 127.0.0.1" in line for line in relay.lines) == 5


def test_auth_over_plaintext_off_loopback_is_refused_but_works_after_starttls(
    users_file: Path, upstream: CueServer, tmp_path: Path
) -> None:
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    ca = trustme.CA()
    cert = ca.issue_cert(address)
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    options = (
        "--users-file",
        str(users_file),
        "--tls-cert",
        str(cert_file),
        "--tls-key",
        str(key_file),
    )
    with RelayProcess(tmp_path / "q.db", upstream.port, *options, interface=address) as relay:
        with smtplib.SMTP(address, relay.port, timeout=30) as smtp:
            smtp.ehlo("app.test")
            assert not smtp.has_extn("auth")
            assert smtp.has_extn("starttls")
            code, reply = smtp.docmd(
                "AUTH PLAIN " + base64.b64encode(b"\0app\0" + PASSWORD.encode()).decode()
            )
            assert (code, reply[:6]) == (538, b"5.7.11")
            assert smtp.docmd("MAIL FROM:<app@example.com>")[0] == 530
            context = ssl.create_default_context()
            ca.configure_trust(context)
            context.check_hostname = False
            smtp.starttls(context=context)
            smtp.ehlo("app.test")
            assert "PLAIN" in smtp.esmtp_features["auth"]
            smtp.login("app", PASSWORD)
            smtp.sendmail("app@example.com", ["tls@example.org"], b"Subject: tls\r\n\r\nx\r\n")
        wait_until(lambda: any("tls@example.org" in m.recipients for m in upstream.received))


def http_port(relay: RelayProcess) -> int:
    line = relay.wait_for(r"HTTP \([^)]*\) listening on [^:]+:\d+")
    return int(line.rsplit(":", 1)[1])


def get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_health_and_metrics(upstream: CueServer, tmp_path: Path) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead_port = closed.getsockname()[1]
    closed.close()
    path = tmp_path / "q.db"
    with RelayProcess(path, upstream.port, http="tcp:0:interface=127.0.0.1") as relay:
        port = http_port(relay)
        for n in range(3):
            with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as smtp:
                smtp.sendmail("app@example.com", [f"m{n}@example.org"], b"Subject: m\r\n\r\nx\r\n")
        wait_until(lambda: sum(m.sender == "app@example.com" for m in upstream.received) >= 3)
        relay.wait_for(r"delivery 3 .*status=sent")
        status, body = get(port, "/healthz")
        health = json.loads(body)
        assert status == 200
        assert health["queue_writable"] is True
        assert health["worker_running"] is True
        assert health["upstream"] == "ok"
        status, body = get(port, "/metrics")
        assert status == 200
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples
        }
        assert samples[("twistmail_relay_messages_accepted_total", ())] == 3
        assert (
            samples[("twistmail_relay_deliveries_total", (("code", "2xx"), ("result", "sent")))]
            == 3
        )
        assert samples[("twistmail_relay_queue_messages", (("state", "sent"),))] == 3
        assert samples[("twistmail_relay_delivery_latency_seconds_count", ())] == 3
        assert ("twistmail_relay_smtp_sessions", ()) in samples
    # An upstream outage is shown, and is still healthy: the queue is for that.
    with RelayProcess(path, dead_port, http="tcp:0:interface=127.0.0.1") as relay:
        port = http_port(relay)
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as smtp:
            smtp.sendmail("app@example.com", ["later@example.org"], b"Subject: m\r\n\r\nx\r\n")
        relay.wait_for("the upstream cannot be reached")
        status, body = get(port, "/healthz")
        assert status == 200
        assert json.loads(body)["upstream"].startswith("unreachable")
        assert get(port, "/nope")[0] == 404


def test_health_is_503_while_the_queue_cannot_be_written(
    upstream: CueServer, tmp_path: Path
) -> None:
    path = tmp_path / "q.db"
    with RelayProcess(path, upstream.port, http="tcp:0:interface=127.0.0.1") as relay:
        port = http_port(relay)
        assert get(port, "/healthz")[0] == 200
        # Another process holds the file's write lock past the health check's 5 s.
        blocker = sqlite3.connect(
            path, isolation_level=None, timeout=10
        )  # waits out a write in progress
        blocker.execute("BEGIN IMMEDIATE")
        try:
            status, body = get(port, "/healthz")
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert status == 503
        health = json.loads(body)
        assert health["queue_writable"] is False
        assert "locked by another process" in health["queue_error"]
        assert get(port, "/healthz")[0] == 200  # writable again


def test_commands_sent_with_starttls_in_plaintext_are_not_run_inside_tls(
    users_file: Path, upstream: CueServer, tmp_path: Path
) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    options = ("--tls-cert", str(cert_file), "--tls-key", str(key_file))
    with RelayProcess(tmp_path / "q.db", upstream.port, *options) as relay:
        sock = socket.create_connection(("127.0.0.1", relay.port), timeout=30)
        sock.recv(1000)  # the greeting
        sock.sendall(b"EHLO a\r\n")
        while b"250 " not in sock.recv(4096):
            pass
        # CVE-2011-0411: a command injected after STARTTLS in the same plaintext packet.
        sock.sendall(b"STARTTLS\r\nMAIL FROM:<injected@example.com>\r\n")
        assert sock.recv(1000).startswith(b"220")
        context = ssl.create_default_context()
        ca.configure_trust(context)
        context.check_hostname = False
        tls = context.wrap_socket(sock)
        tls.sendall(b"NOOP\r\n")
        first = tls.recv(1000)
        # Had the injected MAIL run, its "250 2.1.0 Ok" would come first.
        assert first == b"250 2.0.0 Ok\r\n"
        tls.sendall(b"EHLO a\r\nMAIL FROM:<app@example.com>\r\n")
        replies = b""
        while not replies.endswith(b"Ok\r\n") or b"2.1.0" not in replies:
            replies += tls.recv(4096)
        assert b"250 2.1.0 Ok" in replies  # no sender left over from before the handshake
        tls.sendall(b"QUIT\r\n")
        assert tls.recv(1000).startswith(b"221")
        tls.close()
