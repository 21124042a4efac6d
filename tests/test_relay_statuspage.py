"""The relay's status page over real HTTP on 127.0.0.1, with an in-memory queue behind it:
the login, the session cookie, the Origin and Host checks, what the page shows, and retry.
(``test_relay_statuspage_browser.py`` drives it in a real browser against the real relay.)"""

from __future__ import annotations

import io
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from markupsafe import escape
from test_cli_e2e import _many_rows, write_campaign
from treq.client import HTTPClient
from twisted.internet import defer, reactor
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from twistmail.merge.queued import send
from twistmail.merge.run import SendOptions
from twistmail.message import envelope_from_bytes
from twistmail.queue import Outcome, QueueError, SqliteQueue
from twistmail.queue.campaigns import CampaignStatus
from twistmail.queue.memory import MemoryQueue
from twistmail.relay.auth import FailureLimiter
from twistmail.relay.http import Access, make_http, make_site
from twistmail.relay.metrics import RelayMetrics
from twistmail.relay.sessions import Sessions
from twistmail.relay.statuspage import CAMPAIGN_STATES, DeliveryHistory, StatusPage
from twistmail.relay.tokens import TokenChecker, hash_token, new_token

TOKEN = new_token()
T0 = 1_700_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now

    def seconds(self) -> float:  # as IReactorTime, for the failure limiter
        return self.now


@dataclass
class Page:
    base: str
    origin: bytes
    queue: Any
    clock: Clock
    tokens: Path | None
    history: DeliveryHistory
    wakes: list[int] = field(default_factory=list)


def _serve(tmp_path: Path, *, tokens: bool, sqlite: bool = False) -> Iterator[Page]:
    clock = Clock()
    queue: Any = MemoryQueue(clock=clock)
    if sqlite:  # an hour ahead of the wall clock, which the CLI queues campaigns on: all due
        clock.now = time.time() + 3600
        queue = pytest_twisted.blockon(
            SqliteQueue.open(tmp_path / "queue.db", clock=clock, reactor=reactor)
        )
    checker = path = None
    if tokens:
        path = tmp_path / "tokens"
        path.write_text(f"ops:{hash_token(TOKEN)}\n")
        checker = TokenChecker(str(path), reactor)  # type: ignore[arg-type]
    access = Access(checker, frozenset({"relay.test"}), FailureLimiter(clock))  # type: ignore[arg-type]
    history = DeliveryHistory(clock=clock)
    page = Page("", b"", queue, clock, path, history)
    status = StatusPage(
        queue,
        lambda: {"queue_writable": True, "worker_running": True, "upstream": "ok"},
        history,
        access=access,
        sessions=Sessions(clock=clock),
        wake=lambda: page.wakes.append(1),
        clock=clock,
    )
    app = make_http(lambda: {}, RelayMetrics(), access=access, pages=status.routes())
    port = reactor.listenTCP(0, make_site(app, max_body=65536), interface="127.0.0.1")  # type: ignore[attr-defined]
    page.base = f"http://127.0.0.1:{port.getHost().port}"
    page.origin = page.base.encode()
    yield page
    pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))
    if sqlite:
        pytest_twisted.blockon(queue.close())


@pytest.fixture
def page(tmp_path: Path) -> Iterator[Page]:
    yield from _serve(tmp_path, tokens=True)


@pytest.fixture
def open_page(tmp_path: Path) -> Iterator[Page]:
    yield from _serve(tmp_path, tokens=False)


@pytest.fixture
def sqlite_page(tmp_path: Path) -> Iterator[Page]:
    yield from _serve(tmp_path, tokens=True, sqlite=True)


@pytest.fixture
def http() -> HTTPClient:
    return HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))


async def request(
    http: HTTPClient,
    method: str,
    url: str,
    *,
    cookie: bytes | None = None,
    origin: bytes | None = None,
    form: bytes | None = None,
    host: bytes | None = None,
) -> tuple[int, str, Headers]:
    raw: dict[bytes, list[bytes]] = {}
    if cookie is not None:
        raw[b"Cookie"] = [b"twistmail_session=" + cookie]
    if origin is not None:
        raw[b"Origin"] = [origin]
    if form is not None:
        raw[b"Content-Type"] = [b"application/x-www-form-urlencoded"]
    if host is not None:
        raw[b"Host"] = [host]
    response = await http.request(
        method, url, data=form, headers=Headers(raw), allow_redirects=False
    )
    body = await response.content()
    return response.code, body.decode("utf-8", "replace"), response.headers


def location(headers: Headers) -> str:
    return (headers.getRawHeaders(b"location") or [b""])[0].decode()


def set_cookie(headers: Headers) -> str:
    return (headers.getRawHeaders(b"set-cookie") or [b""])[0].decode()


async def log_in(http: HTTPClient, page: Page, token: str = TOKEN) -> bytes:
    code, _, headers = await request(
        http, "POST", page.base + "/login", origin=page.origin, form=f"token={token}".encode()
    )
    assert (code, location(headers)) == (303, "/")
    value = re.match(r"twistmail_session=([^;]+);", set_cookie(headers))
    assert value is not None
    return value.group(1).encode()


def count(html: str, state: str) -> int:
    found = re.search(rf'id="count-{state}">(\d+)<', html)
    assert found is not None, state
    return int(found.group(1))


def envelope(n: int) -> Any:
    data = f"Message-ID: <m{n}@test>\r\nSubject: {n}\r\n\r\nbody\r\n".encode()
    return envelope_from_bytes("app@example.com", [f"user{n}@example.org"], data)


async def fail(queue: MemoryQueue, text: str) -> int:
    """One message enqueued, claimed and refused with ``text`` (5.1.1); its id."""
    (id_,) = await queue.enqueue([envelope(99)])
    held = await queue.claim("w", 100, lease=30)
    (claimed,) = [c for c in held if c.id == id_]
    await queue.release("w", [c for c in held if c.id != id_])
    outcome = Outcome(
        id=id_,
        fence=claimed.fence,
        state="failed",
        attempts=1,
        code=550,
        response=text,
        recipients=((0, "failed", 550, text),),
        enhanced=("5.1.1",),
    )
    assert await queue.record("w", outcome)
    return id_


# Logging in ------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_without_a_session_every_page_sends_to_the_login_form(
    page: Page, http: HTTPClient
) -> None:
    code, _, headers = await request(http, "GET", page.base + "/")
    assert (code, location(headers)) == (303, "/login")
    code, _, headers = await request(
        http, "POST", page.base + "/messages/1/retry", origin=page.origin
    )
    assert (code, location(headers)) == (303, "/login")
    code, html, headers = await request(http, "GET", page.base + "/login")
    assert code == 200
    assert '<form method="post" action="/login"' in html
    assert 'type="password" id="token" name="token"' in html
    assert b"frame-ancestors 'none'" in headers.getRawHeaders(b"content-security-policy")[0]


@pytest_twisted.ensureDeferred
async def test_a_token_posted_once_gives_a_signed_httponly_strict_cookie(
    page: Page, http: HTTPClient
) -> None:
    code, _, headers = await request(
        http, "POST", page.base + "/login", origin=page.origin, form=f"token={TOKEN}".encode()
    )
    assert (code, location(headers)) == (303, "/")
    cookie = set_cookie(headers)
    assert "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie
    assert "Path=/" in cookie
    assert TOKEN not in cookie
    value = await log_in(http, page)
    code, html, _ = await request(http, "GET", page.base + "/", cookie=value)
    assert code == 200
    assert 'id="counts"' in html
    assert "ops" in html  # who is logged in
    # Logging out expires the cookie.
    code, _, headers = await request(http, "POST", page.base + "/logout", origin=page.origin)
    assert (code, location(headers)) == (303, "/login")
    assert "Max-Age=0" in set_cookie(headers)


@pytest_twisted.ensureDeferred
async def test_a_bad_token_a_foreign_origin_or_a_token_in_the_url_opens_nothing(
    page: Page, http: HTTPClient
) -> None:
    login = page.base + "/login"
    form = f"token={TOKEN}".encode()
    code, html, headers = await request(
        http, "POST", login, origin=page.origin, form=b"token=" + new_token().encode()
    )
    assert (code, set_cookie(headers)) == (401, "")
    assert "That token is not valid." in html
    for origin in (None, b"http://evil.test", page.origin + b".evil.test"):
        code, _, headers = await request(http, "POST", login, origin=origin, form=form)
        assert (code, set_cookie(headers)) == (403, "")
    crowded = b"&".join(b"f%d=1" % n for n in range(20)) + b"&token=" + TOKEN.encode()
    code, _, headers = await request(http, "POST", login, origin=page.origin, form=crowded)
    assert (code, set_cookie(headers)) == (400, "")
    # Never from the URL (twisted.web logs URLs): the body is the only place.
    code, _, headers = await request(http, "POST", f"{login}?token={TOKEN}", origin=page.origin)
    assert (code, set_cookie(headers)) == (400, "")


@pytest_twisted.ensureDeferred
async def test_after_five_wrong_tokens_an_address_is_refused_until_its_window_passes(
    page: Page, http: HTTPClient
) -> None:
    login = page.base + "/login"
    for _ in range(5):
        code, _, _ = await request(
            http, "POST", login, origin=page.origin, form=b"token=" + new_token().encode()
        )
        assert code == 401
    # Now even the right token is not looked at: guessing cannot go on.
    form = f"token={TOKEN}".encode()
    code, html, headers = await request(http, "POST", login, origin=page.origin, form=form)
    assert (code, set_cookie(headers)) == (429, "")
    assert headers.getRawHeaders(b"retry-after") == [b"600"]
    assert "try again in 600 seconds" in html
    page.clock.now += 601
    await log_in(http, page)


@pytest_twisted.ensureDeferred
async def test_an_altered_forged_expired_or_orphaned_cookie_is_no_session(
    page: Page, http: HTTPClient
) -> None:
    value = await log_in(http, page)
    home = page.base + "/"
    assert (await request(http, "GET", home, cookie=value))[0] == 200
    altered = value[:-2] + (b"AA" if not value.endswith(b"AA") else b"BB")
    forged = Sessions().issue("ops", hash_token(TOKEN))  # another key
    renamed = value.replace(value.split(b".")[1], b"b3Rooc", 1)  # "other"'s name, ops' MAC
    for bad in (altered, forged, renamed, b"v1.garbage", b""):
        code, _, headers = await request(http, "GET", home, cookie=bad)
        assert (code, location(headers)) == (303, "/login"), bad
    page.clock.now += 8 * 3600 + 1
    assert (await request(http, "GET", home, cookie=value))[0] == 303
    # A session ends when its token is removed from the file (read again when it changes).
    fresh = await log_in(http, page)
    assert (await request(http, "GET", home, cookie=fresh))[0] == 200
    assert page.tokens is not None
    page.tokens.write_text(f"ops:{hash_token(new_token())}\n")
    assert (await request(http, "GET", home, cookie=fresh))[0] == 303


@pytest_twisted.ensureDeferred
async def test_every_route_answers_only_to_its_own_host_names(page: Page, http: HTTPClient) -> None:
    for method, path in (("GET", "/"), ("GET", "/login"), ("POST", "/login")):
        code, _, _ = await request(http, method, page.base + path, host=b"evil.test")
        assert code == 421
    code, _, _ = await request(http, "GET", page.base + "/login", host=b"relay.test")
    assert code == 200


# The page ----------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_page_shows_counts_the_oldest_and_failures_as_text(
    page: Page, http: HTTPClient
) -> None:
    await page.queue.enqueue([envelope(n) for n in range(3)])
    page.clock.now += 125
    failed = await fail(page.queue, "no such user <script>alert(1)</script>")
    for state in ("sent", "sent", "deferred", "failed"):
        page.history.add(state)
    value = await log_in(http, page)
    code, html, _ = await request(http, "GET", page.base + "/", cookie=value)
    assert code == 200
    assert (count(html, "queued"), count(html, "failed"), count(html, "total")) == (3, 1, 4)
    assert '<meta http-equiv="refresh" content="10">' in html
    assert "<script>alert" not in html
    assert "no such user &lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert f'id="failure-{failed}"' in html
    assert "550 5.1.1 no such user" in html
    assert "Oldest message not settled: <strong>1</strong>" in html
    assert "queued 2 min ago" in html
    assert 'id="hour">2 sent, 1 deferred, 1 failed.' in html
    assert 'id="upstream" class="ok">ok<' in html


@pytest_twisted.ensureDeferred
async def test_retry_needs_the_pages_origin_and_puts_a_failed_message_back(
    page: Page, http: HTTPClient
) -> None:
    failed = await fail(page.queue, "no such user")
    value = await log_in(http, page)
    retry = f"{page.base}/messages/{failed}/retry"
    for origin in (None, b"http://evil.test"):
        code, _, _ = await request(http, "POST", retry, cookie=value, origin=origin)
        assert code == 403
    assert (await page.queue.message(failed)).state == "failed"
    assert page.wakes == []
    code, _, headers = await request(http, "POST", retry, cookie=value, origin=page.origin)
    assert (code, location(headers)) == (303, f"/?retried={failed}")
    assert (await page.queue.message(failed)).state == "queued"
    assert page.wakes == [1]
    _, html, _ = await request(http, "GET", page.base + location(headers), cookie=value)
    assert f"Message {failed} is back in the queue." in html
    # Not failed any more: nothing to retry.
    code, _, headers = await request(http, "POST", retry, cookie=value, origin=page.origin)
    assert (code, location(headers)) == (303, f"/?refused={failed}")
    assert page.wakes == [1]


@pytest_twisted.ensureDeferred
async def test_without_a_token_file_the_page_is_open_and_actions_still_check_origin(
    open_page: Page, http: HTTPClient
) -> None:
    code, html, _ = await request(http, "GET", open_page.base + "/")
    assert code == 200
    assert 'id="logout"' not in html
    code, _, headers = await request(http, "GET", open_page.base + "/login")
    assert (code, location(headers)) == (303, "/")
    failed = await fail(open_page.queue, "no")
    retry = f"{open_page.base}/messages/{failed}/retry"
    assert (await request(http, "POST", retry))[0] == 403
    assert (await request(http, "POST", retry, origin=open_page.origin))[0] == 303
    assert (await open_page.queue.message(failed)).state == "queued"


def test_delivery_history_counts_each_minute_of_the_last_hour() -> None:
    clock = Clock()
    history = DeliveryHistory(clock=clock)
    history.add("sent")
    history.add("failed")
    history.add("whatever")  # not an outcome: not counted
    clock.now += 60
    history.add("deferred")
    minutes = history.minutes()
    assert len(minutes) == 60
    assert (minutes[-1].deferred, minutes[-2].sent, minutes[-2].failed) == (1, 1, 1)
    assert minutes[-1].start - minutes[-2].start == 60
    clock.now += 59 * 60  # the first minute is now an hour ago
    history.add("sent")
    assert sum(m.total for m in history.minutes()) == 2


@pytest_twisted.ensureDeferred
async def test_a_queue_that_cannot_be_read_gives_503_not_a_traceback(
    page: Page, http: HTTPClient
) -> None:
    value = await log_in(http, page)
    await page.queue.close()
    code, body, _ = await request(http, "GET", page.base + "/", cookie=value)
    assert code == 503
    assert "Traceback" not in body


def test_over_tls_the_cookie_is_secure_and_the_origin_is_https() -> None:
    from twisted.web.test.requesthelper import DummyRequest

    from twistmail.relay.statuspage import _set_cookie, same_origin

    request = DummyRequest([b""])
    request.isSecure = lambda: True  # type: ignore[method-assign]
    _set_cookie(request, b"v", 60)
    assert request.responseHeaders.getRawHeaders(b"set-cookie") == [
        b"twistmail_session=v; Path=/; Max-Age=60; HttpOnly; SameSite=Strict; Secure"
    ]
    request.requestHeaders.setRawHeaders(b"host", [b"relay.test:8025"])
    request.requestHeaders.setRawHeaders(b"origin", [b"http://relay.test:8025"])
    assert not same_origin(request)  # the page is https: an http page is another origin
    request.requestHeaders.setRawHeaders(b"origin", [b"https://relay.test:8025"])
    assert same_origin(request)


# Campaigns -------------------------------------------------------------------------------------


async def store_campaign(page: Page, tmp_path: Path, name: str, rows: list[dict[str, str]]) -> str:
    """A campaign queued as ``twistmail send CSV TEMPLATE --queue sqlite:... --enqueue-only``
    queues it (the same code, in this process); its id."""
    folder = tmp_path / f"campaign-{len(list(tmp_path.glob('campaign-*')))}"
    folder.mkdir()
    csv_path, template_path = write_campaign(folder, rows)
    out = io.StringIO()
    options = SendOptions(
        csv_path=csv_path,
        template_path=template_path,
        smtp_url="smtp://127.0.0.1:1",  # never used: --enqueue-only
        queue_url=f"sqlite:{tmp_path / 'queue.db'}",
        enqueue_only=True,
        campaign=name,
        out=out,
    )
    await send(options, reactor)
    assert f"campaign {name}: " in out.getvalue(), out.getvalue()
    campaign = await page.queue.campaign(name)
    assert campaign is not None
    return str(campaign.id)


async def deliver(page: Page, states: list[str]) -> None:
    """Claim as many messages as ``states`` has and record each with its state."""
    claimed = await page.queue.claim("w", len(states), lease=60)
    assert len(claimed) == len(states)
    for claim, state in zip(claimed, states, strict=True):
        code = {"sent": 250, "deferred": 451, "failed": 550}[state]
        outcome = Outcome(
            id=claim.id,
            fence=claim.fence,
            state=state,  # type: ignore[arg-type]
            attempts=1,
            code=code,
            response=state,
            retry_in=600.0 if state == "deferred" else 0.0,
            recipients=tuple(
                (i, "pending" if state == "deferred" else state, code, state)
                for i in range(len(claim.envelope.recipients))
            ),
        )
        assert await page.queue.record("w", outcome)


def shown_campaigns(html: str) -> dict[str, dict[str, str]]:
    """The campaign table's rows by campaign id: each cell by its state or class."""
    table = re.search(r'<table id="campaigns">(.*?)</table>', html, re.DOTALL)
    if table is None:
        return {}
    rows = {}
    for ident, row in re.findall(r'<tr id="campaign-(\w+)">(.*?)</tr>', table.group(1), re.DOTALL):
        cells = dict(re.findall(r'<td class="n" data-state="(\w+)">(\d+)</td>', row))
        for kind in ("name", "progress", "rate", "eta"):
            found = re.search(rf'<td class="{kind}">(.*?)</td>', row, re.DOTALL)
            assert found is not None, (kind, row)
            cells[kind] = found.group(1)
        rows[ident] = cells
    return rows


def expected(status: CampaignStatus) -> dict[str, str]:
    """What the page should show of ``status``."""
    done = status.total - status.waiting
    cells = {s: str(status.counts.get(s, 0)) for s in CAMPAIGN_STATES}
    cells["total"] = str(status.total)
    cells["name"] = str(escape(status.campaign.name))
    cells["progress"] = (
        f'<progress value="{done}" max="{status.total}"></progress> '
        f"{round(100 * done / status.total, 1)} %"
    )
    cells["rate"] = f"{round(status.rate * 60)} rows/min"
    return cells


@pytest_twisted.ensureDeferred
async def test_the_page_shows_running_campaigns_as_the_queue_reports_them(
    sqlite_page: Page, http: HTTPClient, tmp_path: Path
) -> None:
    page = sqlite_page
    value = await log_in(http, page)
    _, html, _ = await request(http, "GET", page.base + "/", cookie=value)
    assert 'id="campaigns">No campaign is running.<' in html
    # An old campaign, sent entirely more than a minute ago: no longer running.
    old = await store_campaign(page, tmp_path, "autumn", _many_rows(2))
    await deliver(page, ["sent", "sent"])
    page.clock.now += 120
    # One finished just now, and one under way, with a row the CLI found invalid.
    just = await store_campaign(page, tmp_path, "summer", _many_rows(1))
    await deliver(page, ["sent"])
    rows = [*_many_rows(6), {"email": "not-an-address", "name": "X", "code": "0"}]
    busy = await store_campaign(page, tmp_path, "spring", rows)
    await deliver(page, ["sent", "sent", "deferred", "failed"])
    _, html, _ = await request(http, "GET", page.base + "/", cookie=value)
    shown = shown_campaigns(html)
    statuses = {s.campaign.id: s for s in await page.queue.campaign_status(unsent=0)}
    assert set(statuses) == {old, just, busy}
    assert list(shown) == [just, busy]  # the queue's order: oldest first
    for ident, cells in shown.items():
        want = expected(statuses[ident])
        assert {k: v for k, v in cells.items() if k not in ("name", "eta")} == {
            k: v for k, v in want.items() if k != "name"
        }
        assert cells["name"].startswith(want["name"] + "<br>")
    counted = {state: shown[busy][state] for state in [*CAMPAIGN_STATES, "total"]}
    assert counted == {
        "pending": "2",
        "deferred": "1",
        "sent": "2",
        "failed": "1",
        "invalid": "1",
        "duplicate": "0",
        "total": "7",
    }
    assert shown[busy]["progress"].endswith("> 57.1 %")  # 4 of 7 rows settled
    # 2 rows sent in the last minute: the 3 waiting ones in 90 s.
    assert shown[busy]["rate"] == "2 rows/min"
    assert statuses[busy].eta == 90.0
    assert shown[busy]["eta"] == "90 s"
    assert shown[just]["eta"] == "done"
    # A minute later nothing is sent lately: the ETA is unknown, and "summer" is over.
    page.clock.now += 61
    _, html, _ = await request(http, "GET", page.base + "/", cookie=value)
    shown = shown_campaigns(html)
    assert list(shown) == [busy]
    assert shown[busy]["eta"] == "unknown: nothing sent in the last minute"
    assert shown[busy]["rate"] == "0 rows/min"


@pytest_twisted.ensureDeferred
async def test_a_campaign_name_with_html_in_it_is_shown_as_text(
    sqlite_page: Page, http: HTTPClient, tmp_path: Path
) -> None:
    name = '<script>alert(1)</script><b title="x">&amp;'
    ident = await store_campaign(sqlite_page, tmp_path, name, _many_rows(2))
    value = await log_in(http, sqlite_page)
    code, html, headers = await request(http, "GET", sqlite_page.base + "/", cookie=value)
    assert code == 200
    assert "<script>" not in html
    assert '<b title="x">' not in html
    shown = shown_campaigns(html)
    assert shown[ident]["name"].startswith(
        "&lt;script&gt;alert(1)&lt;/script&gt;&lt;b title=&#34;x&#34;&gt;&amp;amp;<br>"
    )
    assert headers.getRawHeaders(b"content-security-policy")[0].startswith(b"default-src 'none';")


@pytest_twisted.ensureDeferred
async def test_campaigns_that_cannot_be_read_leave_the_rest_of_the_page(
    page: Page, http: HTTPClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    await page.queue.enqueue([envelope(1)])

    def broken(*args: Any, **kwargs: Any) -> Any:
        return defer.fail(QueueError("the campaigns table is locked"))

    monkeypatch.setattr(page.queue, "campaign_status", broken)
    value = await log_in(http, page)
    code, html, _ = await request(http, "GET", page.base + "/", cookie=value)
    assert code == 200
    assert count(html, "queued") == 1
    assert 'id="campaigns" class="bad">The campaigns cannot be read now.<' in html
    assert "locked" not in html


@pytest_twisted.ensureDeferred
async def test_the_queue_and_the_campaigns_are_read_together(
    page: Page, http: HTTPClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    overview, campaign_status = page.queue.overview, page.queue.campaign_status
    asked: list[tuple[str, bool]] = []
    answered = defer.Deferred[None]()

    def slow_overview(*args: Any, **kwargs: Any) -> Any:
        asked.append(("overview", answered.called))
        reactor.callLater(0.05, answered.callback, None)  # type: ignore[attr-defined]
        return answered.addCallback(lambda _: overview(*args, **kwargs))

    def campaigns(*args: Any, **kwargs: Any) -> Any:
        asked.append(("campaigns", answered.called))
        return campaign_status(*args, **kwargs)

    monkeypatch.setattr(page.queue, "overview", slow_overview)
    monkeypatch.setattr(page.queue, "campaign_status", campaigns)
    value = await log_in(http, page)
    code, html, _ = await request(http, "GET", page.base + "/", cookie=value)
    assert code == 200
    assert 'id="campaigns">No campaign is running.<' in html
    # The campaigns were asked for before the overview answered.
    assert asked == [("overview", False), ("campaigns", False)]


@pytest_twisted.ensureDeferred
async def test_past_the_limit_the_page_says_how_many_more_campaigns_run(
    sqlite_page: Page, http: HTTPClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from twistmail.relay import statuspage

    monkeypatch.setattr(statuspage, "CAMPAIGNS_SHOWN", 2)
    idents = [await store_campaign(sqlite_page, tmp_path, f"c{n}", _many_rows(1)) for n in range(3)]
    value = await log_in(http, sqlite_page)
    _, html, _ = await request(http, "GET", sqlite_page.base + "/", cookie=value)
    assert list(shown_campaigns(html)) == idents[:2]
    assert 'id="campaigns-more" class="muted">1 more running campaign is not shown' in html
