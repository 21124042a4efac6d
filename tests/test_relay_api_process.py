"""The HTTP API of the real ``twistd twistmail``: both doors feed one queue and one upstream."""

from __future__ import annotations

import json
import os
import smtplib
import socket
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from relay_process import ROOT, TWISTD, RelayProcess
from servers import CueServer
from test_relay_auth_http import http_port
from test_relay_delivery import wait_until

from twistmail.relay.tokens import hash_token, new_token


@pytest.fixture(scope="module")
def upstream() -> Iterator[CueServer]:
    with CueServer() as server:
        yield server


def call(
    port: int,
    path: str,
    body: Any = None,
    *,
    token: str | None,
    method: str = "POST",
    key: str | None = None,
) -> tuple[int, dict[str, Any], dict[str, str]]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Idempotency-Key"] = key
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, headers=headers, method=method
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read() or b"{}"), dict(answer.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}"), dict(e.headers)


def manage_tokens(action: str, name: str, path: Path) -> subprocess.CompletedProcess[str]:
    """``twistmail tokens ACTION NAME --api-token-file PATH``, which must succeed."""
    argv = [sys.executable, "-m", "twistmail", "tokens", action, name, "--api-token-file"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [*argv, str(path)], capture_output=True, text=True, env=env, check=True, timeout=60
    )


def test_smtp_and_http_feed_one_queue_and_one_upstream(upstream: CueServer, tmp_path: Path) -> None:
    token = new_token()
    tokens = tmp_path / "tokens"
    tokens.write_text(f"app:{hash_token(token)}\n")
    tokens.chmod(0o600)
    path = tmp_path / "q.db"
    with RelayProcess(
        path,
        upstream.port,
        "--api-token-file",
        str(tokens),
        http="tcp:0:interface=127.0.0.1",
    ) as relay:
        port = http_port(relay)
        status, body, _ = call(
            port,
            "/v1/messages",
            {"from": "api@example.com", "to": "h1@example.org", "subject": "via http", "text": "x"},
            token=token,
        )
        assert status == 202, body
        http_id, message_id = body["id"], body["message_id"]
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as smtp:
            smtp.sendmail("smtp@example.com", ["s1@example.org"], b"Subject: via smtp\r\n\r\nx\r\n")
        wait_until(
            lambda: (
                {"h1@example.org", "s1@example.org"}
                <= {r for m in upstream.received for r in m.recipients}
            )
        )
        relay.wait_for(rf"delivery {http_id} .*status=sent")
        (received,) = [m for m in upstream.received if "h1@example.org" in m.recipients]
        assert received.sender == "api@example.com"
        assert f"Message-ID: {message_id}".encode() in received.data
        with sqlite3.connect(path) as db:
            rows = dict(db.execute("SELECT id, sender FROM messages").fetchall())
        assert rows[http_id] == "api@example.com"
        assert "smtp@example.com" in rows.values()
        # Refused requests queue nothing; the wrong token is refused with a challenge.
        status, body, hdrs = call(port, "/v1/messages", {"from": "a@example.com"}, token=None)
        assert status == 401
        assert hdrs["WWW-Authenticate"].startswith("Bearer")
        status, body, _ = call(
            port, "/v1/messages", {"from": "a@example.com", "to": "x", "text": "t"}, token=token
        )
        assert (status, body["field"]) == (422, "to")
        # A new token works without a restart; a removed one stops working.
        second = manage_tokens("add", "crm", tokens).stdout.strip()
        body_ok = {"from": "crm@example.com", "to": "h2@example.org", "text": "t"}
        assert call(port, "/v1/messages", body_ok, token=second)[0] == 202
        manage_tokens("remove", "app", tokens)
        assert call(port, "/v1/messages", body_ok, token=token)[0] == 401
        assert call(port, "/healthz", token=None, method="GET")[0] == 200
        relay.wait_for(r"refused an API request with an unknown token")
        # Wrong tokens are guesses: after five from one address, even a good one waits.
        for _ in range(4):
            assert call(port, "/v1/messages", body_ok, token=new_token())[0] == 401
        status, body, hdrs = call(port, "/v1/messages", body_ok, token=second)
        assert (status, body["field"]) == (429, "Authorization")
        assert 500 < int(hdrs["Retry-After"]) <= 600
    log = "\n".join(relay.lines)
    assert token not in log
    assert second not in log
    with sqlite3.connect(path) as db:
        (count,) = db.execute("SELECT count(*) FROM messages").fetchone()
    assert count == 3


def test_http_beyond_loopback_without_tokens_does_not_start(tmp_path: Path) -> None:
    argv = [
        *TWISTD, "-n", "--pidfile=", "twistmail", "--smtp", "smtp://127.0.0.1:9",
        "--queue", f"sqlite:{tmp_path / 'q.db'}", "--submission", "none", "--http", "tcp:0",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert done.returncode != 0
    assert "listens beyond loopback: give --api-token-file" in done.stdout + done.stderr


def test_a_client_retrying_after_a_timeout_gets_one_delivery(
    upstream: CueServer, tmp_path: Path
) -> None:
    path = tmp_path / "q.db"
    message = {"from": "api@example.com", "to": "once@example.org", "text": "once"}
    data = json.dumps(message).encode()
    with RelayProcess(path, upstream.port, http="tcp:0:interface=127.0.0.1") as relay:
        port = http_port(relay)
        # The first attempt: sent in full, then the client gives up before the answer.
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(
                b"POST /v1/messages HTTP/1.1\r\nHost: localhost\r\n"
                b"Content-Type: application/json\r\nIdempotency-Key: retry-1\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(data), data)
            )
        queued = relay.wait_for(r"queued \d+ from=<api@example.com>")
        first_id = int(queued.split("queued ")[1].split()[0])
        for _ in range(2):  # the retries
            status, body, hdrs = call(port, "/v1/messages", message, token=None, key="retry-1")
            assert status == 202, body
            assert body["id"] == first_id
            assert hdrs["Idempotent-Replayed"] == "true"
        relay.wait_for(rf"delivery {first_id} .*status=sent")
    # The key outlives a restart: it is in the queue file, committed with the message.
    with RelayProcess(path, upstream.port, http="tcp:0:interface=127.0.0.1") as relay:
        status, body, _ = call(http_port(relay), "/v1/messages", message, token=None, key="retry-1")
        assert (status, body["id"]) == (202, first_id)
    assert sum("once@example.org" in m.recipients for m in upstream.received) == 1
    with sqlite3.connect(path) as db:
        (count,) = db.execute(
            "SELECT count(*) FROM recipients WHERE address = 'once@example.org'"
        ).fetchone()
    assert count == 1


def test_track_retry_and_cancel_through_the_real_relay(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    # 5.7.1, not 5.1.1: a refusal that does not put the address on the suppression list, so
    # that the retry below sends the message.
    refusing = {"nobody": "550 5.7.1 no such user"}
    with (
        CueServer(rcpt_replies_once=refusing) as upstream,
        RelayProcess(
            path, upstream.port, "--no-bounces", http="tcp:0:interface=127.0.0.1"
        ) as relay,
    ):
        port = http_port(relay)
        message = {"from": "api@example.com", "to": "nobody@example.org", "text": "x"}
        status, body, _ = call(port, "/v1/messages", message, token=None)
        assert status == 202
        sent_id = body["id"]
        relay.wait_for(rf"delivery {sent_id} .*status=failed")
        status, shown, _ = call(port, f"/v1/messages/{sent_id}", token=None, method="GET")
        assert (status, shown["state"], shown["attempts"]) == (200, "failed", 1)
        (rcpt,) = shown["recipients"]
        assert (rcpt["code"], rcpt["enhanced"], rcpt["text"]) == (550, "5.7.1", "no such user")
        status, listed, _ = call(port, "/v1/messages?state=failed", token=None, method="GET")
        assert [m["id"] for m in listed["messages"]] == [sent_id]
        # The refusal was once only: a retry delivers it.
        status, retried, _ = call(port, f"/v1/messages/{sent_id}/retry", {}, token=None)
        # Queued again, its attempts from 0; the relay's worker may have taken it already.
        assert status == 200
        assert (retried["state"], retried["attempts"]) in {("queued", 0), ("sending", 0)}
        relay.wait_for(rf"delivery {sent_id} .*attempt=1 status=sent")
        status, shown, _ = call(port, f"/v1/messages/{sent_id}", token=None, method="GET")
        assert shown["state"] == "sent"
        (rcpt,) = shown["recipients"]
        assert (rcpt["code"], rcpt["enhanced"]) == (250, None)  # CueServer's "250 ok"
        assert sum("nobody@example.org" in m.recipients for m in upstream.received) == 1
        status, body, _ = call(port, f"/v1/messages/{sent_id}", token=None, method="DELETE")
        assert (status, body["status"]) == (409, 409)
        status, body, _ = call(port, "/v1/messages/9999", token=None, method="GET")
        assert status == 404


def test_cancel_a_deferred_message(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    with (
        CueServer(rcpt_replies={"later": "451 4.2.1 mailbox busy"}) as upstream,
        RelayProcess(path, upstream.port, http="tcp:0:interface=127.0.0.1") as relay,
    ):
        port = http_port(relay)
        message = {"from": "api@example.com", "to": "later@example.org", "text": "x"}
        _, body, _ = call(port, "/v1/messages", message, token=None)
        waiting = body["id"]
        relay.wait_for(rf"delivery {waiting} .*status=deferred")  # next try in 300 s
        status, cancelled, _ = call(port, f"/v1/messages/{waiting}", token=None, method="DELETE")
        assert (status, cancelled["state"]) == (200, "failed")
        assert cancelled["recipients"][0]["text"] == "cancelled by the API"
        assert cancelled["recipients"][0]["enhanced"] is None
        status, _, _ = call(port, f"/v1/messages/{waiting}", token=None, method="DELETE")
        assert status == 409
    with sqlite3.connect(path) as db:
        (state,) = db.execute("SELECT state FROM messages WHERE id = ?", (waiting,)).fetchone()
    assert state == "failed"
