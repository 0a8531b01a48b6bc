"""An op group for discovery tests: one action that answers, one that always fails."""

from __future__ import annotations

import msgspec

from nexus_bus import Operations, RequestContext
from nexus_bus.errors import Conflict


class Note(msgspec.Struct, frozen=True, kw_only=True):
    """Anything."""

    note: str = ""


def discovery_ops(op: str) -> Operations:
    """A public group `op` with `ok` (echoes) and `fail` (409 conflict)."""
    ops = Operations(op, description="Discovery test group.")

    @ops.action("ok", public=True)
    async def ok(req: Note, ctx: RequestContext) -> Note:
        """Echo."""
        return req

    @ops.action("fail", public=True)
    async def fail(req: Note, ctx: RequestContext) -> Note:
        """Always a conflict."""
        raise Conflict("always conflicts")

    return ops
