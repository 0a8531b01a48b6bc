"""Logging and metrics, configured once per process."""

from nexus_bus.observability.logging import configure_logging, logger
from nexus_bus.observability.metrics import METRICS, Metrics

__all__ = ["METRICS", "Metrics", "configure_logging", "logger"]
