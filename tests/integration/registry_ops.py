"""Shared pieces of the registry tests: a one-action op group, and a stopped worker's trace."""

from __future__ import annotations

from typing import Any

import nats

from nexus_bus import Operations, RequestContext, Settings
from nexus_bus.registry import Registration, register


def group(op: str) -> Operations:
    """An op with one public action, `hello`."""
    ops = Operations(op, description="A test op.")

    @ops.action("hello", public=True)
    async def hello(req: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
        """Say hello."""
        return {"hello": op}

    return ops


async def register_and_stop(settings: Settings, op: str) -> Registration:
    """What a worker of `op` leaves behind after a graceful stop: declared, not served."""
    nc = await nats.connect(settings.nats.url)
    try:
        registration = await register(nc, settings, [group(op)])
        assert registration is not None
        await registration.stop()
        return registration
    finally:
        await nc.close()
