"""Two shims behind real NGINX share breaker state and rate limits through Redis.

The NGINX and shim processes come from `test_nginx.py`'s fixtures; each test brings a
worker of its own for an op named after the test (so the shared state it creates in the
session's Redis is its own).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from nexus_bus import Operations, RequestContext, Settings, Worker
from nexus_bus.resilience.policy import PolicySettings
from tests.e2e.test_nginx import NGINX, Edge, edge, processes  # noqa: F401 - fixtures
from tests.integration.http_shim import bearer, poll_until

pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed")


def group(op: str) -> Operations:
    ops = Operations(op, description="e2e resilience probe")

    @ops.action("hit")
    async def hit(req: dict[str, Any], ctx: RequestContext) -> dict[str, str]:
        """Answer at once."""
        return {"op": ctx.op}

    return ops


@pytest.fixture
async def op_worker(settings: Settings, uid: str) -> AsyncIterator[tuple[str, Worker]]:
    op = f"res{uid}"
    limit = PolicySettings(rate_limit_per_s=4, rate_limit_burst=4)
    resilience = settings.resilience.model_copy(update={"ops": {f"{op}.hit": limit}})
    limited = settings.model_copy(update={"resilience": resilience})
    worker = Worker(limited, [group(op)])
    await worker.start()
    try:
        yield op, worker
    finally:
        await worker.drain(1)


async def circuit_state(shim_url: str, op: str) -> float | None:
    async with httpx.AsyncClient(base_url=shim_url) as c:
        text = (await c.get("/metrics")).text
    found = re.search(rf'^nexus_circuit_state{{name="op:{op}"}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else None


async def test_a_breaker_opened_through_one_shim_is_open_on_the_other_within_a_second(
    edge: Edge,  # noqa: F811
    op_worker: tuple[str, Worker],
    admin_token: str | None,
) -> None:
    op, worker = op_worker
    (a_url, _), (b_url, _) = edge.shims
    async with httpx.AsyncClient(headers=bearer(admin_token), timeout=10) as c:
        assert (await c.post(f"{edge.url}/v1/{op}/hit", json={})).status_code == 200
        await worker.drain(1)  # every worker of the op is gone
        codes = []
        for _ in range(5):
            codes.append((await c.post(f"{a_url}/v1/{op}/hit", json={})).json()["code"])
            if codes[-1] == "circuit_open":
                break
        assert codes[-1] == "circuit_open", codes
        opened = time.monotonic()

        async def open_on_b() -> bool:
            return await circuit_state(b_url, op) == 2

        await poll_until(open_on_b, 1.0)  # shim B never sent a request for the op itself
        assert time.monotonic() - opened < 1.0
        on_b = await c.post(f"{b_url}/v1/{op}/hit", json={})
        assert on_b.status_code == 503 and on_b.json()["code"] == "circuit_open"
        assert int(on_b.headers["retry-after"]) >= 1
        via_nginx = await c.post(f"{edge.url}/v1/{op}/hit", json={})
        assert via_nginx.status_code == 503 and via_nginx.json()["code"] == "circuit_open"


async def test_a_rate_limit_is_shared_by_both_shims(
    edge: Edge,  # noqa: F811
    op_worker: tuple[str, Worker],
    admin_token: str | None,
) -> None:
    op, _ = op_worker
    (a_url, _), (b_url, _) = edge.shims
    async with httpx.AsyncClient(headers=bearer(admin_token), timeout=10) as c:
        # N + 1 = 5 requests at once, spread over both shims: the limit is 4 per second.
        answers = await asyncio.gather(
            *(c.post(f"{(a_url, b_url)[i % 2]}/v1/{op}/hit", json={}) for i in range(5))
        )
        statuses = sorted(a.status_code for a in answers)
        assert statuses == [200, 200, 200, 200, 429], [a.text for a in answers]
        refused = next(a for a in answers if a.status_code == 429)
        assert refused.json()["code"] == "rate_limited"
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.headers["ratelimit-policy"] == f'"{op}.hit";q=4;w=1'
        assert refused.headers["ratelimit"].startswith(f'"{op}.hit";r=0;t=')
        await asyncio.sleep(0.3)  # one interval (250 ms) later, one more passes, via NGINX
        assert (await c.post(f"{edge.url}/v1/{op}/hit", json={})).status_code == 200
