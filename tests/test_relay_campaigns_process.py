"""Campaigns through the real ``twistd twistmail`` on a SQLite queue: one posted to its HTTP API,
one handed over by ``twistmail send --queue sqlite:PATH --enqueue-only``; the relay's worker
renders each row when it claims it, and every row arrives under its Message-ID."""

from __future__ import annotations

import base64
import csv
import re
import subprocess
import sys
from pathlib import Path

from relay_process import RelayProcess
from servers import CueServer
from test_relay_api_process import call
from test_relay_auth_http import http_port
from test_relay_campaigns import TEMPLATE
from test_relay_delivery import wait_until

from twistmail.relay.tokens import hash_token, new_token


def _csv(prefix: str, n: int) -> str:
    lines = ["email,name,code"]
    lines += [f"{prefix}{i}@example.org,{prefix.title()} {i},{prefix}-{i}" for i in range(n)]
    return "\n".join(lines) + "\n"


def _ids(server: CueServer, prefix: str) -> dict[str, str]:
    found = {}
    for message in server.received:
        (rcpt,) = message.recipients
        if rcpt.startswith(prefix):
            match = re.search(rb"\r\nMessage-ID: (<[^>]+>)\r\n", message.data)
            assert match is not None
            assert rcpt not in found, f"{rcpt} twice"
            assert base64.b64encode(b"the terms\n") in message.data
            found[rcpt] = match.group(1).decode()
    return found


def test_the_relay_delivers_campaigns_posted_and_handed_over(tmp_path: Path) -> None:
    token = new_token()
    tokens = tmp_path / "tokens"
    tokens.write_text(f"app:{hash_token(token)}\n")
    tokens.chmod(0o600)
    path = tmp_path / "q.db"
    (tmp_path / "terms.txt").write_bytes(b"the terms\n")
    (tmp_path / "message.txt").write_text(TEMPLATE)
    (tmp_path / "cli.csv").write_text(_csv("cli", 20))
    with (
        CueServer() as upstream,
        RelayProcess(
            path, upstream.port, "--api-token-file", str(tokens), http="tcp:0:interface=127.0.0.1"
        ) as relay,
    ):
        port = http_port(relay)
        body = {
            "name": "api",
            "template": TEMPLATE,
            "csv": _csv("api", 20),
            "attachments": [
                {"filename": "terms.txt", "content": base64.b64encode(b"the terms\n").decode()}
            ],
        }
        status, answer, _ = call(port, "/v1/campaigns", body, token=token)
        assert (status, answer.get("queued")) == (202, 20), answer
        handed = subprocess.run(
            [sys.executable, "-m", "twistmail", "send", "cli.csv", "message.txt", "--queue",
             f"sqlite:{path}", "--enqueue-only"],
            capture_output=True, text=True, cwd=tmp_path, timeout=60, check=False,
        )  # fmt: skip
        assert handed.returncode == 0, handed.stdout + handed.stderr
        wait_until(lambda: len(_ids(upstream, "api")) == 20 and len(_ids(upstream, "cli")) == 20)
        status, shown, _ = call(port, "/v1/campaigns/api", token=token, method="GET")
        assert status == 200, shown
        wait_until(
            lambda: (
                call(port, "/v1/campaigns/cli", token=token, method="GET")[1]["counts"]
                == {"sent": 20}
            )
        )
        report = subprocess.run(
            [sys.executable, "-m", "twistmail", "report", "api", "--queue", f"sqlite:{path}",
             "--report", "api.csv"],
            capture_output=True, text=True, cwd=tmp_path, timeout=60, check=False,
        )  # fmt: skip
        assert report.returncode == 0, report.stdout + report.stderr
    with (tmp_path / "api.csv").open(newline="") as f:
        lines = list(csv.DictReader(f))
    ids = _ids(upstream, "api")
    assert {line["email"]: line["message_id"] for line in lines} == ids
    assert {line["status"] for line in lines} == {"sent"}
