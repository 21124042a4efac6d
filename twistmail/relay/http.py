"""The relay's HTTP listener: ``GET /healthz`` and ``GET /metrics`` (a Klein app).

``/healthz`` answers JSON: the relay's health dict plus ``"status"``. It is 503 only when the
health says the queue cannot be written (``"queue_writable": false``): an unreachable or
refusing upstream is what the queue is for, so it is 200 with the upstream's state shown, and a
probe does not restart the relay during an outage. A health callable that fails gives 500.

``/metrics`` answers the relay's metrics in Prometheus text format, the queue sizes read just
before (see :class:`~twistmail.relay.metrics.RelayMetrics`).

Serve it with ``twisted.web.server.Site(make_http(...).resource())``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from klein import Klein
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from .metrics import CONTENT_TYPE, RelayMetrics

__all__ = ["Health", "make_http"]

log = Logger()

Health = Callable[[], "defer.Deferred[Mapping[str, Any]] | Mapping[str, Any]"]
"""What ``/healthz`` calls: a dict (or a Deferred of one) with at least ``queue_writable``
(bool), and whatever else the relay reports (worker running, upstream state, ...)."""


def make_http(health: Health, metrics: RelayMetrics) -> Klein:
    """The Klein app serving ``/healthz`` from ``health()`` and ``/metrics`` from ``metrics``."""
    app = Klein()

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

    @app.route("/metrics", methods=["GET"])
    def metrics_page(request: IRequest) -> defer.Deferred[bytes]:
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"Content-Type", CONTENT_TYPE.encode("ascii"))
        return metrics.refresh().addCallback(lambda _: metrics.render())

    return app
