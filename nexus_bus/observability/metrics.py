"""Prometheus metrics, created once per process on one registry.

Labels stay low-cardinality: op, action, status, transport, code, cache, result — never keys,
request ids or subjects with user data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from nexus_bus.constants import (
    M_CACHE_HIT_RATIO,
    M_CACHE_REQUESTS,
    M_CIRCUIT_STATE,
    M_ERRORS,
    M_EXPIRED,
    M_INFLIGHT,
    M_NATS_RECONNECTS,
    M_REQUEST_DURATION,
)

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


@dataclass
class Metrics:
    """The process's metric families; `METRICS` is the shared instance."""

    registry: CollectorRegistry = field(
        default_factory=lambda: CollectorRegistry(auto_describe=True)
    )

    def __post_init__(self) -> None:
        r = self.registry
        self._durations: dict[tuple[str, str, int, str], Any] = {}
        self.request_duration = Histogram(
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

    def observe(self, op: str, action: str, status: int, transport: str, seconds: float) -> None:
        """Record one answered request."""
        key = (op, action, status, transport)
        child = self._durations.get(key)
        if child is None:
            # labels() costs microseconds a call on the hot path; the label set is small and
            # bounded (registered ops x statuses x transports), so children are kept.
            child = self.request_duration.labels(op, action, str(status), transport)
            self._durations[key] = child
        child.observe(seconds)

    def count_error(self, op: str, code: str) -> None:
        """Record one error reply."""
        self.errors.labels(op, code).inc()


METRICS = Metrics(REGISTRY)
