"""`stream.*`: append to and read event topics on `NEXUS_EVENTS`."""

from __future__ import annotations

from typing import Final

import msgspec

from nexus_bus import Operations, RequestContext
from nexus_bus.schemas.stream import Event, PublishReply, PublishRequest, ReadReply, ReadRequest

ops = Operations("stream", description="Event topics on the NEXUS_EVENTS stream.")

_encode: Final = msgspec.json.Encoder().encode
_decode: Final = msgspec.json.decode


@ops.action("publish")
async def publish(req: PublishRequest, ctx: RequestContext) -> PublishReply:
    """Append an event; a repeated `id` inside the dedup window is reported as a duplicate."""
    appended = await ctx.services.events.append(req.topic, _encode(req.event), event_id=req.id)
    return PublishReply(topic=req.topic, seq=appended.seq, duplicate=appended.duplicate)


@ops.action("read")
async def read(req: ReadRequest, ctx: RequestContext) -> ReadReply:
    """Events of a topic after `after_seq`, oldest first, at most `limit`."""
    stored = await ctx.services.events.read(req.topic, req.after_seq, req.limit)
    return ReadReply(
        events=[Event(seq=e.seq, event=_decode(e.data), time=e.time.isoformat()) for e in stored]
    )
