"""All workers of an op gone: the breaker opens, fails fast, answers stale reads, recovers.

Real nats-server and redis-server of this test's own (the breaker state it shares through
Redis must not reach other tests), a real worker and a real HTTP shim.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import nats
import pytest
import redis.asyncio as aioredis
from nats.aio.msg import Msg

from nexus_bus import Gateway, Operations, RequestContext, Worker
from nexus_bus.constants import BREAKERS_KEY
from nexus_bus.embedded import ServerProcess
from nexus_bus.errors import CircuitOpen, NexusError
from nexus_bus.handlers import builtin_groups
from nexus_bus.policies import guard as guard_module
from nexus_bus.registry import register
from nexus_bus.resilience import BreakerState
from tests.conftest import issue_test_token, make_settings
from tests.integration.http_shim import bearer, poll_until, running_shim

# Open for 1.5 to 3 s (equal jitter): longer than the checks made while it is open, so no
# probe is due during them.
POLICY = {
    "defaults": {"breaker_failures": 3, "breaker_reset_ms": 3000, "breaker_reset_max_ms": 3000},
    "sync_interval_ms": 50,
}


async def test_breaker_opens_fails_fast_serves_stale_and_closes_after_one_probe(
    local_nats: ServerProcess, local_redis: ServerProcess, admin_token: str | None, uid: str
) -> None:
    settings = make_settings(local_nats.url, local_redis.url, resilience=POLICY)
    worker = Worker(settings, builtin_groups(["data"]))
    await worker.start()
    cached, uncached = f"brk.{uid}.cached", f"brk.{uid}.uncached"
    watcher = await nats.connect(local_nats.url)
    seen: list[str] = []
    gw = await Gateway.connect(settings, token=admin_token)
    # Reads through the gateway's policy layer: a shim answering them from the cache itself
    # would never need the stale answer this test asks for (docs/cache.md).
    async with running_shim(settings, cached_reads=False) as shim, httpx.AsyncClient(
        base_url=shim.url, headers=bearer(admin_token), timeout=10
    ) as c:
        try:
            assert (await c.post("/v1/data/put", json={"key": cached, "value": 7})).is_success
            assert (await c.post("/v1/data/get", json={"key": cached})).is_success  # cached
            await gw.request("data", "list", {})  # starts its policy layer (and shared state)
            await worker.drain(1)  # every worker of `data` is gone

            codes = []
            for _ in range(5):
                resp = await c.post("/v1/data/put", json={"key": uncached, "value": 1})
                codes.append(resp.json()["code"])
            assert "no_responders" in codes and codes[-1] == "circuit_open", codes

            # From here on nothing may be published for the op: watch everything under nexus.
            async def record(msg: Msg) -> None:
                seen.append(msg.subject)

            sub = await watcher.subscribe("nexus.>", cb=record)
            await watcher.flush()

            refused = await c.post("/v1/data/put", json={"key": uncached, "value": 1})
            assert refused.status_code == 503 and refused.json()["code"] == "circuit_open"
            assert int(refused.headers["retry-after"]) >= 1
            stale = await c.post("/v1/data/get", json={"key": cached})
            assert stale.status_code == 200, stale.text
            assert stale.json()["value"] == 7 and int(stale.headers["nexus-stale-age"]) >= 0
            # No worker checks tokens now: the shim does, before answering from the cache.
            async with httpx.AsyncClient(base_url=shim.url, timeout=10) as anonymous:
                denied = await anonymous.post("/v1/data/get", json={"key": cached})
                assert denied.status_code == 401, denied.text
                other = bearer(issue_test_token(("stream:read",)))
                denied = await anonymous.post(
                    "/v1/data/get", json={"key": cached}, headers=other
                )
                assert denied.status_code == 403, denied.text
            missing = await c.post("/v1/data/get", json={"key": uncached})
            assert missing.status_code == 503 and missing.json()["code"] == "circuit_open"

            # The Python gateway learned the open breaker through Redis, and fails fast too.
            await poll_until(_opened(gw), 1)
            times = []
            for _ in range(20):
                started = time.perf_counter()
                try:
                    await gw.request("data", "put", {"key": uncached, "value": 1})
                except CircuitOpen:
                    times.append(time.perf_counter() - started)
            assert len(times) == 20 and statistics.median(times) < 0.002, times

            await watcher.flush()
            await sub.unsubscribe()
            assert seen == [], seen  # nothing reached NATS while open

            # Workers back: one probe closes the breaker, then calls flow again.
            worker = Worker(settings, builtin_groups(["data"]))
            await worker.start()

            async def served() -> bool:
                resp = await c.post("/v1/data/put", json={"key": uncached, "value": 2})
                return resp.status_code == 200

            await poll_until(served, 10)
            assert shim.app._gateway is not None and shim.app._gateway.policies is not None
            assert shim.app._gateway.policies.guard.state("data") is BreakerState.CLOSED
            got = await c.post("/v1/data/get", json={"key": uncached})
            assert got.status_code == 200 and "nexus-stale-age" not in got.headers
        finally:
            await gw.close()
            await watcher.close()
            await worker.drain(1)


def _opened(gw: Gateway) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        assert gw.policies is not None
        return gw.policies.guard.state("data") is BreakerState.OPEN

    return check


async def test_each_replica_keeps_its_own_breaker_when_redis_is_down(
    local_nats: ServerProcess, local_redis: ServerProcess, admin_token: str | None
) -> None:
    settings = make_settings(local_nats.url, local_redis.url, resilience=POLICY)
    local_redis.kill()
    gw = await Gateway.connect(settings, token=admin_token)
    # `nobody` is declared (docs/registry.md) by a worker that has stopped: 503, not 404.
    nobody = Operations("nobody")

    @nobody.action("act")
    async def act(req: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
        return req

    declared = await register(gw.nc, settings, [nobody])
    assert declared is not None
    await declared.stop()
    try:
        for _ in range(3):  # no worker serves `nobody`: no responders, the breaker opens
            with contextlib.suppress(NexusError):
                await gw.request("nobody", "act", {}, timeout=1)
        assert gw.policies is not None
        assert gw.policies.guard.state("nobody") is BreakerState.OPEN
        try:
            await gw.request("nobody", "act", {}, timeout=1)
        except CircuitOpen:
            pass
        else:
            raise AssertionError("the breaker did not refuse")
        await asyncio.sleep(0.2)
        assert gw.policies.sync is not None and gw.policies.sync.health.failing
    finally:
        await gw.close()


async def test_an_anonymous_oversized_request_leaves_a_half_open_breaker_open_everywhere(
    local_nats: ServerProcess, local_redis: ServerProcess, admin_token: str | None, uid: str
) -> None:
    """A request the gateway refuses before publishing it is no outcome: taking the probe
    slot, it must neither close the breaker nor delete the shared entry."""
    policy = {
        "defaults": {"breaker_failures": 3, "breaker_reset_ms": 1000,
                     "breaker_reset_max_ms": 1000, "attempts": 1},
        "sync_interval_ms": 50,
    }
    settings = make_settings(local_nats.url, local_redis.url, resilience=policy)
    worker = Worker(settings, builtin_groups(["data"]))
    await worker.start()
    r = aioredis.from_url(local_redis.url)
    put = {"key": f"k{uid}", "value": 1}
    async with running_shim(settings) as shim, httpx.AsyncClient(
        base_url=shim.url, headers=bearer(admin_token), timeout=10
    ) as c, httpx.AsyncClient(base_url=shim.url, timeout=10) as anonymous:
        try:
            assert (await c.post("/v1/data/put", json=put)).is_success
            await worker.drain(1)  # every data worker gone
            for _ in range(3):
                assert (await c.post("/v1/data/put", json=put)).json()["code"] == "no_responders"
            assert (await c.post("/v1/data/put", json=put)).json()["code"] == "circuit_open"

            async def shared() -> bool:
                return bool(await r.hexists(BREAKERS_KEY, "data"))

            await poll_until(shared, 2)  # the other replicas would see it open
            await asyncio.sleep(1.0)  # past the reset delay: the next call is the probe

            # No token, and 5 KB of tracestate (passed on with the caller's traceparent):
            # under the shim's head limit, over the gateway's limit for one header value,
            # so the gateway refuses it before anything is published.
            oversized = {
                "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                "tracestate": "vendor=" + "x" * 5000,
            }
            junk = await anonymous.post("/v1/data/put", json=put, headers=oversized)
            assert junk.status_code == 431, junk.text
            gateway = shim.app._gateway
            assert gateway is not None and gateway.policies is not None
            assert gateway.policies.guard.state("data") is BreakerState.HALF_OPEN
            await asyncio.sleep(0.2)  # a deletion would have been written by now
            assert await shared()
            # The probe slot was given back: the next call probes (and fails: no worker).
            assert (await c.post("/v1/data/put", json=put)).json()["code"] == "no_responders"
            assert gateway.policies.guard.state("data") is BreakerState.OPEN
        finally:
            await r.aclose()
            await worker.drain(1)


async def test_made_up_names_from_anonymous_callers_leave_real_ops_their_breakers(
    local_nats: ServerProcess, local_redis: ServerProcess, admin_token: str | None, uid: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each made-up name is a 404 from the shim's gateway, and keeps nothing: more of them
    than the guard has room for, and `data` still gets its breaker."""
    monkeypatch.setattr(guard_module, "MAX_GUARDED_OPS", 8)  # the shim runs in this process
    settings = make_settings(local_nats.url, local_redis.url, resilience=POLICY)
    worker = Worker(settings, builtin_groups(["data"]))
    await worker.start()
    async with running_shim(settings) as shim, httpx.AsyncClient(
        base_url=shim.url, headers=bearer(admin_token), timeout=10
    ) as c, httpx.AsyncClient(base_url=shim.url, timeout=10) as anonymous:
        try:
            for i in range(12):  # no token, names nobody declared
                made_up = await anonymous.post(f"/v1/madeup{uid}{i}/x", json={})
                assert made_up.status_code == 404, made_up.text
            await worker.drain(1)  # every data worker gone
            codes = []
            for _ in range(5):
                resp = await c.post("/v1/data/put", json={"key": f"k{uid}", "value": 1})
                codes.append(resp.json()["code"])
            assert codes[-1] == "circuit_open", codes
        finally:
            await worker.drain(1)
