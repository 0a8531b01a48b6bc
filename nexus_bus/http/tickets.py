"""Stream tickets: how a browser's `EventSource`, which cannot send `Authorization`, opens a
stream without putting its long-lived token into a URL (and so into every access log).

    POST /v1/events/{topic}/ticket    (Authorization: Bearer <token>)
      -> {"ticket": "...", "expires_in": 60, "url": "/v1/events/{topic}?ticket=..."}
    GET  /v1/events/{topic}?ticket=...

A ticket is 256 random bits, valid for `http.sse_ticket_ttl_s` (60 s), for one topic, once.
Redis holds it — under the SHA-256 of the ticket, so the store never holds a usable ticket —
with the topic and the bearer token it was issued for, and expires it; redeeming it is one
`GETDEL`, atomic across every shim replica sharing that Redis. The stream then runs exactly
as if the token had been sent: the same authorization, the same lease re-checking expiry and
revocation (`authz.py`). Unknown, expired, already used, or for another topic: 401.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Callable
from typing import Final
from urllib.parse import parse_qs

import msgspec

from nexus_bus.constants import (
    CT_JSON,
    EVENTS_PREFIX,
    HTTP_API_PREFIX,
    SSE_TICKET_KEY_PREFIX,
    SSE_TICKET_QUERY,
)
from nexus_bus.errors import InvalidToken
from nexus_bus.http.problems import Answer
from nexus_bus.redis_client import RedisClient
from nexus_bus.redis_errors import REDIS_FAILURES, map_redis_error
from nexus_bus.schemas.events import TicketIssued

_TICKET_BYTES: Final = 32
_TICKET_SHAPE: Final = re.compile(r"[A-Za-z0-9_-]{43}")  # token_urlsafe(32)
_INVALID: Final = "unknown, expired or already used stream ticket"
_EVENTS_PATH: Final = f"{HTTP_API_PREFIX}/{EVENTS_PREFIX.rsplit('.', 1)[-1]}/"
_CT_JSON: Final = CT_JSON.encode()
_NO_STORE: Final = [(b"cache-control", b"no-store")]


class TicketRecord(msgspec.Struct, frozen=True, kw_only=True):
    """What Redis holds for one unused ticket."""

    topic: str
    authorization: str | None  # the Authorization header the ticket stands for


_encode: Final = msgspec.json.Encoder().encode
_decode_record: Final = msgspec.json.Decoder(TicketRecord).decode


def new_ticket(token_urlsafe: Callable[[int], str] = secrets.token_urlsafe) -> str:
    """A fresh ticket: 256 random bits, URL-safe."""
    return token_urlsafe(_TICKET_BYTES)


def ticket_key(ticket: str) -> str:
    """The Redis key of a ticket: its SHA-256, so the store holds nothing usable."""
    return SSE_TICKET_KEY_PREFIX + hashlib.sha256(ticket.encode()).hexdigest()


def ticket_of(query_string: bytes) -> str | None:
    """The `ticket` query parameter, or None when the URL carries none."""
    if not query_string:
        return None
    values = parse_qs(query_string.decode("latin-1")).get(SSE_TICKET_QUERY)
    return values[0] if values else None


def stream_url(topic: str, ticket: str) -> str:
    """Where the ticket opens its stream."""
    return f"{_EVENTS_PATH}{topic}?{SSE_TICKET_QUERY}={ticket}"


def check_record(raw: bytes | str | None, topic: str) -> str | None:
    """The Authorization header a redeemed ticket stands for.

    Raises:
        InvalidToken: no record (unknown, expired or used), a malformed one, or another topic.
    """
    if raw is None:
        raise InvalidToken(_INVALID)
    try:
        record = _decode_record(raw)
    except msgspec.DecodeError:
        raise InvalidToken(_INVALID) from None
    if record.topic != topic:
        raise InvalidToken("stream ticket issued for another topic")
    return record.authorization


class TicketStore:
    """Issues and redeems stream tickets in Redis."""

    def __init__(self, redis: RedisClient, ttl_s: float) -> None:
        self._redis = redis
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self.ttl_s = ttl_s

    async def issue(self, topic: str, authorization: str | None) -> Answer:
        """Store a ticket for `topic` and the caller's token; the answer that hands it out.

        Raises:
            Unavailable: Redis cannot be reached.
        """
        ticket = new_ticket()
        record = _encode(TicketRecord(topic=topic, authorization=authorization))
        try:
            await self._redis.set(ticket_key(ticket), record, px=self._ttl_ms)
        except REDIS_FAILURES as exc:
            raise map_redis_error(exc, "the stream ticket store") from exc
        issued = TicketIssued(
            ticket=ticket, expires_in=int(self.ttl_s), url=stream_url(topic, ticket)
        )
        return Answer(200, _CT_JSON, list(_NO_STORE), _encode(issued))

    async def redeem(self, ticket: str, topic: str) -> str | None:
        """Use up `ticket` for `topic`; the Authorization header it stands for.

        Raises:
            InvalidToken: unknown, expired, already used, malformed, or for another topic.
            Unavailable: Redis cannot be reached (never a silent allow).
        """
        if not _TICKET_SHAPE.fullmatch(ticket):
            raise InvalidToken(_INVALID)
        try:
            raw: bytes | str | None = await self._redis.getdel(ticket_key(ticket))
        except REDIS_FAILURES as exc:
            raise map_redis_error(exc, "the stream ticket store") from exc
        return check_record(raw, topic)
