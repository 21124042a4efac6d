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

import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping
from typing import Final

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString
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

# The buckets' "le" labels as prometheus_client writes them, then +Inf.
_LATENCY_LE: Final[tuple[str, ...]] = tuple(
    floatToGoString(bound)  # type: ignore[no-untyped-call]
    for bound in (*LATENCY_BUCKETS, float("inf"))
)

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


class _Counts(Collector):
    """The relay's counters, latency histogram and sessions gauge, kept as plain numbers by the
    reactor's thread (a few per message) and turned into Prometheus series at scrape time:
    the text is what prometheus_client's Counter, Histogram and Gauge would render, without
    their lock and label lookup at every change."""

    def __init__(self) -> None:
        now = time.time()
        self.accepted = 0.0
        self.accepted_created = now
        # (result, code class) -> [count, created]; the usual ones exist from the start, at 0.
        self.deliveries: dict[tuple[str, str], list[float]] = {
            key: [0.0, now] for key in _USUAL_DELIVERIES
        }
        self.latency = [0] * (len(LATENCY_BUCKETS) + 1)  # per bucket; the last one is +Inf
        self.latency_sum = 0.0
        self.latency_created = now
        self.sessions = 0.0
        self.bounces: dict[str, list[float]] = {}  # kind -> [count, created]

    def collect(self) -> Iterator[Metric]:
        accepted = CounterMetricFamily(
            "twistmail_relay_messages_accepted",
            "Messages accepted over SMTP and committed to the queue.",
        )
        accepted.add_metric([], self.accepted, created=self.accepted_created)
        yield accepted
        deliveries = CounterMetricFamily(
            "twistmail_relay_deliveries",
            "Delivery attempts by result and reply code class.",
            labels=["result", "code"],
        )
        for (result, code), (count, created) in list(self.deliveries.items()):
            deliveries.add_metric([result, code], count, created=created)
        yield deliveries
        name = "twistmail_relay_delivery_latency_seconds"
        latency = HistogramMetricFamily(
            name, "Seconds from acceptance to delivery of each delivered message."
        )
        cumulative, buckets = 0, []
        for bound, count in zip(_LATENCY_LE, self.latency, strict=True):
            cumulative += count
            buckets.append((bound, float(cumulative)))
        latency.add_metric([], buckets, self.latency_sum)
        latency.samples.append(Sample(name + "_created", {}, self.latency_created))
        yield latency
        yield GaugeMetricFamily(
            "twistmail_relay_smtp_sessions", "SMTP sessions open now.", value=self.sessions
        )
        bounces = CounterMetricFamily(
            "twistmail_relay_bounces",
            "Bounces taken at the bounce domain, per reported recipient, by kind.",
            labels=["kind"],
        )
        for kind, (count, created) in list(self.bounces.items()):
            bounces.add_metric([kind], count, created=created)
        yield bounces


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
        self._counts = _Counts()
        self.registry.register(self._counts)
        self._queue = _QueueCollector()
        self.registry.register(self._queue)

    def accepted(self, count: int = 1) -> None:
        """``count`` messages were committed to the queue."""
        self._counts.accepted += count

    def delivered(self, result: str, code: int | None) -> None:
        """One delivery attempt ended with ``result`` and reply ``code`` (None: no reply).

        :raises ValueError: for a result other than ``sent``, ``deferred`` or ``failed``.
        """
        if result not in DELIVERY_RESULTS:
            raise ValueError(f"delivery result {result!r} is not one of {DELIVERY_RESULTS}")
        key = (result, _code_class(code))
        series = self._counts.deliveries.get(key)
        if series is None:
            series = self._counts.deliveries[key] = [0.0, time.time()]
        series[0] += 1

    def bounce(self, kind: str) -> None:
        """A bounce of ``kind`` (one of :data:`BOUNCE_KINDS`) was taken.

        :raises ValueError: for another kind.
        """
        if kind not in BOUNCE_KINDS:
            raise ValueError(f"bounce kind {kind!r} is not one of {BOUNCE_KINDS}")
        series = self._counts.bounces.get(kind)
        if series is None:
            series = self._counts.bounces[kind] = [0.0, time.time()]
        series[0] += 1

    def observe_latency(self, seconds: float) -> None:
        """A message was delivered ``seconds`` after it was accepted."""
        seconds = max(0.0, seconds)
        counts = self._counts
        counts.latency[bisect_left(LATENCY_BUCKETS, seconds)] += 1  # le: bound included
        counts.latency_sum += seconds

    def session_opened(self) -> None:
        """An SMTP session began."""
        self._counts.sessions += 1

    def session_closed(self) -> None:
        """An SMTP session ended."""
        self._counts.sessions -= 1

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
