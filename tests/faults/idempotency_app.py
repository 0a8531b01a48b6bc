"""`data.*` for the keyed-request crash test: the built-in handlers, holding after each write.

No tests here: a worker subprocess imports it with
`python -m nexus_bus worker --app tests.faults.idempotency_app:ops`. `data.put` and
`data.delete` run the built-in handlers (the real write path: the journal when the request
carries an `Idempotency-Key`, the cache, the KV) and then hold, so the test can SIGKILL the
worker at a deterministic point: the effect applied, the reply neither recorded nor sent.
"""

from __future__ import annotations

import asyncio
from typing import Final

from nexus_bus import Operations, RequestContext
from nexus_bus.handlers import data
from nexus_bus.schemas.data import (
    DeleteReply,
    DeleteRequest,
    GetReply,
    GetRequest,
    PutReply,
    PutRequest,
)

HOLD_S: Final = 600.0  # far longer than the test: only the kill ends it

ops = Operations("data", description="data.* whose writes hold after applying (fault tests).")


@ops.action("put")
async def put(req: PutRequest, ctx: RequestContext) -> PutReply:
    """The built-in `data.put`, then a hold before the reply."""
    reply = await data.put(req, ctx)
    await asyncio.sleep(HOLD_S)
    return reply


@ops.action("delete")
async def delete(req: DeleteRequest, ctx: RequestContext) -> DeleteReply:
    """The built-in `data.delete`, then a hold before the reply."""
    reply = await data.delete(req, ctx)
    await asyncio.sleep(HOLD_S)
    return reply


@ops.action("get")
async def get(req: GetRequest, ctx: RequestContext) -> GetReply:
    """The built-in `data.get` (tells the test the worker is up)."""
    return await data.get(req, ctx)
