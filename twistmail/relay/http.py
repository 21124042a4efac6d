"""The relay's HTTP listener: ``GET /healthz``, ``GET /metrics`` and the ``/v1`` API (Klein).

Access: when a token file is configured every endpoint but ``/healthz`` needs
``Authorization: Bearer TOKEN`` (401 with ``WWW-Authenticate`` otherwise), and every endpoint
but ``/healthz`` answers only to the ``Host`` names it was given and to IP addresses (421
otherwise: a DNS-rebinding page cannot reach it). Errors are ``application/problem+json``
(RFC 9457) with a ``field`` member naming what is wrong. Bodies larger than ``max_body`` are
refused with 413 before they are read (:class:`LimitedRequest`).

``POST /v1/messages`` takes a JSON message or a raw ``message/rfc822`` one
(:mod:`twistmail.relay.messages`) and answers ``202 {"id", "message_id"}`` once it is committed
to the queue.

``/healthz`` answers JSON: the relay's health dict plus ``"status"``. It is 503 only when the
health says the queue cannot be written (``"queue_writable": false``): an unreachable or
refusing upstream is what the queue is for, so it is 200 with the upstream's state shown, and a
probe does not restart the relay during an outage. A health callable that fails gives 500.

``/metrics`` answers the relay's metrics in Prometheus text format, the queue sizes read just
before (see :class:`~twistmail.relay.metrics.RelayMetrics`).

Serve it with :func:`make_site`.
"""

from __future__ import annotations

import functools
import hashlib
import io
import ipaddress
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final

from klein import Klein
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import Request as HTTPRequest
from twisted.web.iweb import IRequest
from twisted.web.server import Request, Site
from werkzeug.exceptions import MethodNotAllowed, NotFound

from ..interfaces import IQueue
from ..message import Envelope
from ..queue.records import Idempotent
from ..unsubscribe.headers import Unsubscribe
from .auth import FailureLimiter
from .campaigns import campaign_routes
from .messages import Problem, envelope_from_json, envelope_from_raw
from .metrics import CONTENT_TYPE, RelayMetrics
from .problems import problem
from .tokens import TokenChecker
from .tracking import tracking_routes

__all__ = [
    "Access",
    "Health",
    "Key",
    "LimitedRequest",
    "RelaySite",
    "Submit",
    "make_http",
    "make_site",
]

LOOPBACK_NAMES: Final = frozenset({"localhost", "localhost.localdomain"})

log = Logger()

Health = Callable[[], "defer.Deferred[Mapping[str, Any]] | Mapping[str, Any]"]
"""What ``/healthz`` calls: a dict (or a Deferred of one) with at least ``queue_writable``
(bool), and whatever else the relay reports (worker running, upstream state, ...)."""

Key = tuple[str, str, str]
"""An idempotency key as the queue takes it: (scope: the token's name, key, fingerprint)."""

Submit = Callable[[Envelope, str, "Key | None"], "defer.Deferred[Idempotent]"]
"""Queues an envelope for a client (its address, for the log), once per key when given one:
fires once committed (the relay's own door, sharing its queue and worker with SMTP)."""

OPENAPI: Final = resources.files(__package__) / "openapi.json"
"""The API's OpenAPI 3.1 description, served at ``/v1/openapi.json``."""

MAX_KEY_CHARS: Final = 255
_KEY = re.compile(rb"[\x21-\x7e]{1,%d}" % MAX_KEY_CHARS)


@dataclass(frozen=True)
class Access:
    """Who may use the API: ``tokens`` (None: no token needed), the ``hosts`` names it
    answers to (besides loopback names and IP addresses), and ``failures``, the client
    addresses that presented wrong tokens (to the API or the status page's login): one that
    failed too often is refused with 429 until its window has passed, its tokens not checked."""

    tokens: TokenChecker | None
    hosts: frozenset[str]
    failures: FailureLimiter | None = None

    def refused(self, request: IRequest) -> int:
        """Seconds the client of ``request`` must wait after too many wrong tokens (0: none)."""
        if self.failures is None:
            return 0
        return self.failures.retry_after(client_host(request))

    def wrong_token(self, request: IRequest) -> None:
        """The client of ``request`` presented a token that is not valid."""
        if self.failures is not None:
            self.failures.failed(client_host(request))

    def host_allowed(self, host: bytes | None) -> bool:
        """Whether a ``Host`` header value names this service."""
        if not host:
            return False
        try:
            text = host.decode("ascii").strip().lower()
        except UnicodeDecodeError:
            return False
        if text.startswith("["):  # [v6]:port
            name = text[1 : text.find("]")] if "]" in text else ""
        else:
            name = text.rsplit(":", 1)[0] if text.count(":") == 1 else text
        # An address cannot be rebound.
        return _is_ip_address(name) or name in self.hosts or name in LOOPBACK_NAMES


def client_host(request: IRequest) -> str:
    """The client's address as the logs and the failure limiter name it."""
    return str(getattr(request.getClientAddress(), "host", "?"))


@functools.lru_cache(maxsize=1024)
def _is_ip_address(name: str) -> bool:
    """Whether ``name`` is an IP address (remembered: clients send the same Host each time)."""
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class LimitedRequest(Request):
    """A request whose body may not exceed :attr:`max_body` bytes (twisted.web sets no limit):
    a larger ``Content-Length``, or a chunked body growing past it, is answered 413 at once
    and the connection closed, without reading the rest."""

    max_body = 1024 * 1024

    # twisted.web parses every POST's Content-Type with the email package (tens of µs) to find
    # form bodies to decode into ``args``; only a form's media type needs that.
    _parse_forms = True

    @property
    def _parsePOSTFormSubmission(self) -> bool:
        if not self._parse_forms:
            return False
        ctype = self.requestHeaders.getRawHeaders(b"content-type")
        return ctype is not None and _bare_media_type(ctype[0]) in _FORM_TYPES

    @_parsePOSTFormSubmission.setter
    def _parsePOSTFormSubmission(self, parse: bool) -> None:
        self._parse_forms = parse

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.max_body:
            self._too_large()
            return
        self._received = 0
        super().gotLength(length)  # type: ignore[no-untyped-call]

    def handleContentChunk(self, data: bytes) -> None:
        self._received = getattr(self, "_received", 0) + len(data)
        if self._received > self.max_body:
            self._too_large()
            return
        super().handleContentChunk(data)  # type: ignore[no-untyped-call]

    _refused = False

    def process(self) -> None:
        if not self._refused:
            super().process()  # type: ignore[no-untyped-call]

    def _too_large(self) -> None:
        if self._refused:
            return
        self._refused = True
        self.content = io.BytesIO()
        transport = self.channel.transport if self.channel is not None else None
        if transport is None:
            return
        body = json.dumps(
            {
                "type": "about:blank",
                "title": "Content Too Large",
                "status": 413,
                "detail": f"the body is larger than {self.max_body} bytes",
            }
        ).encode()
        transport.write(
            b"HTTP/1.1 413 Content Too Large\r\nContent-Type: application/problem+json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        transport.loseConnection()


_FORM_TYPES: Final = frozenset({b"application/x-www-form-urlencoded", b"multipart/form-data"})


def _bare_media_type(value: bytes) -> bytes:
    """``type/subtype`` of a Content-Type value, lower-cased, without parameters."""
    return value.split(b";", 1)[0].strip().lower()


class RelaySite(Site):
    """A ``Site`` whose access log leaves out the accepted ``POST /v1/messages``: the relay
    logs each of those already (``queued ID from=... client=http:...``), and a second line
    per message doubled the cost of logging on the busiest path."""

    def log(self, request: HTTPRequest) -> None:
        if request.code == 202 and request.method == b"POST" and request.path == b"/v1/messages":
            return
        super().log(request)


def make_site(app: Klein, *, max_body: int, timeout: float = 60.0) -> Site:
    """The ``Site`` serving ``app``: bodies up to ``max_body`` bytes, idle connections closed
    after ``timeout`` seconds (a slow client included); access log lines go to the relay's
    log, but for accepted messages (see :class:`RelaySite`)."""

    class Limited(LimitedRequest):
        pass

    Limited.max_body = max_body
    site = RelaySite(app.resource(), requestFactory=Limited, timeout=timeout)  # type: ignore[no-untyped-call]
    site.noisy = False
    return site


Handler = Callable[..., "defer.Deferred[bytes]"]


def _guarded(access: Access, handler: Handler) -> Handler:
    """``handler`` run only for a request with an allowed Host and, when tokens are
    configured, a valid token (its name in ``request.token_name``)."""

    # Klein routes by function name: each guarded handler keeps its own.
    @functools.wraps(handler)
    def guarded(request: IRequest, **route: Any) -> defer.Deferred[bytes]:
        if not access.host_allowed(request.getHeader(b"host")):
            return defer.succeed(
                problem(request, 421, "this service does not answer to that Host", "Host")
            )
        if access.tokens is None:
            request.token_name = None  # type: ignore[attr-defined]
            return handler(request, **route)
        presented = request.getHeader(b"authorization")
        if presented and (wait := access.refused(request)):
            request.setHeader(b"Retry-After", b"%d" % wait)
            return defer.succeed(
                problem(request, 429, "too many requests with a wrong token", "Authorization")
            )

        def checked(name: str | None) -> defer.Deferred[bytes]:
            if name is None:
                challenge = b'Bearer realm="twistmail"'
                if presented:
                    challenge += b', error="invalid_token"'
                    access.wrong_token(request)
                    log.warn(
                        "refused an API request with an unknown token from {client}",
                        client=client_host(request),
                    )
                request.setHeader(b"WWW-Authenticate", challenge)
                return defer.succeed(
                    problem(request, 401, "a valid bearer token is required", "Authorization")
                )
            request.token_name = name  # type: ignore[attr-defined]
            return handler(request, **route)

        return access.tokens.check(presented).addCallback(checked)

    return guarded


def _media_type(request: IRequest) -> str:
    value = request.getHeader(b"content-type") or b""
    return value.split(b";", 1)[0].strip().lower().decode("latin-1")


def make_http(
    health: Health,
    metrics: RelayMetrics,
    *,
    access: Access | None = None,
    submit: Submit | None = None,
    queue: IQueue | None = None,
    wake: Callable[[], None] = lambda: None,
    max_message_size: int = 25 * 1024 * 1024,
    pages: Sequence[tuple[str, str, Handler]] = (),
    unsubscribe: Unsubscribe | None = None,
) -> Klein:
    """The Klein app serving ``/healthz`` from ``health()``, ``/metrics`` from ``metrics``,
    (given ``submit``) ``POST /v1/messages`` and (given ``queue``) the message endpoints
    (:mod:`twistmail.relay.tracking`; ``wake()`` after a retry); ``access`` guards all but
    ``/healthz``. ``pages`` are ``(path, method, handler)`` routes that guard themselves
    (the status page, :mod:`twistmail.relay.statuspage`). Campaigns posted get the
    ``List-Unsubscribe`` headers of ``unsubscribe``, when given."""
    app = Klein()
    access = access if access is not None else Access(None, frozenset())

    @app.route("/healthz", methods=["GET"])
    def healthz(request: IRequest) -> defer.Deferred[bytes]:
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"Content-Type", b"application/json")

        def answer(state: Mapping[str, Any]) -> bytes:
            writable = state.get("queue_writable") is not False
            if not writable:
                request.setResponseCode(503)
            body = {**state, "status": "ok" if writable else "queue not writable"}
            return json.dumps(body, sort_keys=True, default=str).encode() + b"\n"

        def broken(failure: Failure) -> bytes:
            log.failure("checking the relay's health", failure)
            request.setResponseCode(500)
            return b'{"status": "health check failed"}\n'

        return defer.maybeDeferred(health).addCallbacks(answer, broken)

    def metrics_page(request: IRequest) -> defer.Deferred[bytes]:
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"Content-Type", CONTENT_TYPE.encode("ascii"))
        return metrics.refresh().addCallback(lambda _: metrics.render())

    app.route("/metrics", methods=["GET"])(_guarded(access, metrics_page))
    if submit is not None:
        post = _post_message(submit, max_message_size)
        app.route("/v1/messages", methods=["POST"])(_guarded(access, post))
    spec = OPENAPI.read_bytes()  # once, at start: never a disk read per request

    def openapi(request: IRequest) -> defer.Deferred[bytes]:
        request.setHeader(b"Content-Type", b"application/json")
        return defer.succeed(spec)

    app.route("/v1/openapi.json", methods=["GET"])(_guarded(access, openapi))

    @app.handle_errors(NotFound)
    def not_found(request: IRequest, failure: Failure) -> bytes:
        return problem(request, 404, "no such resource")

    @app.handle_errors(MethodNotAllowed)
    def not_allowed(request: IRequest, failure: Failure) -> bytes:
        allowed = getattr(failure.value, "valid_methods", None) or []
        request.setHeader(b"Allow", ", ".join(allowed).encode("ascii"))
        return problem(request, 405, "this resource does not take that method")

    if queue is not None:
        for path, method, handler in [
            *tracking_routes(queue, wake),
            *campaign_routes(queue, wake, unsubscribe),
        ]:
            app.route(path, methods=[method])(_guarded(access, handler))
    for path, method, handler in pages:
        app.route(path, methods=[method], endpoint=f"page {method} {path}")(handler)
    return app


def _idempotency_key(request: IRequest, kind: str, body: bytes) -> Key | None:
    """The request's Idempotency-Key as the queue takes it (scoped to its token, with a
    fingerprint of what it asks), or None without one."""
    raw = request.getHeader(b"idempotency-key")
    if raw is None:
        return None
    if _KEY.fullmatch(raw) is None:
        raise Problem(
            400,
            f"Idempotency-Key must be 1 to {MAX_KEY_CHARS} visible ASCII characters",
            "Idempotency-Key",
        )
    digest = hashlib.sha256()
    for part in (kind.encode(), request.uri.partition(b"?")[2], body):
        digest.update(b"%d:" % len(part) + part)
    scope = getattr(request, "token_name", None) or ""
    return scope, raw.decode("ascii"), digest.hexdigest()


def _post_message(submit: Submit, max_message_size: int) -> Handler:
    """``POST /v1/messages``: the envelope of the body, committed, then 202."""

    def post(request: IRequest) -> defer.Deferred[bytes]:
        kind = _media_type(request)
        assert request.content is not None
        body = request.content.read()
        try:
            key = _idempotency_key(request, kind, body)
            if kind == "application/json":
                envelope = envelope_from_json(body)
            elif kind == "message/rfc822":
                args = request.args or {}
                senders = args.get(b"from", [])
                if len(senders) > 1:
                    raise Problem(422, "give one envelope sender", "from")
                recipients = [
                    r.strip()
                    for value in args.get(b"to", [])
                    for r in value.decode("utf-8", "replace").split(",")
                    if r.strip()
                ]
                sender = senders[0].decode("utf-8", "replace") if senders else None
                envelope = envelope_from_raw(body, sender, recipients)
            else:
                raise Problem(
                    415,
                    "send application/json or message/rfc822",
                    "Content-Type",
                )
            if envelope.size > max_message_size:
                raise Problem(413, f"the message is larger than {max_message_size} bytes")
        except Problem as p:
            return defer.succeed(problem(request, p.status, p.detail, p.field))
        client = request.getClientAddress()
        token = getattr(request, "token_name", None)
        where = f"http:{getattr(client, 'host', client)}" + (f" token={token}" if token else "")

        def answered(result: Idempotent) -> bytes:
            if result.outcome == "conflict":
                return problem(
                    request,
                    409,
                    "this Idempotency-Key was used with another request",
                    "Idempotency-Key",
                )
            request.setResponseCode(202)
            request.setHeader(b"Content-Type", b"application/json")
            request.setHeader(b"Location", f"/v1/messages/{result.id}".encode())
            if result.outcome == "repeat":
                request.setHeader(b"Idempotent-Replayed", b"true")
            answer = json.dumps({"id": result.id, "message_id": result.message_id}).encode()
            # With its length known the body is not chunked (a response given by a Deferred
            # would be): one frame, fewer bytes for the client to parse.
            request.setHeader(b"Content-Length", b"%d" % (len(answer) + 1))
            return answer + b"\n"

        def refused(failure: Failure) -> bytes:
            log.failure("could not queue a message from the HTTP API", failure)
            return problem(request, 503, "the queue cannot be written; try again later")

        # Klein cancels the response's Deferred when the client goes away; the commit (and
        # its log line, count and worker wake-up) must go on, so the client can retry.
        response: defer.Deferred[bytes] = defer.Deferred()

        def respond(result: bytes) -> None:
            if not response.called:
                response.callback(result)

        submit(envelope, where, key).addCallbacks(answered, refused).addCallback(respond)
        return response

    return post
