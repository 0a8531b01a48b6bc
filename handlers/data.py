"""`data.*`: JSON values by key, on the system of record behind the cache."""

from __future__ import annotations

from typing import Final

import msgspec

from nexus_bus import Operations, RequestContext
from nexus_bus.schemas.data import (
    DeleteReply,
    DeleteRequest,
    GetReply,
    GetRequest,
    ListReply,
    ListRequest,
    PutReply,
    PutRequest,
)

ops = Operations("data", description="Key/value records with revisions (JetStream KV).")

_encode: Final = msgspec.json.Encoder().encode
_decode: Final = msgspec.json.decode


@ops.action("get")
async def get(req: GetRequest, ctx: RequestContext) -> GetReply:
    """Read a key: its JSON value and revision; 404 `not_found` when absent."""
    record = await ctx.services.records.get(req.key)
    return GetReply(key=req.key, value=_decode(record.value), revision=record.revision)


@ops.action("put")
async def put(req: PutRequest, ctx: RequestContext) -> PutReply:
    """Write a key; `expected_revision` makes it a compare-and-set (409 `conflict`)."""
    revision = await ctx.services.records.put(
        req.key, _encode(req.value), expected_revision=req.expected_revision
    )
    return PutReply(key=req.key, revision=revision)


@ops.action("delete")
async def delete(req: DeleteRequest, ctx: RequestContext) -> DeleteReply:
    """Delete a key; `deleted` says whether it had a value."""
    deleted = await ctx.services.records.delete(req.key)
    return DeleteReply(key=req.key, deleted=deleted)


@ops.action("list")
async def list_keys(req: ListRequest, ctx: RequestContext) -> ListReply:
    """Keys starting with `prefix`, in lexical order, at most `limit`."""
    return ListReply(keys=await ctx.services.records.keys(req.prefix, req.limit))
