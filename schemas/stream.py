"""`stream.*`: events on the `NEXUS_EVENTS` stream."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from nexus_bus.schemas.common import MESSAGE_ID_PATTERN, Limit, Topic


class PublishRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Append an event to a topic; an `id` makes the publish idempotent (dedup window)."""

    topic: Topic
    event: Any
    id: Annotated[str, msgspec.Meta(pattern=MESSAGE_ID_PATTERN)] | None = None


class PublishReply(msgspec.Struct, frozen=True, kw_only=True):
    """The stream sequence the event got, and whether it was a duplicate of an earlier id."""

    topic: str
    seq: int
    duplicate: bool


class ReadRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Read a topic's events after a sequence."""

    topic: Topic
    after_seq: Annotated[int, msgspec.Meta(ge=0)] = 0
    limit: Limit = 100


class Event(msgspec.Struct, frozen=True, kw_only=True):
    """One stored event."""

    seq: int
    event: Any
    time: str


class ReadReply(msgspec.Struct, frozen=True, kw_only=True):
    """Events in sequence order."""

    events: list[Event]
