"""A caller's own short budget is no failure of the op: it must not open the shared breaker.

The HTTP shim honours a client's `Nexus-Timeout-Ms` (capped, never raised). An attempt given
1 ms times out before any worker can answer, whatever the workers' health; counted against
the op, a handful of them opened its breaker, and through Redis every replica's, for every
caller of every action of the op. Real nats-server and redis-server of this test's own (the
breaker state is shared through Redis), a real worker and a real HTTP shim.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from nexus_bus import Operations, RequestContext, Worker
from nexus_bus.embedded import ServerProcess
from nexus_bus.resilience import BreakerState
from tests.conftest import issue_test_token, make_settings
from tests.integration.http_shim import PROBE_OP, bearer, probe_worker, running_shim

POLICY = {
    "defaults": {"breaker_failures": 3, "breaker_reset_ms": 3000, "breaker_reset_max_ms": 3000},
    "sync_interval_ms": 50,
}
DEFAULT_BUDGET_MS = 300  # what a call gets when its caller names no budget


async def test_a_callers_short_budgets_leave_the_breaker_closed_for_everyone(
    local_nats: ServerProcess, local_redis: ServerProcess
) -> None:
    settings = make_settings(
        local_nats.url, local_redis.url, resilience=POLICY,
        client={"default_timeout_ms": DEFAULT_BUDGET_MS},
    )  # fmt: skip
    # A low-privilege caller allowed one slow action, and someone else using another action.
    mallory = bearer(issue_test_token((f"{PROBE_OP}:sleep",), subject="mallory"))
    alice = bearer(issue_test_token((f"{PROBE_OP}:echo",), subject="alice"))
    async with probe_worker(settings), running_shim(settings) as shim, httpx.AsyncClient(
        base_url=shim.url, timeout=10
    ) as c:
        assert (await c.post(f"/v1/{PROBE_OP}/echo", json={}, headers=alice)).status_code == 200
        gateway = shim.app._gateway
        assert gateway is not None and gateway.policies is not None
        guard = gateway.policies.guard

        hurried = {**mallory, "Nexus-Timeout-Ms": "1"}
        for _ in range(6):
            resp = await c.post(f"/v1/{PROBE_OP}/sleep", json={"ms": 200}, headers=hurried)
            assert resp.status_code == 504 and resp.json()["code"] == "upstream_timeout", resp.text
        assert guard.state(PROBE_OP) is BreakerState.CLOSED
        served = await c.post(f"/v1/{PROBE_OP}/echo", json={}, headers=alice)
        assert served.status_code == 200, served.text

        # Timeouts of attempts given the default budget still count: the workers had the
        # time a call gets and did not answer.
        for _ in range(3):
            resp = await c.post(f"/v1/{PROBE_OP}/sleep", json={"ms": 600}, headers=mallory)
            assert resp.status_code == 504, resp.text
        assert guard.state(PROBE_OP) is BreakerState.OPEN
        refused = await c.post(f"/v1/{PROBE_OP}/echo", json={}, headers=alice)
        assert refused.status_code == 503 and refused.json()["code"] == "circuit_open"


BOUNDED = "hurrybound"
bounded = Operations(BOUNDED, description="An op whose actions bound their own time.")


@bounded.action("sleep", timeout_ms=5000)
async def bounded_sleep(req: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
    """Sleep `ms`; the worker bounds the handler by the request's deadline (or 5 s)."""
    await asyncio.sleep(int(req["ms"]) / 1000)
    return {}


@bounded.action("echo")
async def bounded_echo(req: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
    """Answer at once."""
    return req


async def test_a_workers_504_to_a_short_budget_leaves_the_breaker_closed(
    local_nats: ServerProcess, local_redis: ServerProcess
) -> None:
    """An action declared with `timeout_ms` is bounded by the request's deadline in the
    worker, which then answers 504 `upstream_timeout` itself, within the 1 ms: a reply the
    guard counted against the op like its own timeout."""
    settings = make_settings(
        local_nats.url, local_redis.url, resilience=POLICY,
        client={"default_timeout_ms": DEFAULT_BUDGET_MS},
    )  # fmt: skip
    mallory = bearer(issue_test_token((f"{BOUNDED}:sleep",), subject="mallory"))
    alice = bearer(issue_test_token((f"{BOUNDED}:echo",), subject="alice"))
    worker = Worker(settings, [bounded])
    await worker.start()
    try:
        async with running_shim(settings) as shim, httpx.AsyncClient(
            base_url=shim.url, timeout=10
        ) as c:
            assert (await c.post(f"/v1/{BOUNDED}/echo", json={}, headers=alice)).status_code == 200
            hurried = {**mallory, "Nexus-Timeout-Ms": "1"}
            for _ in range(6):
                resp = await c.post(f"/v1/{BOUNDED}/sleep", json={"ms": 200}, headers=hurried)
                assert resp.status_code == 504, resp.text
            gateway = shim.app._gateway
            assert gateway is not None and gateway.policies is not None
            assert gateway.policies.guard.state(BOUNDED) is BreakerState.CLOSED
            served = await c.post(f"/v1/{BOUNDED}/echo", json={}, headers=alice)
            assert served.status_code == 200, served.text
    finally:
        await worker.drain(1)
