"""The relay's metrics and its HTTP listener (/healthz, /metrics), over real HTTP on 127.0.0.1."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import prometheus_client
import pytest
import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from treq.client import HTTPClient
from twisted.internet import defer, reactor
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.server import Site

from twistmail.relay.http import make_http
from twistmail.relay.metrics import RelayMetrics


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text page, by name and sorted labels."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


# The metrics themselves. ------------------------------------------------------------------


def test_each_call_moves_its_own_series() -> None:
    metrics = RelayMetrics()
    metrics.accepted()
    metrics.accepted(2)
    metrics.delivered("sent", 250)
    metrics.delivered("sent", 250)
    metrics.delivered("deferred", 451)
    metrics.delivered("deferred", None)
    metrics.delivered("failed", 550)
    metrics.observe_latency(0.3)
    metrics.observe_latency(7200)
    metrics.observe_latency(0.1)  # a bucket's bound is in that bucket (le)
    metrics.bounce("hard")
    metrics.session_opened()
    metrics.session_opened()
    metrics.session_closed()
    metrics.set_queue_sizes({"queued": 4, "deferred": 2}, oldest_age=90.5)
    got = samples(metrics.render().decode())
    assert got[("twistmail_relay_messages_accepted_total", ())] == 3
    deliveries = "twistmail_relay_deliveries_total"
    assert got[(deliveries, (("code", "2xx"), ("result", "sent")))] == 2
    assert got[(deliveries, (("code", "4xx"), ("result", "deferred")))] == 1
    assert got[(deliveries, (("code", "none"), ("result", "deferred")))] == 1
    assert got[(deliveries, (("code", "5xx"), ("result", "failed")))] == 1
    assert got[(deliveries, (("code", "none"), ("result", "failed")))] == 0
    latency = "twistmail_relay_delivery_latency_seconds"
    assert got[(latency + "_count", ())] == 3
    assert got[(latency + "_sum", ())] == pytest.approx(7200.4)
    assert got[(latency + "_bucket", (("le", "0.05"),))] == 0
    assert got[(latency + "_bucket", (("le", "0.1"),))] == 1
    assert got[(latency + "_bucket", (("le", "0.5"),))] == 2
    assert got[(latency + "_bucket", (("le", "3600.0"),))] == 2
    assert got[(latency + "_bucket", (("le", "14400.0"),))] == 3
    assert got[(latency + "_bucket", (("le", "+Inf"),))] == 3
    assert got[("twistmail_relay_bounces_total", (("kind", "hard"),))] == 1
    assert ("twistmail_relay_messages_accepted_created", ()) in got
    assert got[("twistmail_relay_smtp_sessions", ())] == 1
    queue = "twistmail_relay_queue_messages"
    assert got[(queue, (("state", "queued"),))] == 4
    assert got[(queue, (("state", "deferred"),))] == 2
    assert got[(queue, (("state", "sending"),))] == 0
    assert got[("twistmail_relay_oldest_queued_age_seconds", ())] == 90.5


def test_an_unknown_result_is_refused() -> None:
    with pytest.raises(ValueError, match="'bounced' is not one of"):
        RelayMetrics().delivered("bounced", 550)


def test_the_metrics_stay_out_of_the_global_registry() -> None:
    RelayMetrics().accepted()
    RelayMetrics().accepted()  # a second one does not clash either
    global_page = prometheus_client.generate_latest().decode()
    assert "twistmail_relay" not in global_page


def test_refresh_reads_the_queue_sizes_and_keeps_the_last_on_failure() -> None:
    answers: list[Any] = [
        ({"queued": 7}, 12.0),
        defer.succeed(({"queued": 3, "failed": 1}, None)),
        defer.fail(RuntimeError("database is locked")),
    ]
    metrics = RelayMetrics(queue_sizes=lambda: answers.pop(0))
    queued = ("twistmail_relay_queue_messages", (("state", "queued"),))
    oldest = ("twistmail_relay_oldest_queued_age_seconds", ())
    metrics.refresh()
    assert samples(metrics.render().decode())[queued] == 7
    assert samples(metrics.render().decode())[oldest] == 12
    metrics.refresh()
    assert samples(metrics.render().decode())[queued] == 3
    assert samples(metrics.render().decode())[oldest] == 0
    failures: list[Any] = []
    metrics.refresh().addErrback(failures.append)
    assert failures == []  # logged, not raised
    assert samples(metrics.render().decode())[queued] == 3


# Over HTTP. -------------------------------------------------------------------------------


@pytest.fixture
def serve() -> Iterator[Callable[[Any], str]]:
    """``serve(app)`` listens on 127.0.0.1, port 0, and gives the base URL."""
    ports: list[Any] = []

    def start(app: Any) -> str:
        port = reactor.listenTCP(0, Site(app.resource()), interface="127.0.0.1")  # type: ignore[attr-defined]
        ports.append(port)
        return f"http://127.0.0.1:{port.getHost().port}"

    yield start
    for port in ports:
        pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


@pytest.fixture
def http() -> HTTPClient:
    """A treq client that keeps no connection open."""
    return HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))


async def fetch(http: HTTPClient, url: str) -> tuple[int, str, bytes]:
    response = await http.get(url)
    body = await response.content()
    (content_type,) = response.headers.getRawHeaders(b"content-type")
    return response.code, content_type.decode(), body


@pytest_twisted.ensureDeferred
async def test_healthz_is_200_during_an_upstream_outage(
    serve: Callable[[Any], str], http: HTTPClient
) -> None:
    state = {"queue_writable": True, "worker": "running", "upstream": "unreachable since 09:12"}
    base = serve(make_http(lambda: state, RelayMetrics()))
    code, content_type, body = await fetch(http, base + "/healthz")
    assert code == 200
    assert content_type == "application/json"
    assert json.loads(body) == {**state, "status": "ok"}


@pytest_twisted.ensureDeferred
async def test_healthz_is_503_when_the_queue_cannot_be_written(
    serve: Callable[[Any], str], http: HTTPClient
) -> None:
    def health() -> defer.Deferred[Mapping[str, Any]]:
        later: defer.Deferred[Mapping[str, Any]] = defer.Deferred()
        reactor.callLater(0, later.callback, {"queue_writable": False, "error": "disk full"})  # type: ignore[attr-defined]
        return later

    base = serve(make_http(health, RelayMetrics()))
    code, _, body = await fetch(http, base + "/healthz")
    assert code == 503
    assert json.loads(body) == {
        "queue_writable": False,
        "error": "disk full",
        "status": ("queue not writable"),
    }


@pytest_twisted.ensureDeferred
async def test_a_failing_health_check_is_500(serve: Callable[[Any], str], http: HTTPClient) -> None:
    def health() -> Mapping[str, Any]:
        raise RuntimeError("bug")

    base = serve(make_http(health, RelayMetrics()))
    code, _, body = await fetch(http, base + "/healthz")
    assert code == 500
    assert json.loads(body) == {"status": "health check failed"}


@pytest_twisted.ensureDeferred
async def test_metrics_are_served_in_prometheus_text_format(
    serve: Callable[[Any], str], http: HTTPClient
) -> None:
    sizes = {"queued": 5}
    metrics = RelayMetrics(queue_sizes=lambda: (dict(sizes), 3.0))
    metrics.accepted(5)
    metrics.delivered("failed", 554)
    base = serve(make_http(lambda: {"queue_writable": True}, metrics))
    code, content_type, body = await fetch(http, base + "/metrics")
    assert code == 200
    assert content_type == prometheus_client.CONTENT_TYPE_LATEST
    got = samples(body.decode())
    assert got[("twistmail_relay_messages_accepted_total", ())] == 5
    key = ("twistmail_relay_deliveries_total", (("code", "5xx"), ("result", "failed")))
    assert got[key] == 1
    assert got[("twistmail_relay_queue_messages", (("state", "queued"),))] == 5
    sizes["queued"] = 2  # read again at each scrape
    _, _, body = await fetch(http, base + "/metrics")
    assert samples(body.decode())[("twistmail_relay_queue_messages", (("state", "queued"),))] == 2


@pytest_twisted.ensureDeferred
async def test_other_methods_and_paths_are_refused(
    serve: Callable[[Any], str], http: HTTPClient
) -> None:
    base = serve(make_http(lambda: {"queue_writable": True}, RelayMetrics()))
    response = await http.post(base + "/healthz", data=b"x")
    await response.content()
    assert response.code == 405
    response = await http.get(base + "/admin")
    await response.content()
    assert response.code == 404
