"""The relay's ``/v1`` API over real HTTP on 127.0.0.1, with an in-memory queue behind it."""

from __future__ import annotations

import base64
import email
import email.policy
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from treq.client import HTTPClient
from twisted.internet import defer, reactor
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.task import Clock
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from twistmail.message import Envelope
from twistmail.queue import Idempotent, Outcome
from twistmail.queue.memory import MemoryQueue
from twistmail.relay.auth import FailureLimiter
from twistmail.relay.http import Access, Key, make_http, make_site
from twistmail.relay.metrics import RelayMetrics
from twistmail.relay.tokens import TokenChecker, hash_token, new_token

TOKEN = new_token()
OTHER_TOKEN = new_token()


@dataclass
class Api:
    base: str
    queue: MemoryQueue
    envelopes: list[Envelope] = field(default_factory=list)
    wakes: list[int] = field(default_factory=list)
    port: int = 0
    clock: Clock = field(default_factory=Clock)


@pytest.fixture
def http() -> HTTPClient:
    return HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))


def _serve(
    tmp_path: Path, *, tokens: bool, max_size: int = 100_000, **http_options: Any
) -> Iterator[Api]:
    queue = MemoryQueue()
    checker = None
    if tokens:
        path = tmp_path / "tokens"
        path.write_text(f"app:{hash_token(TOKEN)}\ncrm:{hash_token(OTHER_TOKEN)}\n")
        checker = TokenChecker(str(path), reactor)  # type: ignore[arg-type]
    api = Api("", queue)

    def submit(envelope: Envelope, client: str, key: Key | None) -> defer.Deferred[Idempotent]:
        api.envelopes.append(envelope)
        if key is not None:
            return queue.enqueue_once(*key, envelope)
        return queue.enqueue([envelope]).addCallback(
            lambda ids: Idempotent(ids[0], envelope.message_id, "queued")
        )

    app = make_http(
        lambda: {"queue_writable": True},
        RelayMetrics(),
        access=Access(checker, frozenset({"relay.test"}), FailureLimiter(api.clock)),
        submit=submit,
        queue=queue,
        wake=lambda: api.wakes.append(1),
        max_message_size=max_size,
        **http_options,
    )
    site = make_site(app, max_body=max_size * 4 // 3 + 1024)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined]
    api.port = port.getHost().port
    api.base = f"http://127.0.0.1:{api.port}"
    yield api
    pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    yield from _serve(tmp_path, tokens=True)


@pytest.fixture
def open_api(tmp_path: Path) -> Iterator[Api]:
    yield from _serve(tmp_path, tokens=False)


def headers(kind: bytes = b"application/json", token: str | None = TOKEN, **more: bytes) -> Headers:
    raw = {b"Content-Type": [kind]}
    if token is not None:
        raw[b"Authorization"] = [b"Bearer " + token.encode()]
    for name, value in more.items():
        raw[name.encode()] = [value]
    return Headers(raw)


async def post(
    http: HTTPClient, url: str, body: Any, hdrs: Headers | None = None
) -> tuple[int, Any, Headers]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = await http.post(url, data=data, headers=hdrs or headers())
    content = await response.content()
    kind = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
    parsed = json.loads(content) if b"json" in kind else content
    return response.code, parsed, response.headers


MESSAGE = {
    "from": "App <app@example.com>",
    "to": ["ann@example.org", "Bob <bob@example.org>"],
    "cc": "cc@example.org",
    "bcc": ["hidden@example.org"],
    "reply_to": "help@example.com",
    "subject": "Hello ✓",
    "text": "Hi there\n",
    "html": "<p>Hi there</p>",
    "headers": {"X-Campaign": "spring"},
    "attachments": [
        {
            "filename": "r.csv",
            "content_type": "text/csv",
            "content": base64.b64encode(b"a,b\n1,2\n").decode(),
        }
    ],
}


@pytest_twisted.ensureDeferred
async def test_a_json_message_is_composed_and_queued(api: Api, http: HTTPClient) -> None:
    code, body, hdrs = await post(http, api.base + "/v1/messages", MESSAGE)
    assert code == 202, body
    assert body["id"] == 1
    (envelope,) = api.envelopes
    assert body["message_id"] == envelope.message_id
    assert hdrs.getRawHeaders(b"location") == [b"/v1/messages/1"]
    assert str(envelope.sender) == "app@example.com"
    assert [str(r) for r in envelope.recipients] == [
        "ann@example.org",
        "bob@example.org",
        "cc@example.org",
        "hidden@example.org",
    ]
    parsed = email.message_from_bytes(envelope.payload, policy=email.policy.default)
    assert parsed["Subject"] == "Hello ✓"
    assert parsed["X-Campaign"] == "spring"
    assert parsed["Reply-To"] == "help@example.com"
    assert parsed["Bcc"] is None
    (attachment,) = list(parsed.iter_attachments())
    assert attachment.get_filename() == "r.csv"
    assert attachment.get_content() == "a,b\n1,2\n"
    summary = await api.queue.summary()
    assert summary.counts["queued"] == 1


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"to": ["not an address"]}, "to", "not an address"),
        ({"to": [], "cc": [], "bcc": []}, "to", "no recipients"),
        ({"from": "ann@"}, "from", "ann@"),
        ({"subject": "a\r\nBcc: x@evil.test"}, "subject", "line break"),
        ({"headers": {"X-Ok": "a\nb"}}, "headers.X-Ok", "line break"),
        ({"headers": {"Received": "from x"}}, "headers.Received", "may not be set"),
        ({"headers": {"DKIM-Signature": "v=1"}}, "headers.DKIM-Signature", "may not be set"),
        ({"headers": {"content-type": "text/x"}}, "headers.content-type", "may not be set"),
        ({"headers": {"Message-ID": "<a@b>"}}, "headers.Message-ID", "may not be set"),
        ({"headers": {"Bad Name": "x"}}, "headers.Bad Name", "not valid"),
        ({"text": None, "html": None}, "text", "needs a body"),
        ({"text": 5}, "text", "must be a string"),
        ({"to": "ann@example.org", "priority": 1}, "priority", "unknown field"),
        ({"attachments": [{"filename": "a", "content": "!!"}]}, "attachments[0].content", "base64"),
        (
            {"attachments": [{"filename": "a", "content": "", "content_type": "csv"}]},
            "attachments[0].content_type",
            "MIME type",
        ),
    ],
)
@pytest_twisted.ensureDeferred
async def test_an_invalid_message_is_422_naming_the_field_and_queues_nothing(
    api: Api, http: HTTPClient, change: dict[str, Any], field: str, words: str
) -> None:
    message = {k: v for k, v in {**MESSAGE, **change}.items() if v is not None}
    code, body, hdrs = await post(http, api.base + "/v1/messages", message)
    assert code == 422, body
    assert hdrs.getRawHeaders(b"content-type") == [b"application/problem+json"]
    assert body["status"] == 422
    assert body["field"] == field
    assert words in body["detail"]
    assert api.envelopes == []
    assert (await api.queue.summary()).counts["queued"] == 0


@pytest.mark.parametrize(
    ("data", "kind", "status"),
    [
        (b"{not json", b"application/json", 400),
        (b"[1, 2]", b"application/json", 400),
        (b"\xff\xfe", b"application/json", 400),
        (b"from=a", b"application/x-www-form-urlencoded", 415),
        (b"{}", b"text/plain", 415),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_bodies_and_types_are_refused(
    api: Api, http: HTTPClient, data: bytes, kind: bytes, status: int
) -> None:
    code, body, _ = await post(http, api.base + "/v1/messages", data, headers(kind))
    assert code == status
    assert body["status"] == status
    assert api.envelopes == []


@pytest_twisted.ensureDeferred
async def test_a_raw_message_takes_its_envelope_from_the_query(api: Api, http: HTTPClient) -> None:
    raw = b"From: app@example.com\r\nTo: ann@example.org\r\nSubject: raw\r\n\r\nbody\r\n"
    url = api.base + "/v1/messages?from=bounce@example.com&to=ann@example.org,bob@example.org"
    code, body, _ = await post(http, url, raw, headers(b"message/rfc822"))
    assert code == 202, body
    (envelope,) = api.envelopes
    assert str(envelope.sender) == "bounce@example.com"
    assert [str(r) for r in envelope.recipients] == ["ann@example.org", "bob@example.org"]
    assert b"Subject: raw" in envelope.payload
    code, body, _ = await post(
        http, api.base + "/v1/messages?to=ann@example.org", raw, headers(b"message/rfc822")
    )
    assert (code, body["field"]) == (422, "from")
    code, body, _ = await post(
        http, api.base + "/v1/messages?from=a@example.com&to=bad", raw, headers(b"message/rfc822")
    )
    assert (code, body["field"]) == (422, "to")
    assert len(api.envelopes) == 1


@pytest_twisted.ensureDeferred
async def test_a_token_is_required_everywhere_but_healthz(api: Api, http: HTTPClient) -> None:
    for token in (None, new_token(), TOKEN[:-1]):
        code, body, hdrs = await post(
            http, api.base + "/v1/messages", MESSAGE, headers(token=token)
        )
        assert code == 401
        assert body["field"] == "Authorization"
        (challenge,) = hdrs.getRawHeaders(b"www-authenticate")
        assert challenge.startswith(b'Bearer realm="twistmail"')
        assert (b"invalid_token" in challenge) == (token is not None)
    response = await http.get(api.base + "/metrics")
    assert response.code == 401
    await response.content()
    response = await http.get(api.base + "/metrics", headers=headers())
    assert response.code == 200, await response.content()
    await response.content()
    response = await http.get(api.base + "/healthz")
    assert response.code == 200
    await response.content()
    assert api.envelopes == []


@pytest_twisted.ensureDeferred
async def test_a_client_that_keeps_presenting_wrong_tokens_gets_429(
    api: Api, http: HTTPClient
) -> None:
    for _ in range(3):  # a missing token is not a guess: it never counts
        code, _, _ = await post(http, api.base + "/v1/messages", MESSAGE, headers(token=None))
        assert code == 401
    for _ in range(5):
        code, _, _ = await post(
            http, api.base + "/v1/messages", MESSAGE, headers(token=new_token())
        )
        assert code == 401
    api.clock.advance(100)
    code, body, hdrs = await post(http, api.base + "/v1/messages", MESSAGE)
    assert (code, body["field"]) == (429, "Authorization")
    assert hdrs.getRawHeaders(b"retry-after") == [b"500"]
    assert api.envelopes == []
    api.clock.advance(500)
    code, _, _ = await post(http, api.base + "/v1/messages", MESSAGE)
    assert code == 202
    assert len(api.envelopes) == 1


@pytest_twisted.ensureDeferred
async def test_without_a_token_file_no_token_is_needed(open_api: Api, http: HTTPClient) -> None:
    code, body, _ = await post(http, open_api.base + "/v1/messages", MESSAGE, headers(token=None))
    assert code == 202, body


@pytest_twisted.ensureDeferred
async def test_only_known_host_names_and_addresses_are_answered(api: Api, http: HTTPClient) -> None:
    for host, status in (
        (b"evil.example", 421),
        (b"relay.test.evil.example:80", 421),
        (b"relay.test", 202),
        (b"RELAY.test:8025", 202),
        (b"localhost:1", 202),
        (b"10.1.2.3:8025", 202),
        (b"[::1]:8025", 202),
    ):
        code, body, _ = await post(http, api.base + "/v1/messages", MESSAGE, headers(Host=host))
        assert code == status, (host, body)
    assert len(api.envelopes) == 5


class _Raw(Protocol):
    def __init__(self, request: bytes, done: defer.Deferred[bytes]) -> None:
        self.request, self.done, self.data = request, done, b""

    def connectionMade(self) -> None:
        self.transport.write(self.request)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(self.data)


async def raw_exchange(port: int, request: bytes) -> bytes:
    """Send ``request`` as it is, and read until the server closes the connection."""
    done: defer.Deferred[bytes] = defer.Deferred()
    factory = ClientFactory.forProtocol(lambda: _Raw(request, done))  # type: ignore[arg-type]
    reactor.connectTCP("127.0.0.1", port, factory)  # type: ignore[attr-defined]
    return await done


@pytest_twisted.ensureDeferred
async def test_a_body_over_the_limit_is_413_before_it_is_read(api: Api) -> None:
    # Declared too large: refused at once, though not one byte of the body was sent.
    head = (
        b"POST /v1/messages HTTP/1.1\r\nHost: relay.test\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + TOKEN.encode() + b"\r\nContent-Length: 10000000\r\n\r\n"
    )
    answer = await raw_exchange(api.port, head)
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b"application/problem+json" in answer
    # Chunked, growing past the limit.
    chunk = b"x" * 50_000
    chunked = (
        head.replace(b"Content-Length: 10000000", b"Transfer-Encoding: chunked")
        + (b"%x\r\n%s\r\n" % (len(chunk), chunk)) * 4
    )
    answer = await raw_exchange(api.port, chunked)
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert api.envelopes == []


@pytest_twisted.ensureDeferred
async def test_a_message_over_the_size_limit_is_413(api: Api, http: HTTPClient) -> None:
    big = {**MESSAGE, "text": "y" * 110_000}
    code, body, _ = await post(http, api.base + "/v1/messages", big)
    assert code == 413
    assert "larger than 100000 bytes" in body["detail"]
    assert api.envelopes == []


@pytest_twisted.ensureDeferred
async def test_an_idempotency_key_queues_once_per_token(api: Api, http: HTTPClient) -> None:
    url = api.base + "/v1/messages"
    keyed = headers(**{"Idempotency-Key": b"order-42"})
    code, first, hdrs = await post(http, url, MESSAGE, keyed)
    assert code == 202
    assert hdrs.getRawHeaders(b"idempotent-replayed") is None
    code, again, hdrs = await post(http, url, MESSAGE, keyed)
    assert (code, again) == (202, first)
    assert hdrs.getRawHeaders(b"idempotent-replayed") == [b"true"]
    changed = {**MESSAGE, "subject": "changed"}
    code, body, _ = await post(http, url, changed, keyed)
    assert (code, body["field"]) == (409, "Idempotency-Key")
    # Another token's key of the same name is another key.
    other = headers(token=OTHER_TOKEN, **{"Idempotency-Key": b"order-42"})
    code, theirs, _ = await post(http, url, MESSAGE, other)
    assert code == 202
    assert theirs["id"] != first["id"]
    assert (await api.queue.summary()).counts["queued"] == 2
    for bad in (b"a" * 256, b"has space", b"\xe9t\xe9"):
        code, body, _ = await post(http, url, MESSAGE, headers(**{"Idempotency-Key": bad}))
        assert (code, body["field"]) == (400, "Idempotency-Key")
    assert (await api.queue.summary()).counts["queued"] == 2


async def get(http: HTTPClient, url: str, token: str | None = TOKEN) -> tuple[int, Any]:
    response = await http.get(url, headers=headers(token=token))
    return response.code, json.loads(await response.content())


async def send(http: HTTPClient, method: str, url: str) -> tuple[int, Any]:
    response = await http.request(method, url, headers=headers())
    return response.code, json.loads(await response.content())


@pytest_twisted.ensureDeferred
async def test_a_message_is_tracked_retried_and_cancelled(api: Api, http: HTTPClient) -> None:
    base = api.base + "/v1/messages"
    ids = [(await post(http, base, {**MESSAGE, "subject": f"m{n}"}))[1]["id"] for n in range(3)]
    code, shown = await get(http, f"{base}/{ids[0]}")
    assert code == 200
    assert shown["state"] == "queued"
    assert shown["from"] == "app@example.com"
    assert shown["attempts"] == 0
    assert shown["created_at"].endswith("Z")
    assert [r["address"] for r in shown["recipients"]] == [
        "ann@example.org",
        "bob@example.org",
        "cc@example.org",
        "hidden@example.org",
    ]
    # A delivery attempt refuses one recipient for good.
    (claimed,) = await api.queue.claim("w", 1, lease=30)
    outcome = Outcome(
        id=claimed.id,
        fence=claimed.fence,
        state="failed",
        attempts=1,
        code=550,
        response="no such user",
        recipients=tuple(
            (p, "failed" if p == 1 else "sent", 550 if p == 1 else 250, "no such user")
            for p in claimed.positions
        ),
        enhanced=tuple("5.1.1" if p == 1 else None for p in claimed.positions),
    )
    assert await api.queue.record("w", outcome)
    code, shown = await get(http, f"{base}/{ids[0]}")
    assert shown["state"] == "failed"
    ann, bob = shown["recipients"][:2]
    assert (bob["state"], bob["code"], bob["enhanced"], bob["text"]) == (
        "failed",
        550,
        "5.1.1",
        "no such user",
    )
    assert ann["enhanced"] is None
    assert shown["last_reply"] == {"code": 550, "text": "no such user"}
    # Retry: only a failed one.
    code, problem_body = await send(http, "POST", f"{base}/{ids[1]}/retry")
    assert (code, problem_body["field"]) == (409, "id")
    assert api.wakes == []
    code, retried = await send(http, "POST", f"{base}/{ids[0]}/retry")
    assert (code, retried["state"], retried["attempts"]) == (200, "queued", 0)
    assert retried["recipients"][1]["state"] == "pending"
    assert api.wakes == [1]
    # Cancel: a queued one, not one being sent.
    code, cancelled = await send(http, "DELETE", f"{base}/{ids[2]}")
    assert (code, cancelled["state"]) == (200, "failed")
    assert cancelled["last_reply"]["text"] == "cancelled by the API"
    await api.queue.claim("w", 10, lease=30)  # ids[0] and ids[1] are being sent
    code, body = await send(http, "DELETE", f"{base}/{ids[0]}")
    assert code == 409
    assert "sending" in body["detail"]
    for method, url in (("GET", f"{base}/999"), ("DELETE", f"{base}/999")):
        code, body = await send(http, method, url)
        assert (code, body["status"]) == (404, 404)
    code, _ = await get(http, f"{base}/{ids[0]}", token=None)
    assert code == 401


@pytest_twisted.ensureDeferred
async def test_the_list_pages_with_a_stable_cursor(api: Api, http: HTTPClient) -> None:
    base = api.base + "/v1/messages"
    ids = [(await post(http, base, MESSAGE))[1]["id"] for _ in range(5)]
    code, page = await get(http, base + "?limit=2")
    assert code == 200
    assert [m["id"] for m in page["messages"]] == ids[:2]
    await post(http, base, MESSAGE)  # a sixth, added while paging
    seen = [m["id"] for m in page["messages"]]
    while page["next_cursor"] is not None:
        code, page = await get(http, f"{base}?limit=2&cursor={page['next_cursor']}")
        seen += [m["id"] for m in page["messages"]]
    assert seen == [*ids, ids[-1] + 1]
    await send(http, "DELETE", f"{base}/{ids[3]}")
    code, failed = await get(http, base + "?state=failed")
    assert [m["id"] for m in failed["messages"]] == [ids[3]]
    assert failed["next_cursor"] is None
    for query, name in (("state=lost", "state"), ("limit=0", "limit"), ("cursor=x", "cursor")):
        code, body = await get(http, f"{base}?{query}")
        assert (code, body["field"]) == (400, name)


@pytest_twisted.ensureDeferred
async def test_unknown_paths_methods_and_ids_are_problems(api: Api, http: HTTPClient) -> None:
    for method, path, status in (
        ("GET", "/v1/messages/null", 404),
        ("GET", "/v1/messages/9223372036854775808", 404),
        ("POST", "/v1/messages/0/retry", 404),
        ("PUT", "/v1/messages/1", 405),
        ("GET", "/nowhere", 404),
    ):
        response = await http.request(method, api.base + path, headers=headers())
        body = json.loads(await response.content())
        assert response.code == status, path
        assert response.headers.getRawHeaders(b"content-type") == [b"application/problem+json"]
        assert body["status"] == status
    code, body = await send(http, "POST", api.base + "/v1/messages/1/retry")
    assert body["title"] == "Not Found"
    code, spec = await get(http, api.base + "/v1/openapi.json")
    assert (code, spec["openapi"]) == (200, "3.1.0")
    code, _ = await get(http, api.base + "/v1/openapi.json", token=None)
    assert code == 401


@pytest_twisted.ensureDeferred
async def test_headers_beyond_their_limit_are_refused(api: Api) -> None:
    """Twisted's limit (16 KiB of header lines) holds: the connection is dropped unanswered."""
    body = json.dumps(MESSAGE).encode()

    def request(filler: int) -> bytes:
        return (
            b"POST /v1/messages HTTP/1.1\r\nHost: relay.test\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nX-Filler: " + b"a" * filler + b"\r\n"
            b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )

    answer = await raw_exchange(api.port, request(8_000))
    assert answer.startswith(b"HTTP/1.1 202 ")
    answer = await raw_exchange(api.port, request(20_000))
    assert not answer.startswith(b"HTTP/1.1 2")
    assert len(api.envelopes) == 1
