"""Job metrics, on the process's one registry. Labels: op and a low-cardinality outcome."""

from __future__ import annotations

from typing import Final

from prometheus_client import Counter

from nexus_bus.constants import M_JOBS_COMPLETED, M_JOBS_DEAD_LETTERED, M_JOBS_REDELIVERED
from nexus_bus.observability import METRICS

JOBS_REDELIVERED: Final = Counter(
    M_JOBS_REDELIVERED,
    "Job deliveries after the first (retries after nak, and redeliveries after ack timeouts).",
    ("op",),
    registry=METRICS.registry,
)
JOBS_DEAD_LETTERED: Final = Counter(
    M_JOBS_DEAD_LETTERED,
    "Jobs dead-lettered, by reason (failed: a permanent error not the client's; dead: out of"
    " attempts).",
    ("op", "reason"),
    registry=METRICS.registry,
)
JOBS_COMPLETED: Final = Counter(
    M_JOBS_COMPLETED,
    "Job attempts by outcome: succeeded, retry, rejected (a client error), failed, dead.",
    ("op", "outcome"),
    registry=METRICS.registry,
)
