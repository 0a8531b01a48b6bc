"""Rate limits per token subject and op, and per token scope, enforced by real workers
through the GCRA script in real Redis; large limits leased in batches (docs/resilience.md)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from nexus_bus import Gateway, NexusError, Operations, RequestContext, Settings, Worker
from nexus_bus.config import RedisSettings
from nexus_bus.embedded import ServerProcess, free_port
from nexus_bus.errors import RateLimited
from nexus_bus.policies.ratelimit import RateLimitExceeded, SharedRateLimiter
from nexus_bus.redis_client import RedisClient, create_redis
from nexus_bus.resilience.gcra import RateLimit
from nexus_bus.resilience.lease import LeasePlan
from tests.conftest import issue_test_token, make_settings

OP = "rlimit"
ops = Operations(OP, description="Rate limit probe.")


@ops.action("hit")
async def hit(req: dict[str, Any], ctx: RequestContext) -> dict[str, bool]:
    """Answer at once."""
    return {"ok": True}


async def statuses(gw: Gateway, n: int) -> list[str]:
    found = []
    for _ in range(n):
        try:
            await gw.request(OP, "hit", {})
            found.append("ok")
        except NexusError as exc:
            found.append(exc.code)
    return found


async def test_limits_are_per_subject_and_a_scope_limit_overrides_the_op_limit(
    nats_url: str, redis_url: str, uid: str
) -> None:
    config = {
        "ops": {f"{OP}.hit": {"rate_limit_per_s": 1, "rate_limit_burst": 3}},
        "scope_limits": {"tier:tiny": {"rate_limit_per_s": 0.5, "rate_limit_burst": 1}},
    }
    settings: Settings = make_settings(nats_url, redis_url, resilience=config)
    worker = Worker(settings, [ops])
    await worker.start()
    alice = issue_test_token(subject=f"alice-{uid}")
    bob = issue_test_token(subject=f"bob-{uid}")
    tiny = issue_test_token(("*", "tier:tiny"), subject=f"tiny-{uid}")
    gateways = [await Gateway.connect(settings, token=t) for t in (alice, bob, tiny)]
    try:
        assert await statuses(gateways[0], 4) == ["ok", "ok", "ok", "rate_limited"]
        assert await statuses(gateways[1], 3) == ["ok", "ok", "ok"]  # bob has his own
        assert await statuses(gateways[2], 2) == ["ok", "rate_limited"]  # the scope's burst
        with pytest.raises(RateLimited) as info:
            await gateways[0].request(OP, "hit", {})
        assert info.value.retry_after is not None and info.value.retry_after >= 1
    finally:
        for gw in gateways:
            await gw.close()
        await worker.drain(1)


@pytest.fixture
async def own_redis(local_redis: ServerProcess) -> AsyncIterator[RedisClient]:
    """A client of a Redis of this test's own: its command counts are the test's alone."""
    client = create_redis(RedisSettings(url=local_redis.url, socket_timeout_s=2.0))
    try:
        yield client
    finally:
        await client.aclose()


async def script_calls(redis: RedisClient) -> int:
    stats = await redis.info("commandstats")
    names = ("cmdstat_evalsha", "cmdstat_eval")
    return sum(int(stats.get(name, {}).get("calls", 0)) for name in names)


async def admit(limiter: SharedRateLimiter, limit: RateLimit, subject: str) -> bool:
    """What `Admission.admit` does: the lease first, then Redis; False when refused."""
    if limiter.take(limit, subject, OP, "hit"):
        return True
    try:
        await limiter.check(limit, subject, OP, "hit")
    except RateLimitExceeded:
        return False
    return True


async def test_a_large_limit_is_leased_and_concurrent_checks_share_a_reservation(
    own_redis: RedisClient, uid: str
) -> None:
    limiter = SharedRateLimiter(own_redis, timeout_s=2.0)
    limit = RateLimit.of(1_000_000, 0)
    before = await script_calls(own_redis)
    assert all([await admit(limiter, limit, f"seq-{uid}") for _ in range(2000)])
    sequential = await script_calls(own_redis) - before
    assert 1 <= sequential <= 100  # one call per request without leasing

    before = await script_calls(own_redis)
    checks = [limiter.check(limit, f"fan-{uid}", OP, "hit") for _ in range(50)]
    await asyncio.gather(*checks)  # all admitted, waiting for one reservation at a time
    assert await script_calls(own_redis) - before <= 25


async def test_leased_limits_hold_across_two_workers_within_their_bound(
    own_redis: RedisClient, uid: str
) -> None:
    workers = [SharedRateLimiter(own_redis, timeout_s=2.0) for _ in range(2)]
    limit = RateLimit.of(500, 0)  # burst 500, leased 50 at most, held 0.1 s at most
    plan = LeasePlan.of(limit)
    assert plan.batch_max == 50
    started = time.monotonic()
    outcomes = [await admit(workers[i % 2], limit, f"s-{uid}") for i in range(1500)]
    elapsed = time.monotonic() - started
    admitted = sum(outcomes)
    assert admitted <= limit.burst + limit.rate * (elapsed + plan.hold_s) + 1
    assert admitted >= limit.burst - 2 * plan.batch_max  # leases strand little
    assert admitted < len(outcomes)  # the rest were refused
    with pytest.raises(RateLimitExceeded) as refused:
        for _ in range(100):
            await workers[0].check(limit, f"s-{uid}", OP, "hit")
    assert refused.value.headers["RateLimit-Policy"] == f'"{OP}.hit";q=500;w=1'
    assert refused.value.headers["RateLimit"].startswith(f'"{OP}.hit";r=0;t=')


async def test_leased_limits_fail_open_for_every_waiter_when_redis_is_unreachable(
    uid: str,
) -> None:
    dead = create_redis(RedisSettings(url=f"redis://127.0.0.1:{free_port()}/0"))
    try:
        limiter = SharedRateLimiter(dead, timeout_s=0.5)
        limit = RateLimit.of(1_000_000, 0)
        await asyncio.gather(*(limiter.check(limit, f"s-{uid}", OP, "hit") for _ in range(20)))
        assert limiter.health.failing
        assert not limiter.take(limit, f"s-{uid}", OP, "hit")  # nothing was leased
    finally:
        await dead.aclose()
