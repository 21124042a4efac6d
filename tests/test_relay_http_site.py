"""The relay's ``Site`` on the request path: what twisted.web does per request that the relay
leaves out (form parsing of non-form bodies, an access log line per accepted message)."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from klein import Klein
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.web import http as web_http
from twisted.web.iweb import IRequest
from twisted.web.server import Site

from twistmail.message import Envelope
from twistmail.queue import Idempotent
from twistmail.relay.http import Access, Key, make_http, make_site
from twistmail.relay.metrics import RelayMetrics

JSON_MESSAGE = json.dumps(
    {"from": "app@example.com", "to": "user@example.org", "subject": "hi", "text": "hello"}
).encode()


def _post(path: bytes, content_type: bytes, body: bytes) -> bytes:
    return (
        b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: %s\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (path, content_type, len(body), body)
    )


class Served:
    """A site on a StringTransport: requests in, the bytes answered out."""

    def __init__(self, site: Site) -> None:
        self.site = site
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        self.channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        assert self.channel is not None
        self.channel.makeConnection(self.transport)

    def request(self, data: bytes) -> bytes:
        self.transport.clear()
        self.channel.dataReceived(data)
        return self.transport.value()

    def close(self) -> None:
        self.channel.connectionLost(None)  # type: ignore[arg-type]


def _submit(envelope: Envelope, client: str, key: Key | None) -> defer.Deferred[Idempotent]:
    return defer.succeed(Idempotent(7, envelope.message_id, "queued"))


@pytest.fixture
def relay_site() -> Site:
    app = make_http(
        lambda: {"queue_writable": True},
        RelayMetrics(),
        access=Access(None, frozenset()),
        submit=_submit,
    )
    site = make_site(app, max_body=100_000)
    return site


@pytest.fixture
def form_site() -> Site:
    app = Klein()

    @app.route("/form", methods=["POST"])
    def form(request: IRequest) -> bytes:
        args: dict[bytes, list[bytes]] = request.args or {}  # type: ignore[assignment]
        return b"name=" + b",".join(args.get(b"name", []))

    return make_site(app, max_body=100_000)


def test_a_json_post_is_not_parsed_as_a_form(
    relay_site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    parsed: list[bytes] = []
    real = web_http._parseContentType

    def counting(line: bytes) -> bytes:
        parsed.append(line)
        return real(line)

    monkeypatch.setattr(web_http, "_parseContentType", counting)
    served = Served(relay_site)
    try:
        answer = served.request(_post(b"/v1/messages", b"application/json", JSON_MESSAGE))
    finally:
        served.close()
    assert answer.startswith(b"HTTP/1.1 202 ")
    assert parsed == []
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding" not in head  # one frame: the length is known
    assert b"\r\nContent-Length: %d\r\n" % len(body) in head + b"\r\n"
    assert json.loads(body) == {"id": 7, "message_id": json.loads(body)["message_id"]}


@pytest.mark.parametrize(
    "content_type", [b"application/x-www-form-urlencoded", b"Application/X-WWW-Form-Urlencoded ;"]
)
def test_a_form_post_is_still_parsed_into_args(form_site: Site, content_type: bytes) -> None:
    served = Served(form_site)
    try:
        answer = served.request(_post(b"/form", content_type, b"name=ada"))
    finally:
        served.close()
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert b"\r\nname=ada\r\n" in answer


def test_a_site_told_not_to_parse_forms_does_not(form_site: Site) -> None:
    form_site._parsePOSTFormSubmission = False  # type: ignore[attr-defined]
    served = Served(form_site)
    try:
        answer = served.request(_post(b"/form", b"application/x-www-form-urlencoded", b"name=a"))
    finally:
        served.close()
    assert b"\r\nname=\r\n" in answer


def test_accepted_messages_have_no_access_log_line_other_requests_do(relay_site: Site) -> None:
    relay_site.startFactory()
    access_log: Any = io.StringIO()
    relay_site.logFile = access_log  # type: ignore[assignment]
    served = Served(relay_site)
    try:
        accepted = served.request(_post(b"/v1/messages", b"application/json", JSON_MESSAGE))
        refused = served.request(_post(b"/v1/messages", b"application/json", b"{"))
        health = served.request(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        lines = access_log.getvalue().splitlines()
    finally:
        served.close()
        relay_site.stopFactory()
    assert accepted.startswith(b"HTTP/1.1 202 ")
    assert refused.startswith(b"HTTP/1.1 400 ")
    assert health.startswith(b"HTTP/1.1 200 ")
    assert len(lines) == 2
    assert '"POST /v1/messages HTTP/1.1" 400' in lines[0]
    assert '"GET /healthz HTTP/1.1" 200' in lines[1]


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        (b"127.0.0.1:8025", True),
        (b"[::1]:8025", True),
        (b"192.0.2.7", True),
        (b"relay.test:8025", True),
        (b"LOCALHOST", True),
        (b"evil.example:8025", False),
        (b"999.1.1.1", False),
        (b"", False),
    ],
)
def test_the_host_check_gives_the_same_answer_every_time(host: bytes, allowed: bool) -> None:
    access = Access(None, frozenset({"relay.test"}))
    assert [access.host_allowed(host) for _ in range(3)] == [allowed] * 3
