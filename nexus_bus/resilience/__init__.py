"""Resilience state machines (pure, time injected): backoff and circuit breaker."""

from nexus_bus.resilience.backoff import ExponentialBackoff, Jitter
from nexus_bus.resilience.breaker import BreakerState, CircuitBreaker

__all__ = ["BreakerState", "CircuitBreaker", "ExponentialBackoff", "Jitter"]
