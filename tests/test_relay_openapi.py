"""The relay's OpenAPI file, served by the real ``twistd twistmail`` and checked by
schemathesis: requests generated from the file find no 5xx and no answer outside it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

from relay_process import ROOT, RelayProcess
from servers import CueServer
from test_relay_auth_http import http_port

from twistmail.relay.tokens import hash_token, new_token

SCHEMATHESIS = Path(sys.executable).with_name("st")


def test_the_served_file_is_openapi_3_1_listing_every_route(tmp_path: Path) -> None:
    with (
        CueServer() as upstream,
        RelayProcess(tmp_path / "q.db", upstream.port, http="tcp:0:interface=127.0.0.1") as relay,
    ):
        port = http_port(relay)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/openapi.json") as answer:
            spec = json.loads(answer.read())
    assert spec["openapi"] == "3.1.0"
    assert set(spec["paths"]) == {
        "/v1/messages",
        "/v1/messages/{message_id}",
        "/v1/messages/{message_id}/retry",
        "/v1/campaigns",
        "/v1/campaigns/{name}",
        "/v1/campaigns/{name}/report",
        "/v1/openapi.json",
        "/healthz",
    }
    assert set(spec["paths"]["/v1/messages"]) == {"get", "post"}


def test_schemathesis_finds_no_server_error_and_no_schema_violation(tmp_path: Path) -> None:
    token = new_token()
    tokens = tmp_path / "tokens"
    tokens.write_text(f"st:{hash_token(token)}\n")
    tokens.chmod(0o600)
    with (
        CueServer() as upstream,
        RelayProcess(
            tmp_path / "q.db",
            upstream.port,
            "--api-token-file",
            str(tokens),
            "--max-message-size",
            "64k",
            http="tcp:0:interface=127.0.0.1",
        ) as relay,
    ):
        port = http_port(relay)
        base = f"http://127.0.0.1:{port}"
        done = subprocess.run(
            [
                str(SCHEMATHESIS),
                "run",
                f"{base}/v1/openapi.json",
                "--url",
                base,
                "-H",
                f"Authorization: Bearer {token}",
                "--checks",
                "all",
                # A request valid by the schema may still be refused: no schema says what an
                # address is (RFC 5321) or that one of to/cc/bcc must name someone.
                "--exclude-checks",
                "positive_data_acceptance",
                "--max-examples",
                "40",
                "--seed",
                "1",
                "--request-timeout",
                "30",
            ],
            capture_output=True,
            text=True,
            env=dict(os.environ, PYTHONPATH=str(ROOT), NO_COLOR="1"),
            cwd=tmp_path,  # its .schemathesis cache goes there, not into the checkout
            timeout=280,
        )
        output = done.stdout + done.stderr
        assert done.returncode == 0, output
        assert " 500 " not in output
    assert "Traceback" not in "\n".join(relay.lines)
