"""A job submitted over HTTP counts against its subject's rate limit, as the call would.

Workers enforce rate limits on the core request path (docs/resilience.md); a job runs on the
job runner's path, which has none, so `Prefer: respond-async` let a limited subject run as
many calls as it liked. The shim now takes the job's token from the subject's limit before
anything is written (real shim, real worker and job runner, real NATS and Redis).
"""

from __future__ import annotations

import uuid
from typing import Any

import httpx

from nexus_bus import Operations, RequestContext, Worker
from tests.conftest import issue_test_token, make_settings
from tests.integration.http_shim import bearer, running_shim

OP = "rljobs"
ops = Operations(OP, description="Rate-limited job probe.")
ASYNC = {"Prefer": "respond-async"}


@ops.action("hit")
async def hit(req: dict[str, Any], ctx: RequestContext) -> dict[str, bool]:
    """Answer at once."""
    return {"ok": True}


async def test_async_submissions_are_held_to_the_subjects_rate_limit(
    nats_url: str, redis_url: str
) -> None:
    # One call, then one more every 10 s: the test ends long before the next one is due.
    config = {"ops": {f"{OP}.hit": {"rate_limit_per_s": 0.1, "rate_limit_burst": 1}}}
    settings = make_settings(nats_url, redis_url, resilience=config)
    limited = bearer(issue_test_token(subject=f"limited-{uuid.uuid4().hex}"))
    other = bearer(issue_test_token(subject=f"other-{uuid.uuid4().hex}"))
    worker = Worker(settings, [ops])
    await worker.start()
    try:
        async with running_shim(settings) as shim, httpx.AsyncClient(
            base_url=shim.url, timeout=10
        ) as c:
            assert (await c.post(f"/v1/{OP}/hit", json={}, headers=limited)).status_code == 200
            refused = await c.post(f"/v1/{OP}/hit", json={}, headers=limited)
            assert refused.status_code == 429, refused.text

            for _ in range(3):
                submitted = await c.post(f"/v1/{OP}/hit", json={}, headers={**limited, **ASYNC})
                assert submitted.status_code == 429, submitted.text
                assert submitted.json()["code"] == "rate_limited"
                assert int(submitted.headers["retry-after"]) >= 1
                assert submitted.headers["ratelimit-policy"] == refused.headers["ratelimit-policy"]
                assert "location" not in submitted.headers
            # Another subject has its own allowance: its job is accepted.
            accepted = await c.post(f"/v1/{OP}/hit", json={}, headers={**other, **ASYNC})
            assert accepted.status_code == 202, accepted.text
    finally:
        await worker.drain(1)
