"""Reading an HTTP request off ASGI: the headers the shim uses, and the body within limits.

The body is counted while it streams in: a declared Content-Length over the limit is refused
before one byte is read, and a chunked body is refused as soon as it crosses the limit, so a
client can never make the shim buffer more than `max_body_bytes`. Slow senders hit the read
timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any, Final

from nexus_bus.bus.metadata import is_ascii_digits
from nexus_bus.constants import (
    H_AUTHORIZATION,
    H_CONTENT_TYPE,
    H_FORWARDED_FOR,
    H_HTTP_REQUEST_ID,
    H_IDEMPOTENCY_KEY,
    H_LAST_EVENT_ID,
    H_PREFER,
    H_TIMEOUT_MS,
    H_TRACEPARENT,
    H_TRACESTATE,
)
from nexus_bus.errors import HeadersTooLarge, InvalidRequest, PayloadTooLarge
from nexus_bus.http.deadlines import ReadDeadlines
from nexus_bus.http.problems import ClientGone

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]

# ASGI header names arrive lower-cased; each maps to the RequestHead slot it fills.
_SLOTS: Final[dict[bytes, str]] = {
    H_AUTHORIZATION.lower().encode(): "authorization",
    H_HTTP_REQUEST_ID.lower().encode(): "request_id",
    H_TRACEPARENT.lower().encode(): "traceparent",
    H_TRACESTATE.lower().encode(): "tracestate",
    H_IDEMPOTENCY_KEY.lower().encode(): "idempotency_key",
    H_TIMEOUT_MS.lower().encode(): "timeout_ms",
    H_CONTENT_TYPE.lower().encode(): "content_type",
    b"content-length": "content_length",
    H_PREFER.lower().encode(): "prefer",
    H_FORWARDED_FOR.lower().encode(): "forwarded_for",
    H_LAST_EVENT_ID.lower().encode(): "last_event_id",
    b"accept": "accept",
}

# List fields (RFC 9110 §5.3; W3C Trace Context for tracestate): repeated lines are one list,
# joined with commas. X-Forwarded-For must be seen whole for the rightmost-trusted rule, and a
# `Prefer: respond-async` on a second line still asks for a job (RFC 7240 §2).
_LISTS: Final = frozenset({"forwarded_for", "prefer", "accept", "tracestate"})

STREAMING: Final = "nexus.streaming"  # ASGI scope key: the answer is an event stream, started


class RequestHead:
    """The request headers the shim acts on, decoded; None when absent.

    The first occurrence of a header wins, except for the list fields (`_LISTS`), whose
    repeats are joined into one list.
    """

    __slots__ = (
        "accept",
        "authorization",
        "content_length",
        "content_type",
        "forwarded_for",
        "idempotency_key",
        "last_event_id",
        "prefer",
        "request_id",
        "sent_traceparent",
        "size",
        "timeout_ms",
        "traceparent",
        "tracestate",
    )

    def __init__(self) -> None:
        self.accept: str | None = None
        self.authorization: str | None = None
        self.request_id: str | None = None
        self.traceparent: str | None = None
        self.tracestate: str | None = None
        self.idempotency_key: str | None = None
        self.timeout_ms: str | None = None
        self.content_type: str | None = None
        self.content_length: str | None = None
        self.prefer: str | None = None
        self.forwarded_for: str | None = None
        self.last_event_id: str | None = None
        self.size = 0  # bytes of all headers, as `check_size` counts them
        # The traceparent the shim forwarded (the client's, or a new trace): the access line's.
        self.sent_traceparent: str | None = None

    def check_size(self, max_bytes: int) -> None:
        """Refuse a head whose headers add up to more than `max_bytes`.

        A separate step from `parse_head`, so that the 431 problem still carries the
        client's own request id.

        Raises:
            HeadersTooLarge: the headers add up to more than `max_bytes`.
        """
        if self.size > max_bytes:
            raise HeadersTooLarge(f"request headers total {self.size} bytes, more than {max_bytes}")


def parse_head(headers: Iterable[tuple[bytes, bytes]]) -> RequestHead:
    """Pick the headers the shim uses out of an ASGI header list, and add up their size."""
    head = RequestHead()
    total = 0
    for name, value in headers:
        total += len(name) + len(value) + 4
        slot = _SLOTS.get(name)
        if slot is None:
            continue
        # latin-1 maps every byte; non-ASCII values are refused later, before NATS.
        text = value.decode("latin-1")
        current = getattr(head, slot)
        if current is None:
            setattr(head, slot, text)
        elif slot in _LISTS:  # list fields: repeated lines are one comma-separated list
            setattr(head, slot, f"{current}, {text}")
    head.size = total
    return head


def declared_length(head: RequestHead, limit: int) -> int | None:
    """The Content-Length, checked against `limit` before any of the body is read.

    Raises:
        InvalidRequest: a Content-Length that is not a number.
        PayloadTooLarge: a declared body over `limit`.
    """
    raw = head.content_length
    if raw is None:
        return None
    if not is_ascii_digits(raw) or len(raw) > 18:
        raise InvalidRequest("Content-Length must be a non-negative integer")
    length = int(raw)
    if length > limit:
        raise PayloadTooLarge(f"body of {length} bytes exceeds the limit of {limit}")
    return length


# How much of a refused body is read (and dropped) before the 413 goes out, and for how long:
# answering while the client still sends makes the server close a socket with unread data,
# and the kernel then resets the connection before the client has read the answer (NGINX's
# "lingering close" exists for this). Past these bounds the client may see the reset.
DRAIN_BYTES: Final = 1 << 20
DRAIN_S: Final = 0.5


async def discard_body(receive: Receive) -> None:
    """Read and drop the rest of a refused body, within `DRAIN_BYTES` and `DRAIN_S`."""
    budget = DRAIN_BYTES
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(DRAIN_S):
            while budget > 0:
                message = await receive()
                if message["type"] != "http.request":
                    return
                budget -= len(message.get("body", b""))
                if not message.get("more_body", False):
                    return


async def read_body(receive: Receive, limit: int, deadlines: ReadDeadlines | None) -> bytes:
    """Read the whole body, refusing it as soon as it crosses `limit`.

    Args:
        deadlines: the read timeout for the whole body; None for none (uvicorn has no
            read timeout of its own, so the shim always passes one).

    Raises:
        PayloadTooLarge: more than `limit` bytes arrived.
        RequestTimeout: the body did not arrive within the timeout.
        ClientGone: the client disconnected.
    """
    if deadlines is None:
        return await _read(receive, limit)
    return await deadlines.run(_read(receive, limit))


async def _read(receive: Receive, limit: int) -> bytes:
    message = await receive()
    if message["type"] != "http.request":
        raise ClientGone
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):  # the common case: one message
        if len(body) > limit:
            raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes")
        return body
    return await _read_rest(receive, bytearray(body), limit)


async def _read_rest(receive: Receive, buffer: bytearray, limit: int) -> bytes:
    while True:
        if len(buffer) > limit:
            await discard_body(receive)  # so that the client reads the 413
            raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes")
        message = await receive()
        if message["type"] != "http.request":
            raise ClientGone
        buffer += message.get("body", b"")
        if not message.get("more_body", False):
            if len(buffer) > limit:
                raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes")
            return bytes(buffer)
