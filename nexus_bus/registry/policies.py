"""Resolved policies as the operation listing shows them, split by who applies them. Pure.

A call's policy is applied in two places (docs/resilience.md), and the listing says so:

- the **gateway** the caller goes through (the HTTP shim, or a Python `Gateway`) applies the
  timeout, retries, retry budget, breaker and stale-if-error fallback from *its own*
  settings. The listing's `gateway` half is therefore the answering process's: `GET /v1/ops`
  shows the shim's, which is exactly what a caller through that shim gets; `nexus-bus ops`
  shows what a `Gateway` built from the CLI's settings (`nexus-bus call`) would apply.
- the **workers** enforce rate limits and idempotency keys from *their* settings. Each worker
  declares that half in its registry entry, so the listing shows what the serving workers
  really enforce, not what the answering process would configure.
"""

from __future__ import annotations

from collections.abc import Callable

from nexus_bus.resilience.gcra import RateLimit
from nexus_bus.resilience.policy import PolicyTable, ResilienceSettings
from nexus_bus.schemas.registry import GatewayPolicy, WorkerPolicy

PolicyOf = Callable[[str, str], GatewayPolicy | None]
DeclaredPolicyOf = Callable[[str, str], WorkerPolicy]


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def gateway_policy(table: PolicyTable, op: str, action: str) -> GatewayPolicy:
    """What a gateway with `table` applies to calls of `op.action`."""
    policy = table.get(op, action)
    breaker = table.get(op, "")  # the breaker belongs to the op (docs/resilience.md)
    return GatewayPolicy(
        timeout_ms=_ms(policy.timeout_s),
        attempt_timeout_ms=_ms(policy.attempt_timeout_s),
        attempts=policy.attempts,
        backoff_base_ms=_ms(policy.backoff_base_s),
        backoff_max_ms=_ms(policy.backoff_max_s),
        backoff_factor=policy.backoff_factor,
        retry_budget_ratio=policy.retry_budget_ratio,
        retry_budget_min_per_s=policy.retry_budget_min_per_s,
        idempotent=policy.idempotent,
        breaker_failures=breaker.breaker_failures,
        breaker_reset_ms=_ms(breaker.breaker_reset_s),
        breaker_reset_max_ms=_ms(breaker.breaker_reset_max_s),
        cacheable=policy.cacheable,
        stale_if_error_s=policy.stale_if_error_s,
    )


def gateway_policies(settings: ResilienceSettings) -> PolicyOf:
    """`gateway_policy` for every op.action under `settings` (None for all when disabled)."""
    if not settings.enabled:
        return lambda _op, _action: None
    table = PolicyTable.from_settings(settings)
    return lambda op, action: gateway_policy(table, op, action)


def worker_policies(settings: ResilienceSettings) -> DeclaredPolicyOf:
    """What a worker with `settings` enforces on each op.action (its registry declaration)."""
    table = PolicyTable.from_settings(settings)

    def of(op: str, action: str) -> WorkerPolicy:
        if not settings.enabled:
            return WorkerPolicy(
                enabled=False,
                rate_limit_per_s=0.0,
                rate_limit_burst=0,
                idempotency_retention_s=0.0,
                idempotency_lease_ms=0,
            )
        policy = table.get(op, action)
        limited = policy.rate_limit_per_s > 0
        limit = RateLimit.of(policy.rate_limit_per_s, policy.rate_limit_burst) if limited else None
        return WorkerPolicy(
            enabled=True,
            rate_limit_per_s=policy.rate_limit_per_s,
            rate_limit_burst=limit.burst if limit is not None else 0,
            idempotency_retention_s=settings.idempotency_retention_s,
            idempotency_lease_ms=settings.idempotency_lease_ms,
        )

    return of
