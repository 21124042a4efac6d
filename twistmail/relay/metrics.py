"""The relay's Prometheus metrics, in a registry of their own (never the process-global one).

The relay calls :class:`RelayMetrics`' methods as things happen; ``GET /metrics``
(:mod:`twistmail.relay.http`) calls :meth:`RelayMetrics.refresh` then
:meth:`RelayMetrics.render`. Series (all prefixed ``twistmail_relay_``):

``messages_accepted_total``           messages committed to the queue (each got a 250)
``deliveries_total{result,code}``     delivery attempts by result (``sent``, ``deferred``,
                                      ``failed``) and reply class (``2xx``, ``4xx``, ``5xx``,
                                      ``none`` for a drop, timeout or local refusal)
``queue_messages{state}``             messages in the queue by state, as last read
``oldest_queued_age_seconds``         age of the oldest message waiting (0 when none waits)
``delivery_latency_seconds``          histogram: acceptance to delivery of each sent message
``smtp_sessions``                     SMTP sessions open now
``bounces_total{kind}``               bounces taken at ``--bounce-domain``, per reported
                                      recipient: ``hard``, ``soft``, ``complaint``, ``other``,
                                      ``unmatched``; ``not_report`` for mail that was none
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..queue.records import MESSAGE_STATES

__all__ = [
    "BOUNCE_KINDS",
    "CONTENT_TYPE",
    "DELIVERY_RESULTS",
    "LATENCY_BUCKETS",
    "QueueSizes",
    "RelayMetrics",
]

log = Logger()

CONTENT_TYPE: Final = CONTENT_TYPE_LATEST
"""The Content-Type of :meth:`RelayMetrics.render`'s output."""

DELIVERY_RESULTS: Final = ("sent", "deferred", "failed")
BOUNCE_KINDS: Final = ("hard", "soft", "complaint", "other", "unmatched", "not_report")

LATENCY_BUCKETS: Final = (
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
    4 * 3600.0, 86400.0, 5 * 86400.0,
)  # fmt: skip
"""Seconds: a relay's latency spans a fast upstream (ms) to a retried message (days)."""

_USUAL_DELIVERIES: Final = (
    ("sent", "2xx"),
    ("deferred", "4xx"),
    ("deferred", "none"),
    ("failed", "5xx"),
    ("failed", "none"),
)

QueueSizes = tuple[Mapping[str, int], float | None]
"""Messages per state, and the oldest waiting message's age in seconds (None: none waits)."""


class _QueueCollector(Collector):
    """Yields the queue gauges from the values last set, at scrape time."""

    def __init__(self) -> None:
        self.sizes: dict[str, int] = dict.fromkeys(MESSAGE_STATES, 0)
        self.oldest_age = 0.0

    def collect(self) -> Iterator[Metric]:
        sizes = GaugeMetricFamily(
            "twistmail_relay_queue_messages", "Messages in the queue by state.", labels=["state"]
        )
        for state, count in sorted(self.sizes.items()):
            sizes.add_metric([state], count)
        yield sizes
        yield GaugeMetricFamily(
            "twistmail_relay_oldest_queued_age_seconds",
            "Age of the oldest message waiting for delivery (0 when none waits).",
            value=self.oldest_age,
        )


class RelayMetrics:
    """The relay's counters, gauges and latency histogram, rendered in Prometheus text format.

    ``queue_sizes`` (optional) is read by :meth:`refresh` before each scrape: it returns
    :data:`QueueSizes`, or a Deferred of them (e.g. from the queue's summary).
    """

    def __init__(
        self,
        queue_sizes: Callable[[], QueueSizes | defer.Deferred[QueueSizes]] | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._queue_sizes = queue_sizes
        self._accepted = Counter(
            "twistmail_relay_messages_accepted",
            "Messages accepted over SMTP and committed to the queue.",
            registry=self.registry,
        )
        self._deliveries = Counter(
            "twistmail_relay_deliveries",
            "Delivery attempts by result and reply code class.",
            ["result", "code"],
            registry=self.registry,
        )
        self._latency = Histogram(
            "twistmail_relay_delivery_latency_seconds",
            "Seconds from acceptance to delivery of each delivered message.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._sessions = Gauge(
            "twistmail_relay_smtp_sessions", "SMTP sessions open now.", registry=self.registry
        )
        self._bounces = Counter(
            "twistmail_relay_bounces",
            "Bounces taken at the bounce domain, per reported recipient, by kind.",
            ["kind"],
            registry=self.registry,
        )
        self._queue = _QueueCollector()
        self.registry.register(self._queue)
        for result, code in _USUAL_DELIVERIES:  # these series exist from the start, at 0
            self._deliveries.labels(result, code)

    def accepted(self, count: int = 1) -> None:
        """``count`` messages were committed to the queue."""
        self._accepted.inc(count)

    def delivered(self, result: str, code: int | None) -> None:
        """One delivery attempt ended with ``result`` and reply ``code`` (None: no reply).

        :raises ValueError: for a result other than ``sent``, ``deferred`` or ``failed``.
        """
        if result not in DELIVERY_RESULTS:
            raise ValueError(f"delivery result {result!r} is not one of {DELIVERY_RESULTS}")
        self._deliveries.labels(result, _code_class(code)).inc()

    def bounce(self, kind: str) -> None:
        """A bounce of ``kind`` (one of :data:`BOUNCE_KINDS`) was taken.

        :raises ValueError: for another kind.
        """
        if kind not in BOUNCE_KINDS:
            raise ValueError(f"bounce kind {kind!r} is not one of {BOUNCE_KINDS}")
        self._bounces.labels(kind).inc()

    def observe_latency(self, seconds: float) -> None:
        """A message was delivered ``seconds`` after it was accepted."""
        self._latency.observe(max(0.0, seconds))

    def session_opened(self) -> None:
        """An SMTP session began."""
        self._sessions.inc()

    def session_closed(self) -> None:
        """An SMTP session ended."""
        self._sessions.dec()

    def set_queue_sizes(self, sizes: Mapping[str, int], oldest_age: float | None = None) -> None:
        """The queue holds ``sizes[state]`` messages per state; the oldest waiting one is
        ``oldest_age`` seconds old (None: none waits). States not named count 0."""
        counts = dict.fromkeys(MESSAGE_STATES, 0)
        counts.update(sizes)
        self._queue.sizes = counts
        self._queue.oldest_age = 0.0 if oldest_age is None else max(0.0, oldest_age)

    def refresh(self) -> defer.Deferred[None]:
        """Read the queue sizes from ``queue_sizes`` (if given); a failure is logged and the
        last values stay."""
        if self._queue_sizes is None:
            return defer.succeed(None)

        def got(result: QueueSizes) -> None:
            self.set_queue_sizes(*result)

        def failed(failure: Failure) -> None:
            log.failure("reading the queue sizes for /metrics", failure)

        return defer.maybeDeferred(self._queue_sizes).addCallbacks(got, failed)

    def render(self) -> bytes:
        """Every metric in Prometheus text format (content type :data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry)


def _code_class(code: int | None) -> str:
    if code is None:
        return "none"
    if 200 <= code < 600:
        return f"{code // 100}xx"
    return "other"
