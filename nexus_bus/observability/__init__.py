"""Logging and metrics, configured once per process."""

from nexus_bus.observability.logging import (
    bind_request,
    configure_logging,
    log_context,
    logger,
    release,
)
from nexus_bus.observability.metrics import METRICS, Metrics

__all__ = [
    "METRICS",
    "Metrics",
    "bind_request",
    "configure_logging",
    "log_context",
    "logger",
    "release",
]
