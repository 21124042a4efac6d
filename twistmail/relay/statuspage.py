"""The relay's status page: ``GET /`` in a browser, for the person running the relay.

It shows the queue's counts by state, the delivery attempts per minute over the last hour, the
oldest message not yet settled, the upstream's health, the running CSV campaigns (those with
rows still waiting, or with rows sent in the last minute: each with its counts by state,
progress, recent rate and ETA) and the last failures with their reasons, each with a button
that puts the message back in the queue; it reloads itself every :data:`REFRESH` seconds.
Rendered with Jinja2, autoescaped: every queue value (addresses, reply texts, campaign names)
is text, never markup.

Access, when the relay has a token file: ``GET /login`` is a form that POSTs an API token (in
the body, never in a URL: URLs are logged); a good token gets a signed session cookie
(:mod:`twistmail.relay.sessions`; ``HttpOnly``, ``SameSite=Strict``, ``Secure`` over TLS).
A request without a valid session is sent to the login form. Every POST (login, logout,
retry) must carry an ``Origin`` naming this very page, or is refused with 403 (cross-site
request forgery). Every route answers only to the ``Host`` names the API answers to (421).
Without a token file (a relay on loopback only) the page is open, and the Origin check stays.

Queue reads go through the store (:meth:`~twistmail.interfaces.IQueue.overview` and
:meth:`~twistmail.interfaces.IQueue.campaign_status`, asked together, on its thread; a
campaign read that fails leaves the rest of the page shown); the deliveries per minute are
counted in memory by :class:`DeliveryHistory`, fed by the relay with each recorded attempt (a
restart starts them again).
"""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import jinja2
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from ..interfaces import IQueue
from ..queue.campaigns import CampaignStatus
from ..queue.records import QueueOverview
from .http import Access, Health, client_host
from .problems import problem
from .sessions import COOKIE, Sessions
from .tracking import MAX_ID

__all__ = ["CAMPAIGN_STATES", "REFRESH", "DeliveryHistory", "Minute", "StatusPage", "running"]

log = Logger()

REFRESH: Final = 10
"""Seconds between the page's reloads of itself."""

FAILURES_SHOWN: Final = 20
CAMPAIGNS_SHOWN: Final = 20
"""Running campaigns listed at most (the oldest first); the page says how many more run."""

CAMPAIGN_STATES: Final = ("pending", "deferred", "sent", "failed", "invalid", "duplicate")
"""A campaign row's states, in the order of the page's columns."""
MAX_TOKEN_FIELD: Final = 512

_HEADERS: Final = {
    b"Content-Type": b"text/html; charset=utf-8",
    b"Cache-Control": b"no-store",
    b"Content-Security-Policy": (
        b"default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
        b"frame-ancestors 'none'; base-uri 'none'"
    ),
    b"X-Frame-Options": b"DENY",
    b"X-Content-Type-Options": b"nosniff",
    b"Referrer-Policy": b"same-origin",  # "no-referrer" makes a browser send "Origin: null"
}

Route = tuple[str, str, Callable[..., "defer.Deferred[bytes]"]]


@dataclass(frozen=True, slots=True)
class Minute:
    """Delivery attempts recorded in the minute starting at ``start`` (seconds)."""

    start: float
    sent: int = 0
    deferred: int = 0
    failed: int = 0

    @property
    def total(self) -> int:
        """Every attempt of the minute."""
        return self.sent + self.deferred + self.failed


class DeliveryHistory:
    """Delivery attempts per minute over the last ``minutes`` minutes, by outcome."""

    def __init__(self, *, clock: Callable[[], float] = time.time, minutes: int = 60) -> None:
        self._clock = clock
        self._minutes = minutes
        self._counts: dict[int, list[int]] = {}

    _INDEX: Final = {"sent": 0, "deferred": 1, "failed": 2}

    def add(self, state: str) -> None:
        """Count one attempt that ended ``sent``, ``deferred`` or ``failed`` now."""
        index = self._INDEX.get(state)
        if index is None:
            return
        minute = int(self._clock() // 60)
        counts = self._counts.get(minute)
        if counts is None:
            counts = self._counts[minute] = [0, 0, 0]
            for old in [m for m in self._counts if m <= minute - self._minutes]:
                del self._counts[old]
        counts[index] += 1

    def minutes(self) -> list[Minute]:
        """Each of the last ``minutes`` minutes, the current one last."""
        now = int(self._clock() // 60)
        return [
            Minute(m * 60.0, *self._counts.get(m, (0, 0, 0)))
            for m in range(now - self._minutes + 1, now + 1)
        ]


def _utc(at: float | None) -> str:
    if at is None:
        return "-"
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 172800:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 86400} days"


def running(statuses: list[CampaignStatus]) -> list[CampaignStatus]:
    """The campaigns of ``statuses`` still running: with rows waiting (pending or deferred),
    or with rows sent in the last minute (finished just now)."""
    return [s for s in statuses if s.waiting or s.recent]


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("twistmail.relay", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["utc"] = _utc
    env.filters["duration"] = _duration
    return env


def same_origin(request: IRequest) -> bool:
    """Whether the request's ``Origin`` is this page's own (scheme and ``Host``)."""
    origin = request.getHeader(b"origin")
    host = request.getHeader(b"host")
    if not origin or not host:
        return False
    scheme = b"https://" if request.isSecure() else b"http://"
    return bool(origin.strip().lower() == scheme + host.strip().lower())


def _redirect(request: IRequest, to: bytes) -> bytes:
    request.setResponseCode(303)
    request.setHeader(b"Location", to)
    request.setHeader(b"Cache-Control", b"no-store")
    return b""


def _set_cookie(request: IRequest, value: bytes, max_age: int) -> None:
    """Set the session cookie: script cannot read it, other sites' requests do not carry it,
    and over TLS it never travels in clear."""
    cookie = b"%s=%s; Path=/; Max-Age=%d; HttpOnly; SameSite=Strict" % (COOKIE, value, max_age)
    if request.isSecure():
        cookie += b"; Secure"
    request.responseHeaders.addRawHeader(b"Set-Cookie", cookie)


def _form_field(request: IRequest, name: bytes) -> bytes | None:
    """A field of a form body (never of the URL's query)."""
    kind = (request.getHeader(b"content-type") or b"").split(b";", 1)[0].strip().lower()
    if kind != b"application/x-www-form-urlencoded" or request.content is None:
        return None
    request.content.seek(0)
    try:
        fields = urllib.parse.parse_qs(request.content.read(), max_num_fields=10)
    except ValueError:  # too many fields
        return None
    values = fields.get(name)
    return values[0] if values else None


class StatusPage:
    """The status page's routes over ``queue`` (see the module's docstring).

    ``health()`` is what ``/healthz`` reports; ``history`` counts deliveries; ``wake()`` is
    called after a retry; ``access`` and ``sessions`` decide who gets in; ``clock()`` gives
    the time the page shows ages against.
    """

    def __init__(
        self,
        queue: IQueue,
        health: Health,
        history: DeliveryHistory,
        *,
        access: Access,
        sessions: Sessions,
        wake: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.queue = queue
        self.health = health
        self.history = history
        self.access = access
        self.sessions = sessions
        self.wake = wake
        self._clock = clock
        env = _environment()
        self._status = env.get_template("status.html")  # read once, at start
        self._login = env.get_template("login.html")

    def routes(self) -> list[Route]:
        """``(path, method, handler)`` of each of the page's routes."""
        return [
            ("/", "GET", self._hosted(self.show)),
            ("/login", "GET", self._hosted(self.login_form)),
            ("/login", "POST", self._hosted(self.log_in)),
            ("/logout", "POST", self._hosted(self.log_out)),
            ("/messages/<int:message_id>/retry", "POST", self._hosted(self.retry)),
        ]

    def _hosted(self, handler: Callable[..., defer.Deferred[bytes]]) -> Callable[..., Any]:
        def hosted(request: IRequest, **route: Any) -> defer.Deferred[bytes]:
            if not self.access.host_allowed(request.getHeader(b"host")):
                detail = "this service does not answer to that Host"
                return defer.succeed(problem(request, 421, detail, "Host"))
            for name, value in _HEADERS.items():
                request.setHeader(name, value)
            return handler(request, **route)

        return hosted

    def _html(self, request: IRequest, template: jinja2.Template, **values: Any) -> bytes:
        return template.render(refresh=REFRESH, **values).encode("utf-8")

    def session(self, request: IRequest) -> defer.Deferred[str | None]:
        """The name of the token that opened the request's session; None without a valid
        one; ``""`` when the relay has no token file (the page is open)."""
        tokens = self.access.tokens
        if tokens is None:
            return defer.succeed("")
        value = request.getCookie(COOKIE)
        name = Sessions.claimed(value)
        if name is None:
            return defer.succeed(None)

        def bound(stored: str | None) -> str | None:
            return None if stored is None else self.sessions.verify(value, stored)

        return tokens.stored(name).addCallback(bound)

    # ------------------------------------------------------------------ the page

    def show(self, request: IRequest) -> defer.Deferred[bytes]:
        def allowed(name: str | None) -> defer.Deferred[bytes] | bytes:
            if name is None:
                return _redirect(request, b"/login")
            ask: Callable[[], Any] = self.health
            health: defer.Deferred[Any] = defer.maybeDeferred(ask)
            health.addErrback(lambda f: {"queue_writable": False, "queue_error": str(f.value)})
            reads: list[defer.Deferred[Any]] = [
                self.queue.overview(FAILURES_SHOWN),
                self.queue.campaign_status(unsent=0),
            ]
            both: defer.Deferred[Any] = defer.DeferredList(reads, consumeErrors=True)

            def render(results: list[tuple[bool, Any]]) -> defer.Deferred[bytes] | bytes:
                (read, view), (listed, campaigns) = results
                if not read:
                    log.failure("the status page could not read the queue", view)
                    return problem(request, 503, "the queue cannot be read now; try again later")
                if not listed:
                    log.failure("the status page could not read the campaigns", campaigns)
                    campaigns = None
                return health.addCallback(
                    lambda state: self._render(request, name, view, state, campaigns)
                )

            return both.addCallback(render)

        return self.session(request).addCallback(allowed)

    def _render(
        self,
        request: IRequest,
        name: str,
        view: QueueOverview,
        health: Mapping[str, Any],
        campaigns: list[CampaignStatus] | None,
    ) -> bytes:
        now = self._clock()
        minutes = self.history.minutes()
        peak = max((m.total for m in minutes), default=0) or 1
        args = request.args or {}
        notice = None
        for kind in (b"retried", b"refused"):
            raw = args.get(kind, [b""])[-1]
            if raw.isdigit():
                notice = (kind.decode(), int(raw))
        return self._html(
            request,
            self._status,
            name=name,
            open_page=self.access.tokens is None,
            now=now,
            counts=view.counts,
            total=sum(view.counts.values()),
            oldest=view.oldest,
            failures=view.failures,
            minutes=minutes,
            peak=peak,
            hour={
                "sent": sum(m.sent for m in minutes),
                "deferred": sum(m.deferred for m in minutes),
                "failed": sum(m.failed for m in minutes),
            },
            health=health,
            notice=notice,
            campaigns=None if campaigns is None else running(campaigns),
            campaigns_shown=CAMPAIGNS_SHOWN,
            campaign_states=CAMPAIGN_STATES,
        )

    # ------------------------------------------------------------------ logging in and out

    def login_form(self, request: IRequest) -> defer.Deferred[bytes]:
        if self.access.tokens is None:
            return defer.succeed(_redirect(request, b"/"))
        return defer.succeed(self._html(request, self._login, error=None))

    def log_in(self, request: IRequest) -> defer.Deferred[bytes]:
        tokens = self.access.tokens
        if tokens is None:
            return defer.succeed(_redirect(request, b"/"))
        if not same_origin(request):
            return defer.succeed(problem(request, 403, "cross-origin request refused", "Origin"))
        if wait := self.access.refused(request):
            request.setResponseCode(429)
            request.setHeader(b"Retry-After", b"%d" % wait)
            error = f"Too many wrong tokens from your address: try again in {wait} seconds."
            return defer.succeed(self._html(request, self._login, error=error))
        token = _form_field(request, b"token")
        if not token or len(token) > MAX_TOKEN_FIELD:
            request.setResponseCode(400)
            return defer.succeed(self._html(request, self._login, error="Enter a token."))

        def checked(name: str | None) -> defer.Deferred[bytes] | bytes:
            if name is None:
                self.access.wrong_token(request)
                log.warn(
                    "refused a status page login with an unknown token from {client}",
                    client=client_host(request),
                )
                request.setResponseCode(401)
                return self._html(request, self._login, error="That token is not valid.")
            return tokens.stored(name).addCallback(opened, name)

        def opened(stored: str | None, name: str) -> bytes:
            value = self.sessions.issue(name, stored or "")
            _set_cookie(request, value, int(self.sessions.max_age))
            log.info("status page login with the token {name}", name=name)
            return _redirect(request, b"/")

        return tokens.check(b"Bearer " + token.strip()).addCallback(checked)

    def log_out(self, request: IRequest) -> defer.Deferred[bytes]:
        if not same_origin(request):
            return defer.succeed(problem(request, 403, "cross-origin request refused", "Origin"))
        _set_cookie(request, b"", 0)
        return defer.succeed(_redirect(request, b"/login"))

    # ------------------------------------------------------------------ actions

    def retry(self, request: IRequest, message_id: int) -> defer.Deferred[bytes]:
        if not same_origin(request):
            return defer.succeed(problem(request, 403, "cross-origin request refused", "Origin"))

        def allowed(name: str | None) -> defer.Deferred[bytes] | bytes:
            if name is None:
                return _redirect(request, b"/login")
            if not 0 < message_id <= MAX_ID:
                return _redirect(request, b"/?refused=%d" % message_id)
            return self.queue.retry(message_id).addCallback(retried)

        def retried(result: str) -> bytes:
            if result == "retried":
                self.wake()
                log.info("message {id} retried from the status page", id=message_id)
                return _redirect(request, b"/?retried=%d" % message_id)
            return _redirect(request, b"/?refused=%d" % message_id)

        return self.session(request).addCallback(allowed)
