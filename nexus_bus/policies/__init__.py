"""The policy layer on the request path: breakers, retries, stale fallback, shared state.

Pure state machines live in `nexus_bus.resilience`; this package holds the adapters that put
them on the request path (`guard`), share their state through Redis (`shared`), answer from
the cache on failure (`fallback`), and the worker-side hooks (`ratelimit`, `idempotency`).
"""

from nexus_bus.policies.layer import PolicyLayer, create_policy_layer

__all__ = ["PolicyLayer", "create_policy_layer"]
