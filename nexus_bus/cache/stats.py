"""Counting cache reads: `nexus_cache_requests_total{cache,result}` and `nexus_cache_hit_ratio`."""

from __future__ import annotations

from collections import Counter
from enum import StrEnum

from prometheus_client import Counter as MetricCounter
from prometheus_client import Gauge

from nexus_bus.observability import METRICS, Metrics


class CacheResult(StrEnum):
    """How a cache read was answered (the `result` label)."""

    HIT = "hit"  # a fresh entry
    STALE = "stale"  # an entry past its TTL, inside the stale window, while one worker reloads
    COALESCED = "coalesced"  # waited for another worker's load, then a hit
    MISS = "miss"  # loaded from the system of record by this request
    BYPASS = "bypass"  # the cache was unavailable (or distrusted): straight to the record


_FROM_CACHE = frozenset({CacheResult.HIT, CacheResult.STALE, CacheResult.COALESCED})


class CacheStats:
    """Per-cache counts of read results, mirrored into Prometheus.

    Args:
        metrics: the metric families to update (the process's `METRICS` by default).
    """

    def __init__(self, metrics: Metrics = METRICS) -> None:
        self._metrics = metrics
        self._counts: dict[str, Counter[CacheResult]] = {}
        # Labelled children, looked up once: `labels()` takes a lock on every call, and
        # counting sits on the cache's hot path (an L1 hit costs little else). The ratio
        # gauge is computed when scraped, not on every read.
        self._requests: dict[tuple[str, CacheResult], MetricCounter] = {}
        self._ratios: dict[str, Gauge] = {}

    def count(self, cache: str, result: CacheResult) -> None:
        """Record one read of `cache` answered as `result`."""
        child = self._requests.get((cache, result))
        if child is None:
            child = self._add(cache, result)
        self._counts[cache][result] += 1
        child.inc()

    def _add(self, cache: str, result: CacheResult) -> MetricCounter:
        if cache not in self._counts:
            self._counts[cache] = Counter()
            ratio = self._ratios[cache] = self._metrics.cache_hit_ratio.labels(cache)
            ratio.set_function(lambda: self.hit_ratio(cache))
        child = self._requests[(cache, result)] = self._metrics.cache_requests.labels(
            cache, result.value
        )
        return child

    def counts(self, cache: str) -> dict[CacheResult, int]:
        """The reads of `cache` so far, by result."""
        return dict(self._counts.get(cache, {}))

    def hit_ratio(self, cache: str) -> float:
        """Reads answered from the cache over all reads of `cache` (0 before any read)."""
        counts = self._counts.get(cache)
        total = sum(counts.values()) if counts else 0
        if not counts or not total:
            return 0.0
        return sum(counts[r] for r in _FROM_CACHE) / total
