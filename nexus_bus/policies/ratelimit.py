"""Rate limits per token subject and operation, shared by every worker: one GCRA script.

Enforced by workers, after authentication (the subject is known only then, and NATS callers
never pass a shim): a Redis round trip per request of an op with a limit, none for the
others. A request over the limit gets `429 rate_limited` with `Retry-After`,
`RateLimit-Policy` and `RateLimit`; the shim passes those on. With Redis unreachable the
limit fails open (counted in `nexus_shared_state_failures_total{store="rate_limits"}`,
logged once per outage): a limit protects capacity and is not worth an outage.

The per-process `auth.limiter.FailureLimiter` stays what it is: it counts failed
authentications per client address *before* any verification work, so it must not cost a
round trip; this limiter counts admitted requests per subject, after it.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any, Final

from nexus_bus.constants import H_RATELIMIT, H_RATELIMIT_POLICY, RATELIMIT_KEY_PREFIX
from nexus_bus.errors import RateLimited
from nexus_bus.observability import METRICS
from nexus_bus.policies.shared import StoreHealth
from nexus_bus.redis_client import RedisClient
from nexus_bus.resilience.gcra import GCRA_LUA, Decision, RateLimit
from nexus_bus.resilience.idempotency import record_name

_ANY_KEY: Final = "-"


class RateLimitExceeded(RateLimited):
    """`RateLimited` with the draft `RateLimit` headers of the decision."""

    def __init__(self, detail: str, *, retry_after: float, headers: dict[str, str]) -> None:
        super().__init__(detail, retry_after=retry_after)
        self.headers = headers


class SharedRateLimiter:
    """GCRA limits in Redis, keyed by (subject, op, action).

    Args:
        redis: the shared store.
        timeout_s: the most a check may add to a request before it fails open.
    """

    def __init__(self, redis: RedisClient, *, timeout_s: float) -> None:
        self._script = redis.register_script(GCRA_LUA)
        self._timeout_s = timeout_s
        self.health = StoreHealth("rate_limits")

    async def check(self, limit: RateLimit, subject: str | None, op: str, action: str) -> None:
        """Admit one request, or refuse it.

        Raises:
            RateLimitExceeded: over the limit (429), with its headers.
        """
        name = record_name(RATELIMIT_KEY_PREFIX, subject, op, action, _ANY_KEY)
        try:
            async with asyncio.timeout(self._timeout_s):
                raw: Any = await self._script(keys=[name], args=[limit.interval_ms, limit.burst])
        except Exception as exc:  # every redis-py failure: fail open, counted
            self.health.failed(exc)
            return
        self.health.succeeded()
        allowed, remaining = int(raw[0]), int(raw[1])
        if allowed:
            return
        retry_ms, reset_ms = float(raw[2]), float(raw[3])
        decision = Decision(False, remaining, retry_ms, reset_ms, 0.0)
        METRICS.rate_limited.labels(op).inc()
        policy_name = f"{op}.{action}"
        raise RateLimitExceeded(
            f"rate limit of {limit.rate:g}/s for {policy_name} exceeded",
            retry_after=max(1, math.ceil(retry_ms / 1000)),
            headers={
                H_RATELIMIT_POLICY: limit.policy_header(policy_name),
                H_RATELIMIT: decision.header(policy_name),
            },
        )
