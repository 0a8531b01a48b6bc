"""Rate limits per token subject and operation, shared by every worker: one GCRA script.

Enforced by workers, after authentication (the subject is known only then, and NATS callers
never pass a shim). A request over the limit gets `429 rate_limited` with `Retry-After`,
`RateLimit-Policy` and `RateLimit`; the shim passes those on. With Redis unreachable the
limit fails open (counted in `nexus_shared_state_failures_total{store="rate_limits"}`,
logged once per outage): a limit protects capacity and is not worth an outage.

Far from the limit, a worker does not ask Redis per request: it reserves a batch of tokens
in one script call and hands them out itself (`resilience.lease`: at most a tenth of a burst
extra in any window, never more in the long run; small limits are not leased, so every
request asks Redis). `take` is that local path, and reserves the next batch in the
background when the current one runs low; `check` asks Redis, one call at a time per
(subject, op, action) and worker when leasing, the others waiting for its answer.

The per-process `auth.limiter.FailureLimiter` stays what it is: it counts failed
authentications per client address *before* any verification work, so it must not cost a
round trip; this limiter counts admitted requests per subject, after it.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Any, Final

from nexus_bus.constants import H_RATELIMIT, H_RATELIMIT_POLICY, RATELIMIT_KEY_PREFIX
from nexus_bus.errors import RateLimited
from nexus_bus.observability import METRICS
from nexus_bus.policies.shared import StoreHealth
from nexus_bus.redis_client import RedisClient
from nexus_bus.resilience.gcra import GCRA_LUA, Decision, RateLimit
from nexus_bus.resilience.idempotency import record_name
from nexus_bus.resilience.lease import MAX_HOLD_S, QuotaLease

_ANY_KEY: Final = "-"
# Subjects are unbounded: past this many leases, idle ones are dropped (and, if none is,
# new subjects get no lease: every request of theirs asks Redis).
MAX_LEASES: Final = 10_000
# What a reservation's waiters learn when it ended without an answer (cancelled): try again.
_AGAIN: Final = Decision(True, 0, 0.0, 0.0, 0.0, 0)

LeaseKey = tuple[str | None, str, str]


class RateLimitExceeded(RateLimited):
    """`RateLimited` with the draft `RateLimit` headers of the decision."""

    def __init__(self, detail: str, *, retry_after: float, headers: dict[str, str]) -> None:
        super().__init__(detail, retry_after=retry_after)
        self.headers = headers


class SharedRateLimiter:
    """GCRA limits in Redis, keyed by (subject, op, action), leased in batches.

    Args:
        redis: the shared store.
        timeout_s: the most a check may add to a request before it fails open.
        clock: monotonic seconds (lease expiry).
    """

    def __init__(
        self,
        redis: RedisClient,
        *,
        timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._script = redis.register_script(GCRA_LUA)
        self._timeout_s = timeout_s
        self._clock = clock
        self._leases: dict[LeaseKey, QuotaLease] = {}
        self._pending: dict[LeaseKey, asyncio.Future[Decision | None]] = {}
        self._pruned_at = -math.inf
        self._refills: set[asyncio.Task[None]] = set()  # reservations ahead, referenced
        self.health = StoreHealth("rate_limits")

    def take(self, limit: RateLimit, subject: str | None, op: str, action: str) -> bool:
        """Admit one request from this worker's lease, without Redis; False: call `check`.

        A lease running low starts reserving its next batch in the background here.
        """
        key = (subject, op, action)
        lease = self._leases.get(key)
        if lease is None or lease.limit is not limit or not lease.take(self._clock()):
            return False
        if lease.low and key not in self._pending:
            self._reserve_ahead(key, lease)
        return True

    async def check(self, limit: RateLimit, subject: str | None, op: str, action: str) -> None:
        """Admit one request, or refuse it.

        Raises:
            RateLimitExceeded: over the limit (429), with its headers.
        """
        key = (subject, op, action)
        lease = self._lease(key, limit)
        while not lease.take(self._clock()):
            pending = self._pending.get(key)
            if pending is None:
                await self._reserve(key, lease, op, action)
                return
            # Another request of this worker is asking Redis for the same limit: its answer
            # serves this one too (a refusal applies to both; tokens it got may be left).
            outcome = await asyncio.shield(pending)
            if outcome is None:
                return  # failed open
            if not outcome.allowed:
                raise _exceeded(limit, op, action, outcome)

    def _lease(self, key: LeaseKey, limit: RateLimit) -> QuotaLease:
        lease = self._leases.get(key)
        if lease is not None and lease.limit is limit:
            return lease
        lease = QuotaLease(limit, record_name(RATELIMIT_KEY_PREFIX, *key, _ANY_KEY))
        now = self._clock()
        if len(self._leases) >= MAX_LEASES and now - self._pruned_at >= MAX_HOLD_S:
            self._pruned_at = now  # a scan at most per hold time, however many subjects come
            self._leases = {
                k: found for k, found in self._leases.items()
                if not found.idle(now) or k in self._pending
            }
        if len(self._leases) < MAX_LEASES:
            self._leases[key] = lease
        return lease

    async def _reserve(self, key: LeaseKey, lease: QuotaLease, op: str, action: str) -> None:
        """Ask Redis for up to `lease.want()` tokens; one is this request's.

        Raises:
            RateLimitExceeded: none fits (429).
        """
        leased = lease.plan.batch_max > 1
        done: asyncio.Future[Decision | None] | None = None
        if leased:  # unleased limits keep one call per request, concurrent as before
            done = self._pending[key] = asyncio.get_running_loop().create_future()
        outcome: Decision | None = _AGAIN
        try:
            outcome = await self._call(lease)
        finally:
            if done is not None:
                del self._pending[key]
                done.set_result(outcome)
        if outcome is not None and not outcome.allowed:
            raise _exceeded(lease.limit, op, action, outcome)

    def _reserve_ahead(self, key: LeaseKey, lease: QuotaLease) -> None:
        """Reserve `lease`'s next batch in a task of its own; requests finding the lease
        empty meanwhile wait for it, as for any reservation in flight."""
        lease.refilling()
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Decision | None] = loop.create_future()
        self._pending[key] = done
        task = loop.create_task(self._refill(key, lease, done))
        self._refills.add(task)
        task.add_done_callback(self._refills.discard)

    async def _refill(
        self, key: LeaseKey, lease: QuotaLease, done: asyncio.Future[Decision | None]
    ) -> None:
        outcome: Decision | None = _AGAIN
        try:
            # Refused: nothing to do; the request that finds the lease empty gets its 429.
            outcome = await self._call(lease, spend=False)
        finally:
            del self._pending[key]
            done.set_result(outcome)

    async def _call(self, lease: QuotaLease, *, spend: bool = True) -> Decision | None:
        """One script call: the decision (tokens granted go into `lease`), None: failed open."""
        started = self._clock()
        limit = lease.limit
        args = [limit.interval_ms, limit.burst, lease.want(started)]
        try:
            async with asyncio.timeout(self._timeout_s):
                raw: Any = await self._script(keys=[lease.name], args=args)
        except Exception as exc:  # every redis-py failure: fail open, counted
            self.health.failed(exc)
            return None
        self.health.succeeded()
        granted = int(raw[0])
        decision = Decision(granted > 0, int(raw[1]), float(raw[2]), float(raw[3]), 0.0, granted)
        if granted:
            lease.granted(granted, started, spend=spend)
        return decision


def _exceeded(limit: RateLimit, op: str, action: str, decision: Decision) -> RateLimitExceeded:
    """The 429 of a refused request, with the draft headers."""
    METRICS.rate_limited.labels(op).inc()
    policy_name = f"{op}.{action}"
    return RateLimitExceeded(
        f"rate limit of {limit.rate:g}/s for {policy_name} exceeded",
        retry_after=max(1, math.ceil(decision.retry_after_ms / 1000)),
        headers={
            H_RATELIMIT_POLICY: limit.policy_header(policy_name),
            H_RATELIMIT: decision.header(policy_name),
        },
    )
