"""Serving the `ai` handlers in a test: a worker with its own `ai` settings under an op name of
the test's own (so the session's worker, which serves the built-in `ai`, never answers), and a
gateway without client retries (so the provider double sees exactly the calls made)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from nexus_bus import Gateway, Operations, Settings, Worker
from nexus_bus.handlers import ai
from tests.conftest import issue_test_token, make_settings


def ai_group(op: str) -> Operations:
    """The built-in `ai` actions, registered under `op`."""
    group = Operations(op, description="ai, for one test")
    for operation in ai.ops:
        group.action(operation.action)(operation.handler)
    return group


def ai_settings(
    nats_url: str, redis_url: str, ai_section: dict[str, Any], **overrides: Any
) -> Settings:
    """Test settings with `ai_section` and no client-side retries."""
    return make_settings(
        nats_url, redis_url, ai=ai_section, resilience={"enabled": False}, **overrides
    )


def openai_backend(base_url: str, models: list[str], **fields: Any) -> dict[str, Any]:
    """An `openai` backend section for the provider double."""
    return {"kind": "openai", "base_url": base_url, "models": models, **fields}


@contextlib.asynccontextmanager
async def ai_worker(settings: Settings, op: str) -> AsyncIterator[tuple[Gateway, Worker]]:
    """A worker serving the ai actions as `op`, and a gateway (every scope) to call it."""
    worker = Worker(settings, [ai_group(op)])
    await worker.start()
    # A subject of the test's own: budgets are per subject and outlive the test in Redis.
    gateway = await Gateway.connect(settings, token=issue_test_token(subject=f"admin-{op}"))
    try:
        yield gateway, worker
    finally:
        await gateway.close()
        await worker.drain(1)


@contextlib.asynccontextmanager
async def serving_ai(settings: Settings, op: str) -> AsyncIterator[Gateway]:
    """`ai_worker`'s gateway alone."""
    async with ai_worker(settings, op) as (gateway, _):
        yield gateway
