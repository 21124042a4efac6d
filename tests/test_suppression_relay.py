"""The suppression list and one-click unsubscribe in the real ``twistd twistmail`` relay.

The relay keeps the list in its queue's file; its worker checks every claimed message against
it; hard bounces at RCPT (aiosmtpd answering 550 5.1.1) are added to it; its ``--public-http``
listener takes RFC 8058 one-click POSTs. The API's GET shows suppressed recipients as such.
"""

from __future__ import annotations

import json
import re
import sqlite3
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from relay_process import RelayProcess
from servers import CueServer
from test_relay_auth_http import http_port
from test_relay_delivery import wait_until

from twistmail.unsubscribe import TokenBox

SECRET = "k1:" + "s" * 40
LIST = "news.example.org"


@pytest.fixture
def upstream() -> Iterator[CueServer]:
    with CueServer(
        rcpt_replies={
            "gone": "550 5.1.1 <gone@example.org>: no such user",
            "badfrom": "550 5.1.8 sender domain has no MX",
        }
    ) as server:
        yield server


def request(
    port: int, path: str, body: bytes | None = None, *, method: str = "GET", **headers: str
) -> tuple[int, bytes, dict[str, str]]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=body, headers=headers, method=method
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as answer:
            return answer.status, answer.read(), dict(answer.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def submit(port: int, message: dict[str, Any]) -> int:
    status, body, _ = request(
        port,
        "/v1/messages",
        json.dumps(message).encode(),
        method="POST",
        **{"Content-Type": "application/json"},
    )
    assert status == 202, body
    return int(json.loads(body)["id"])


def message(port: int, queue_id: int) -> dict[str, Any]:
    status, body, _ = request(port, f"/v1/messages/{queue_id}")
    assert status == 200, body
    result: dict[str, Any] = json.loads(body)
    return result


def settled(port: int, queue_id: int) -> dict[str, Any]:
    wait_until(lambda: message(port, queue_id)["state"] in ("sent", "failed"), 30)
    return message(port, queue_id)


def suppressions(path: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(path) as db:
        return db.execute(
            "SELECT address, reason, list_id FROM suppressions ORDER BY address, list_id"
        ).fetchall()


def public_port(relay: RelayProcess) -> int:
    line = relay.wait_for(r"one-click unsubscribe \(public\) listening on [^:]+:\d+")
    return int(line.rsplit(":", 1)[1])


def start(path: Path, upstream: CueServer, secret: Path) -> RelayProcess:
    return RelayProcess(
        path,
        upstream.port,
        "--public-http",
        "tcp:0:interface=127.0.0.1",
        "--secret-file",
        str(secret),
        "--no-bounces",
        http="tcp:0:interface=127.0.0.1",
    )


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "unsubscribe.key"
    path.write_text(f"# keys\n{SECRET}\n")
    return path


def test_one_click_unsubscribes_from_the_list_only_and_forgeries_change_nothing(
    upstream: CueServer, tmp_path: Path, secret: Path
) -> None:
    path = tmp_path / "q.db"
    token = TokenBox([("k1", SECRET[3:].encode())]).make("reader@example.org", LIST)
    with start(path, upstream, secret) as relay:
        api, public = http_port(relay), public_port(relay)
        url = f"/unsubscribe/{token}"
        one_click = b"List-Unsubscribe=One-Click"
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        # Forged tokens: one character changed, another key id, garbage, too long.
        flipped = token[:-3] + ("A" if token[-3] != "A" else "B") + token[-2:]
        for bad in (flipped, "k2" + token[2:], "k1.nonsense", "k1." + "A" * 2000):
            status, body, _ = request(
                public, f"/unsubscribe/{bad}", one_click, method="POST", **form
            )
            assert status == 400, bad
            status, body, _ = request(public, f"/unsubscribe/{bad}")
            assert status == 400
        # A POST without the one-click body changes nothing either.
        assert request(public, url, b"", method="POST", **form)[0] == 400
        assert suppressions(path) == []
        # The API is not on the public listener, and no token is asked there.
        assert request(public, "/v1/messages/1")[0] == 404

        # GET: a confirmation page whose button posts the one-click body.
        status, page, headers = request(public, url)
        assert status == 200
        assert b'name="List-Unsubscribe" value="One-Click"' in page
        assert b"news.example.org" in page
        assert b"reader@" not in page
        assert headers["Cache-Control"] == "no-store"
        assert headers["Referrer-Policy"] == "no-referrer"
        assert suppressions(path) == []  # a GET (a link scanner) unsubscribes nobody

        # POST as a mailbox provider does (RFC 8058): 200, no page, no redirect.
        status, body, headers = request(public, url, one_click, method="POST", **form)
        assert (status, body) == (200, b"")
        assert "Location" not in headers
        assert suppressions(path) == [("reader@example.org", "unsubscribed", LIST)]

        # The list's mail to the reader is not sent; a password reset (no list) is.
        news = submit(
            api,
            {
                "from": "news@example.com",
                "to": "reader@example.org",
                "subject": "Issue 1",
                "text": "news",
                "headers": {"List-Id": f"News <{LIST}>"},
            },
        )
        reset = submit(
            api,
            {
                "from": "app@example.com",
                "to": "reader@example.org",
                "subject": "Reset",
                "text": "x",
            },
        )
        assert settled(api, reset)["state"] == "sent"
        shown = settled(api, news)
        assert shown["state"] == "failed"
        assert [r["state"] for r in shown["recipients"]] == ["suppressed"]
        assert [m.data.count(b"Subject: Reset") for m in upstream.received] == [1]


def test_suppressed_recipients_are_not_sent_to_and_hard_bounces_are_added(
    upstream: CueServer, tmp_path: Path, secret: Path
) -> None:
    path = tmp_path / "q.db"
    with start(path, upstream, secret) as relay:
        api = http_port(relay)
        # A hard bounce about the recipient: suppressed once its batch is decided.
        gone = submit(api, {"from": "a@example.com", "to": "gone@example.org", "text": "1"})
        assert settled(api, gone)["recipients"][0]["state"] == "failed"
        wait_until(lambda: ("gone@example.org", "hard-bounce", "") in suppressions(path), 30)
        # 5.1.8 is about our sender: never suppresses.
        bad = submit(api, {"from": "a@example.com", "to": "badfrom@example.org", "text": "2"})
        assert settled(api, bad)["state"] == "failed"

        # The next message to gone@ is not sent at all; its co-recipient is.
        both = submit(
            api,
            {"from": "a@example.com", "to": ["gone@example.org", "ok@example.org"], "text": "3"},
        )
        alone = submit(api, {"from": "a@example.com", "to": "gone@example.org", "text": "4"})
        shown = settled(api, both)
        assert shown["state"] == "sent"
        assert {r["address"]: r["state"] for r in shown["recipients"]} == {
            "gone@example.org": "suppressed",
            "ok@example.org": "sent",
        }
        shown = settled(api, alone)
        assert shown["state"] == "failed"
        assert shown["recipients"][0]["state"] == "suppressed"
        assert shown["recipients"][0]["text"] == "suppressed: hard-bounce"
        relay.wait_for(rf"message {alone} not sent: every recipient is suppressed")
    received = [r for m in upstream.received for r in m.recipients]
    assert received == ["ok@example.org"]
    assert suppressions(path) == [("gone@example.org", "hard-bounce", "")]
    # What was refused at RCPT never got DATA: one RCPT for gone@ (the first message), none since.
    assert sum(bool(re.match(r"RCPT TO:<gone@", c)) for c in upstream.commands) == 1
