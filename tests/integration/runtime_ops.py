"""Operations used by runtime tests that run a worker as a separate process."""

from __future__ import annotations

import asyncio

import msgspec

from nexus_bus import Operations, RequestContext


class Nap(msgspec.Struct, frozen=True, kw_only=True):
    """Sleep this long, then answer."""

    seconds: float
    tag: str = ""


ops = Operations("slowpoke", description="Test op: sleeps, then answers.")


@ops.action("nap", public=True)
async def nap(req: Nap, ctx: RequestContext) -> Nap:
    """Sleep `seconds`, then echo the request."""
    await asyncio.sleep(req.seconds)
    return req
