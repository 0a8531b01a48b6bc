"""Redis gone: rate limits fail open (counted), keyed requests are refused rather than run
twice, and both work again when Redis is back."""

from __future__ import annotations

import asyncio
from typing import Any

from prometheus_client import REGISTRY

from nexus_bus import Gateway, NexusError, Operations, RequestContext, Worker
from nexus_bus.embedded import ServerProcess
from tests.conftest import make_settings
from tests.integration.http_shim import poll_until

OP = "rdown"
ops = Operations(OP, description="Redis-down probe.")


@ops.action("hit")
async def hit(req: dict[str, Any], ctx: RequestContext) -> dict[str, bool]:
    """Answer at once."""
    return {"ok": True}


# The `hold` action's gates: the test opens `release` once it has restarted Redis.
holding = asyncio.Event()
release = asyncio.Event()


@ops.action("hold")
async def hold(req: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
    """Answer the request's body once the test releases it."""
    holding.set()
    await release.wait()
    return {"echo": req}


def failures(store: str) -> float:
    value = REGISTRY.get_sample_value("nexus_shared_state_failures_total", {"store": store})
    return value or 0.0


async def test_limits_fail_open_and_keys_fail_closed_while_redis_is_down(
    nats_url: str, local_redis: ServerProcess, admin_token: str | None, uid: str
) -> None:
    policy = {"ops": {f"{OP}.hit": {"rate_limit_per_s": 1, "rate_limit_burst": 1}}}
    settings = make_settings(nats_url, local_redis.url, resilience=policy)
    worker = Worker(settings, [ops])
    await worker.start()
    gw = await Gateway.connect(settings, token=admin_token)
    try:
        await gw.request(OP, "hit", {})
        try:
            await gw.request(OP, "hit", {})
        except NexusError as exc:
            assert exc.code == "rate_limited"
        else:
            raise AssertionError("the limit of 1/s let a second request through")

        local_redis.kill()
        before_limits, before_keys = failures("rate_limits"), failures("idempotency")
        for _ in range(3):  # over the limit, but the limit cannot be checked: fail open
            assert await gw.request(OP, "hit", {}) == {"ok": True}
        assert failures("rate_limits") >= before_limits + 3
        try:
            await gw.request(OP, "hit", {}, idempotency_key=f"k-{uid}", timeout=2)
        except NexusError as exc:
            assert exc.code == "unavailable"  # never run without its record
        else:
            raise AssertionError("a keyed request ran without the idempotency store")
        assert failures("idempotency") > before_keys

        local_redis.restart()

        async def keyed_works() -> bool:
            try:
                await gw.request(OP, "hit", {}, idempotency_key=f"k2-{uid}", timeout=1)
            except NexusError:
                return False
            return True

        await poll_until(keyed_works, 10)
    finally:
        await gw.close()
        await worker.drain(1)


async def test_a_keyed_request_replays_after_redis_restarted_while_it_ran(
    nats_url: str, local_redis: ServerProcess, admin_token: str | None, uid: str
) -> None:
    # Before: the reply was recorded into the restarted Redis without the request's
    # fingerprint (the claim holding it was lost), so every repeat of the same request got
    # 422 idempotency_mismatch for the whole retention. Seen in a chaos soak under load.
    settings = make_settings(nats_url, local_redis.url)
    worker = Worker(settings, [ops])
    await worker.start()
    gw = await Gateway.connect(settings, token=admin_token)
    holding.clear()
    release.clear()
    try:
        key = f"held-{uid}"
        first: asyncio.Task[object] = asyncio.create_task(
            gw.request(OP, "hold", {"n": 1}, idempotency_key=key, timeout=20)
        )
        await asyncio.wait_for(holding.wait(), 10)  # claimed in Redis; the handler runs
        local_redis.restart()  # empty: the claim is gone

        async def keyed_works() -> bool:
            try:
                await gw.request(OP, "hit", {}, idempotency_key=f"probe-{uid}", timeout=1)
            except NexusError:
                return False
            return True

        await poll_until(keyed_works, 10)  # the worker reaches the new Redis
        release.set()
        assert await first == {"echo": {"n": 1}}
        again: object = await gw.request(OP, "hold", {"n": 1}, idempotency_key=key, timeout=5)
        assert again == {"echo": {"n": 1}}  # the recorded reply
        try:
            await gw.request(OP, "hold", {"n": 2}, idempotency_key=key, timeout=5)
        except NexusError as exc:
            assert exc.code == "idempotency_mismatch"
        else:
            raise AssertionError("the key was accepted with another request")
    finally:
        release.set()
        await gw.close()
        await worker.drain(1)
