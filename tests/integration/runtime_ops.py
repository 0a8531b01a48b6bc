"""Operations used by runtime tests that run a worker as a separate process."""

from __future__ import annotations

import asyncio
import contextlib

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


@ops.action("stubborn", public=True)
async def stubborn(req: Nap, ctx: RequestContext) -> Nap:
    """Sleep `seconds` and swallow every cancellation meanwhile (a handler with a broad
    `except BaseException` in a retry loop)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + req.seconds
    while loop.time() < end:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0.05)
    return req
