"""Request metadata carried in headers: request ids, W3C trace context, deadlines.

Pure functions; time and randomness come in as arguments. Nothing a client sends is trusted
raw: malformed ids and trace contexts are replaced, oversized or CR/LF-bearing header values
are refused before they can reach the NATS protocol line.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Mapping
from typing import Final, NamedTuple

from nexus_bus.constants import (
    H_AUTHORIZATION,
    H_CLIENT_IP,
    H_CONTENT_TYPE,
    H_DEADLINE,
    H_IDEMPOTENCY_KEY,
    H_REQUEST_ID,
    H_TIMEOUT_MS,
    H_TRACEPARENT,
    H_TRACESTATE,
)
from nexus_bus.errors import HeadersTooLarge, InvalidRequest, PayloadTooLarge
from nexus_bus.observability.traceparent import traceparent_fields

# Guards are matched with fullmatch(): a `$` anchor would let a final newline through.
_REQUEST_ID: Final = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_HEADER_NAME: Final = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,128}")
_KNOWN_NAMES: Final = frozenset(
    {H_AUTHORIZATION, H_REQUEST_ID, H_TRACEPARENT, H_TRACESTATE, H_TIMEOUT_MS, H_DEADLINE,
     H_IDEMPOTENCY_KEY, H_CONTENT_TYPE, H_CLIENT_IP}
)
_ZERO_TRACE: Final = "0" * 32
_ZERO_SPAN: Final = "0" * 16


# Request and trace ids need uniqueness, not secrecy: a PRNG seeded from the OS avoids a
# system call per id on the hot path.
_rng: Final = random.Random(os.urandom(32))


def is_ascii_digits(value: str) -> bool:
    """Whether `value` is made of the digits 0-9 only.

    `str.isdigit()` alone also accepts characters such as "²" that `int()` refuses: a header
    carrying one must be a 400, never an exception.
    """
    return value.isascii() and value.isdigit()


def new_request_id() -> str:
    """A fresh random request id (24 hex characters)."""
    return f"{_rng.getrandbits(96):024x}"


def clean_request_id(value: str | None) -> str:
    """The client's request id when well-formed, otherwise a fresh one."""
    if value and _REQUEST_ID.fullmatch(value):
        return value
    return new_request_id()


class TraceContext(NamedTuple):
    """A W3C trace context: the trace, this hop's span, and the sampled flag.

    A named tuple: immutable, and built several times faster than a frozen dataclass, which
    matters at two per request.
    """

    trace_id: str
    span_id: str
    flags: str = "01"

    @property
    def traceparent(self) -> str:
        """The `traceparent` header value."""
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"

    def child(self) -> TraceContext:
        """The context of a new span in the same trace."""
        return TraceContext(self.trace_id, _span_id(), self.flags)


def _span_id() -> str:
    return f"{_rng.getrandbits(64) or 1:016x}"


def new_trace() -> TraceContext:
    """A new root trace context."""
    return TraceContext(f"{_rng.getrandbits(128) or 1:032x}", _span_id())


def new_traceparent() -> str:
    """The `traceparent` of a new root trace (`new_trace().traceparent`, in one draw)."""
    bits = f"{_rng.getrandbits(192):048x}"
    trace_id, span_id = bits[:32], bits[32:]
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:  # 2**-64: never, but never invalid
        return new_trace().traceparent
    return f"00-{trace_id}-{span_id}-01"


def parse_traceparent(value: str | None) -> TraceContext | None:
    """Parse a `traceparent` value; None when absent or invalid (`traceparent_fields`, the
    rule the tracer reads it by too)."""
    fields = traceparent_fields(value)
    return None if fields is None else TraceContext(*fields)


def trace_from_headers(headers: Mapping[str, str]) -> TraceContext:
    """The caller's trace continued with a new span, or a new trace when it sent none."""
    parent = parse_traceparent(headers.get(H_TRACEPARENT))
    return parent.child() if parent else new_trace()


class LazyTrace:
    """This hop's trace context, worked out from the request headers when first asked for.

    Most requests never log and their handlers never look at the trace: parsing the
    `traceparent` and drawing a span id for each was 8.7% of a worker's instructions per
    request (docs/benchmarks.md). The
    log context and the handler's `RequestContext` share one, so they agree on the trace.
    """

    __slots__ = ("_headers", "_trace", "recorded")

    def __init__(self, headers: Mapping[str, str]) -> None:
        self._headers = headers
        self._trace: TraceContext | None = None
        # The trace id of this hop's span when tracing recorded one: what a metric exemplar
        # points at (a trace that exists).
        self.recorded: str | None = None

    def get(self) -> TraceContext:
        """The trace context (`trace_from_headers`, computed once)."""
        trace = self._trace
        if trace is None:
            trace = self._trace = trace_from_headers(self._headers)
        return trace

    def resolve(self) -> str:
        """The trace id, for a log line."""
        return self.get().trace_id


def budget_headers(timeout_s: float, now_ms: int) -> dict[str, str]:
    """`Nexus-Timeout-Ms` and `Nexus-Deadline` for a request sent now with this budget."""
    budget_ms = max(1, int(timeout_s * 1000))
    return {H_TIMEOUT_MS: str(budget_ms), H_DEADLINE: str(now_ms + budget_ms)}


SPENT_DEADLINE_MS: Final = 0  # an epoch-ms deadline that has passed, whatever the clock skew


def deadline_ms(headers: Mapping[str, str], now_ms: int, default_budget_ms: int) -> int:
    """The absolute deadline (epoch ms) of a received request.

    `Nexus-Deadline` wins: a relative budget alone cannot tell that a request sat in a
    reconnect buffer. A lone `Nexus-Timeout-Ms` counts from receipt; neither gives the default.
    A `Nexus-Timeout-Ms` of 0 says the caller's budget was spent when it sent the request:
    `SPENT_DEADLINE_MS`, whatever `Nexus-Deadline` says (counted from receipt, a 0 budget
    would still run within the allowed clock skew). Malformed values are ignored, never trusted.
    """
    budget = headers.get(H_TIMEOUT_MS)
    if budget and budget.isascii() and budget.strip("0") == "":
        return SPENT_DEADLINE_MS
    for name, base in ((H_DEADLINE, 0), (H_TIMEOUT_MS, now_ms)):
        raw = headers.get(name)
        if raw and len(raw) <= 15 and is_ascii_digits(raw):
            return base + int(raw)
    return now_ms + default_budget_ms


_HEADER_BLOCK_OVERHEAD: Final = 12  # "NATS/1.0\r\n" and the final "\r\n"
_HEADER_LINE_OVERHEAD: Final = 4  # ": " and "\r\n"


def headers_size(headers: Mapping[str, str]) -> int:
    """The bytes a header set takes on the wire; it counts toward the server's max_payload.

    nats-py checks only the payload against max_payload; the server closes the whole
    connection when payload plus headers exceed it, so every publish that could come near the
    limit checks this sum first.
    """
    return _HEADER_BLOCK_OVERHEAD + sum(
        len(k) + len(v) + _HEADER_LINE_OVERHEAD for k, v in headers.items()
    )


# What nats-py's JetStream API adds to a publish on its own, where the caller cannot see it:
# in nats-py 2.16 a KV `create()` or `update()` adds `Nats-Expected-Last-Subject-Sequence`
# (59 bytes with a 20-digit revision, the longest a uint64 has), `js.publish(..., stream=S)`
# adds `Nats-Expected-Stream: S` (36 bytes for NEXUS_EVENTS, 88 for a 64-character name), and
# either adds `Nats-TTL` when given a TTL (32 bytes at most). An allowance rather than the exact
# bytes: it costs a message 128 bytes of its max_payload, and a newer 2.x that adds a little
# more still cannot make the server close the connection.
JETSTREAM_HEADERS_ALLOWANCE: Final = 128


def check_publish_size(
    what: str,
    payload: bytes,
    headers: Mapping[str, str] | None,
    max_payload: int,
    *,
    jetstream: bool = False,
) -> None:
    """Refuse a publish that would exceed the server's max_payload once its headers count.

    nats-py compares only the payload with max_payload. The server counts the headers too,
    answers "Maximum Payload Violation" and closes the connection, and nats-py does not open
    it again: a worker would be off the bus for every request because of one value. So every
    publish that carries headers checks the sum first (a publish without any needs no check:
    nats-py's own one is then the server's).

    Args:
        what: what is published, for the error's detail ("put k", "job <id>").
        payload: the message body.
        headers: the headers handed to nats-py (None: none).
        max_payload: the connection's limit (`Client.max_payload`, the server's).
        jetstream: the publish goes through nats-py's JetStream API (`js.publish`, a KV
            `create()` / `update()`), which adds headers of its own: counted as
            `JETSTREAM_HEADERS_ALLOWANCE`.

    Raises:
        PayloadTooLarge: payload and headers exceed `max_payload`.
    """
    size = len(payload)
    if headers is not None or jetstream:
        size += headers_size(headers or {})
    if jetstream:
        size += JETSTREAM_HEADERS_ALLOWANCE
    if size > max_payload:
        raise PayloadTooLarge(
            f"{what}: {size} bytes, headers included, exceed the server's max_payload of "
            f"{max_payload}"
        )


def check_headers(headers: Mapping[str, str], *, max_value_bytes: int, max_total_bytes: int) -> int:
    """Refuse header sets that could break the NATS protocol or exceed its limits.

    Returns:
        The encoded size of the headers, for the `max_payload` check.

    Raises:
        InvalidRequest: a name or value with characters that are not allowed (CR, LF, NUL...).
        HeadersTooLarge: a value or the whole set is larger than allowed.
    """
    total = _HEADER_BLOCK_OVERHEAD  # headers_size(), added up in the same pass
    for name, value in headers.items():
        if name not in _KNOWN_NAMES and not _HEADER_NAME.fullmatch(name):
            raise InvalidRequest(f"invalid header name {name[:40]!r}")
        if not value.isprintable() or not value.isascii():
            raise InvalidRequest(f"header {name} has characters that are not allowed")
        size = len(value)
        if size > max_value_bytes:
            raise HeadersTooLarge(f"header {name} is longer than {max_value_bytes} bytes")
        total += len(name) + size + _HEADER_LINE_OVERHEAD
    if total > max_total_bytes:
        raise HeadersTooLarge(f"headers total {total} bytes, more than {max_total_bytes}")
    return total


def request_id_of(headers: Mapping[str, str]) -> str:
    """The request id of a received message, cleaned."""
    return clean_request_id(headers.get(H_REQUEST_ID))
