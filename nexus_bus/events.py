"""Event topics on the `NEXUS_EVENTS` stream behind the `EventLog` seam."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, Protocol

import nats.js.errors as jserr
from nats.aio.client import Client
from nats.js import JetStreamContext

from nexus_bus.bus.assets import STREAM_NOT_FOUND, again_if_missing
from nexus_bus.bus.metadata import check_publish_size
from nexus_bus.bus.nats_errors import BAD_REQUEST
from nexus_bus.bus.subjects import events_subject
from nexus_bus.constants import EVENTS_STREAM, H_NATS_MSG_ID
from nexus_bus.store import translate_nats_errors

_LAST_SEQ: Final = 2**64 - 1  # a stream sequence is a uint64
# A read's reply must fit max_payload with its headers: room for those (as the worker's own
# check keeps), and what each event adds around its body: {"seq":…,"event":…,"time":"…"}.
_REPLY_HEADROOM: Final = 8 * 1024
_EVENT_OVERHEAD: Final = 96


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """One event as stored: its stream sequence, encoded body and time."""

    seq: int
    data: bytes
    time: datetime


@dataclass(frozen=True, slots=True)
class Appended:
    """Where an appended event landed."""

    seq: int
    duplicate: bool


class EventLog(Protocol):
    """Append-only topics with sequence numbers and idempotent appends."""

    async def append(self, topic: str, data: bytes, *, event_id: str | None = None) -> Appended:
        """Append an event; a repeated `event_id` on the same topic within the dedup window is
        not stored twice."""
        ...

    async def read(self, topic: str, after_seq: int = 0, limit: int = 100) -> list[StoredEvent]:
        """Events of `topic` with sequence > `after_seq`, oldest first."""
        ...


class JetStreamEventLog:
    """`EventLog` on the `NEXUS_EVENTS` stream."""

    def __init__(
        self, js: JetStreamContext, stream: str = EVENTS_STREAM, *, nc: Client | None = None
    ) -> None:
        """Args:
        js: where events are published and read.
        stream: the stream they are stored in.
        nc: the connection under `js`, whose max_payload bounds an event with its headers
            (`check_publish_size`); None leaves only nats-py's check of the event.
        """
        self._js = js
        self._stream = stream
        self._nc = nc

    async def append(self, topic: str, data: bytes, *, event_id: str | None = None) -> Appended:
        """Publish to `nexus.events.<topic>`; `<topic>:<event_id>` becomes `Nats-Msg-Id`.

        JetStream deduplicates across the whole stream, so the id is qualified by its topic
        (which has no `:`): the same id on two topics is two events.

        Raises:
            InvalidRequest: a malformed topic.
            PayloadTooLarge: the event exceeds the server's max_payload with its headers
                (nats-py adds `Nats-Expected-Stream`).
            Unavailable: JetStream cannot be reached.
        """
        subject = events_subject(topic)
        headers = {H_NATS_MSG_ID: f"{topic}:{event_id}"} if event_id else None
        if self._nc is not None:
            max_payload = self._nc.max_payload
            check_publish_size(f"append {topic}", data, headers, max_payload, jetstream=True)

        async def publish() -> Appended:
            async with translate_nats_errors(f"append {topic}"):
                ack = await self._js.publish(subject, data, stream=self._stream, headers=headers)
            return Appended(ack.seq, bool(ack.duplicate))

        # A stream gone since start is created again, and the event appended to it
        # (bus/assets.py): no stream took the first publish.
        return await again_if_missing(self._nc, publish)

    async def read(self, topic: str, after_seq: int = 0, limit: int = 100) -> list[StoredEvent]:
        """Read up to `limit` events after `after_seq` with direct "next by subject" gets.

        Fewer when more would not fit one reply (the connection's max_payload, when known):
        the caller reads on after the last one. The first always comes (a reply too large
        even for it is the worker's 413).

        Stream sequences are unsigned 64-bit: nothing comes after the last one, and asking
        JetStream for the one past it would be a request it cannot read.

        Raises:
            InvalidRequest: JetStream refused the request as malformed.
            Unavailable: JetStream cannot be reached.
        """
        subject = events_subject(topic)
        if after_seq >= _LAST_SEQ:
            return []
        # A stream gone since start is created again (bus/assets.py), and read: empty.
        return await again_if_missing(
            self._nc, lambda: self._read(topic, subject, after_seq, limit)
        )

    async def _read(
        self, topic: str, subject: str, after_seq: int, limit: int
    ) -> list[StoredEvent]:
        events: list[StoredEvent] = []
        seq = after_seq + 1
        budget = self._nc.max_payload - _REPLY_HEADROOM if self._nc is not None else None
        size = 0
        async with translate_nats_errors(f"read {topic}", input_errors=(BAD_REQUEST,)):
            while len(events) < limit:
                try:
                    msg = await self._js.get_msg(self._stream, seq=seq, subject=subject, next=True)
                except jserr.NotFoundError as exc:
                    if exc.err_code == STREAM_NOT_FOUND:
                        raise  # the stream, not an event, is missing
                    break
                if msg.seq is None:
                    break
                data = msg.data or b""
                size += len(data) + _EVENT_OVERHEAD
                if events and budget is not None and size > budget:
                    break
                when = msg.time or datetime.now(UTC)
                events.append(StoredEvent(msg.seq, data, when))
                seq = msg.seq + 1
        return events
