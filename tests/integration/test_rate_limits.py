"""Rate limits per token subject and op, and per token scope, enforced by real workers
through the GCRA script in real Redis."""

from __future__ import annotations

from typing import Any

import pytest

from nexus_bus import Gateway, NexusError, Operations, RequestContext, Settings, Worker
from nexus_bus.errors import RateLimited
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
