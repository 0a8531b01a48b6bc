"""Prometheus metrics, created once per process on one registry.

Labels stay low-cardinality: op, action, status, transport, code, cache, result — never keys,
request ids or subjects with user data.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString

from nexus_bus.constants import (
    M_CACHE_HIT_RATIO,
    M_CACHE_REQUESTS,
    M_CIRCUIT_REJECTED,
    M_CIRCUIT_STATE,
    M_ERRORS,
    M_EXPIRED,
    M_IDEMPOTENT_REPLAYS,
    M_INFLIGHT,
    M_NATS_RECONNECTS,
    M_RATE_LIMITED,
    M_REQUEST_DURATION,
    M_RETRIES,
    M_RETRY_BUDGET_EXHAUSTED,
    M_SHARED_STATE_FAILURES,
    M_SPEEDUPS_UNAVAILABLE,
    M_STALE_ANSWERS,
    M_TRACE_SPANS_DROPPED,
    UNKNOWN_LABEL,
)
from nexus_bus.errors import NexusError

# Codes no error class of this process declares (read from a reply body: a responder's, or
# one a handler passes on) become labels as they come, up to this many; later ones count as
# UNKNOWN_LABEL, since every distinct text would otherwise be a series for good.
MAX_ERROR_CODES: Final = 128
_ERROR_CODE = re.compile(r"[a-z][a-z0-9_]{0,63}")

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class RequestDurations(Collector):
    """A histogram exposed exactly as prometheus-client's `Histogram` (without `_created`),
    for the one metric recorded on every request.

    `Histogram.labels(...).observe()` takes two locks and walks the buckets in Python: 0.86
    µs a request on each side of the bus. Here one lock guards a list of counts indexed by
    `bisect`: 0.36 µs. Collection (at scrape time) adds the counts up into cumulative
    buckets as prometheus-client does.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._bounds = tuple(float(b) for b in buckets)
        les = (*self._bounds, float("inf"))
        self._les: list[str] = [floatToGoString(b) for b in les]  # type: ignore[no-untyped-call]
        # Label values -> counts per bucket (the last one past every bound) and their sum.
        self._series: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}
        # Label values -> the latest traced observation per bucket (OpenMetrics exemplars),
        # as (trace id, value, time): an `Exemplar` is made only when scraped, since all but
        # the last of a bucket's between two scrapes are never read.
        self._exemplars: dict[tuple[str, ...], list[tuple[str, float, float] | None]] = {}
        self._lock = threading.Lock()
        registry.register(self)

    def observe(
        self, labelvalues: tuple[str, ...], amount: float, trace_id: str | None = None
    ) -> None:
        """Record one observation for the series with these label values; with `trace_id`
        (tracing on) it becomes its bucket's exemplar, linking the histogram to a trace."""
        series = self._series.get(labelvalues)
        if series is None:
            series = self._series.setdefault(labelvalues, ([0] * len(self._les), [0.0]))
        counts, total = series
        index = bisect_left(self._bounds, amount)  # the first bound >= amount, as `le` means
        with self._lock:
            counts[index] += 1
            total[0] += amount
        if trace_id is not None:
            exemplars = self._exemplars.get(labelvalues)
            if exemplars is None:
                exemplars = self._exemplars.setdefault(labelvalues, [None] * len(self._les))
            exemplars[index] = (trace_id, amount, time.time())

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)
        with self._lock:
            snapshot = [(k, list(c), t[0]) for k, (c, t) in self._series.items()]
        for labelvalues, counts, total in snapshot:
            exemplars = self._exemplars.get(labelvalues) or [None] * len(self._les)
            cumulative = 0
            buckets: list[Sequence[Any]] = []
            for le, count, exemplar in zip(self._les, counts, exemplars, strict=True):
                cumulative += count
                if exemplar is None:
                    buckets.append((le, float(cumulative)))
                else:
                    trace_id, value, when = exemplar
                    linked = Exemplar({"trace_id": trace_id}, value, when)
                    buckets.append((le, float(cumulative), linked))
            family.add_metric(list(labelvalues), buckets, total)  # type: ignore[arg-type]
        yield family


@dataclass
class Metrics:
    """The process's metric families; `METRICS` is the shared instance."""

    registry: CollectorRegistry = field(
        default_factory=lambda: CollectorRegistry(auto_describe=True)
    )

    def __post_init__(self) -> None:
        r = self.registry
        self._durations: dict[tuple[str, str, int, str], tuple[str, str, str, str]] = {}
        self._error_codes: set[str] = set()
        self.request_duration = RequestDurations(
            M_REQUEST_DURATION,
            "Time to answer a request, by operation, status and transport.",
            ("op", "action", "status", "transport"),
            buckets=_BUCKETS,
            registry=r,
        )
        self.errors = Counter(
            M_ERRORS, "Error replies, by operation and stable code.", ("op", "code"), registry=r
        )
        self.inflight = Gauge(
            M_INFLIGHT, "Requests being handled now.", ("transport",), registry=r
        )
        self.expired = Counter(
            M_EXPIRED, "Requests dropped because their deadline had passed.", ("op",), registry=r
        )
        self.nats_reconnects = Counter(
            M_NATS_RECONNECTS, "NATS reconnections.", registry=r
        )
        self.speedups_unavailable = Counter(
            M_SPEEDUPS_UNAVAILABLE,
            "Connections on which NEXUS_NATS__SPEEDUPS was on but could not be installed.",
            registry=r,
        )
        self.cache_requests = Counter(
            M_CACHE_REQUESTS,
            "Cache reads by cache and result (hit, stale, coalesced, miss, bypass).",
            ("cache", "result"),
            registry=r,
        )
        self.cache_hit_ratio = Gauge(
            M_CACHE_HIT_RATIO,
            "Share of cache reads answered from the cache since the process started.",
            ("cache",),
            registry=r,
        )
        self.circuit_state = Gauge(
            M_CIRCUIT_STATE, "Circuit breaker state: 0 closed, 1 half-open, 2 open.", ("name",),
            registry=r,
        )

        # Resilience on the request path (docs/resilience.md).
        self.retries = Counter(
            M_RETRIES, "Attempts sent again, by operation and the failure retried.",
            ("op", "action", "reason"), registry=r,
        )
        self.retry_budget_exhausted = Counter(
            M_RETRY_BUDGET_EXHAUSTED, "Retries not sent because the retry budget was spent.",
            ("op", "action"), registry=r,
        )
        self.circuit_rejected = Counter(
            M_CIRCUIT_REJECTED, "Calls refused at once by an open circuit breaker.", ("op",),
            registry=r,
        )
        self.stale_answers = Counter(
            M_STALE_ANSWERS, "Answers served stale from the cache because the operation failed.",
            ("op", "action"), registry=r,
        )
        self.shared_state_failures = Counter(
            M_SHARED_STATE_FAILURES,
            "Calls to the shared resilience store (Redis) that failed; each replica then acts "
            "on its own state.",
            ("store",), registry=r,
        )
        self.idempotent_replays = Counter(
            M_IDEMPOTENT_REPLAYS, "Requests answered with the replayed first reply of their key.",
            ("op",), registry=r,
        )
        self.rate_limited = Counter(
            M_RATE_LIMITED, "Requests refused by a rate limit.", ("op",), registry=r,
        )
        self.trace_spans_dropped = Counter(
            M_TRACE_SPANS_DROPPED,
            "Spans not exported: the queue was full, or the collector refused their batch or "
            "could not be reached in time (docs/observability.md).",
            registry=r,
        )

    def observe(
        self,
        op: str,
        action: str,
        status: int,
        transport: str,
        seconds: float,
        trace_id: str | None = None,
    ) -> None:
        """Record one answered request (with its trace id as exemplar when tracing)."""
        key = (op, action, status, transport)
        labels = self._durations.get(key)
        if labels is None:
            # The label set is small and bounded (registered ops x statuses x transports).
            labels = self._durations[key] = (op, action, str(status), transport)
        self.request_duration.observe(labels, seconds, trace_id)

    def count_error(self, op: str, code: str) -> None:
        """Record one error reply, under its code if an error class declares it, or if it
        has a code's shape (snake_case, at most 64 characters) and is one of the first
        `MAX_ERROR_CODES` others seen."""
        if code not in self._error_codes:
            if code in _declared_codes(NexusError):
                self._error_codes.add(code)
            elif len(self._error_codes) >= MAX_ERROR_CODES or not _ERROR_CODE.fullmatch(code):
                code = UNKNOWN_LABEL
            else:
                self._error_codes.add(code)
        self.errors.labels(op, code).inc()

    def forget(self, metric: Counter | Gauge, *labels: str) -> None:
        """Drop one label set of `metric` (a name no longer tracked), if it has one: the
        series of names dropped from a bounded table would otherwise pile up."""
        with contextlib.suppress(KeyError):  # older prometheus-client: a label set never used
            metric.remove(*labels)


def _declared_codes(cls: type[NexusError]) -> set[str]:
    """The codes `cls` and its subclasses declare (nexus-bus's and handlers' own errors)."""
    codes = {cls.code}
    for sub in cls.__subclasses__():
        codes |= _declared_codes(sub)
    return codes


METRICS = Metrics(REGISTRY)
