"""OTLP over HTTP/protobuf for the tracer's spans: batched, in a thread, off the request path.

`OtlpExporter.on_end` queues a span (an append; every few dozen are encoded together, as
bytes); a thread sends what is queued every
`delay_s`, or as soon as `max_batch` spans wait, as one `ExportTraceServiceRequest` POSTed to
the endpoint (`/v1/traces` of an OpenTelemetry collector, Jaeger, Tempo). A batch refused
with 429, 502, 503 or 504, or meeting a connection error, is sent again after 1, 2, 4 s
while `timeout_s` lasts (the OTLP/HTTP specification's retryable answers); otherwise it is
dropped. While the collector is away at most `max_queue` spans wait and newer ones are
dropped and counted, so memory stays bounded and the request path never waits.

The encoding writes the protobuf wire format of `opentelemetry-proto`'s trace messages
directly, field by field, from the spans' own values: building the generated message objects
costs 15 µs a span and the SDK's encoder 46 µs, against 2 µs here (docs/observability.md,
"What a span costs"). `tests/unit/test_otlp.py` decodes what it writes with the official
generated classes, and compares it with what the SDK's encoder makes of the same spans.
"""

from __future__ import annotations

import atexit
import http.client
import random
import struct
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Final
from urllib.parse import urlsplit

from loguru import logger  # not .logging's: it imports the tracing that imports this
from opentelemetry.util.types import AnyValue, Attributes

from nexus_bus.observability.metrics import METRICS
from nexus_bus.observability.tracer import LeanSpan

__all__ = ["OtlpExporter", "encode_request", "encode_resource", "encode_span"]

_HEADERS: Final = {"Content-Type": "application/x-protobuf"}
_RETRYABLE: Final = frozenset({429, 502, 503, 504})
_FIXED64: Final = struct.Struct("<Q").pack
_DOUBLE: Final = struct.Struct("<d").pack
_IDS: Final = struct.Struct(">2sQQ2sQ").pack  # trace_id and span_id: raw big-endian bytes
_PARENT: Final = struct.Struct(">2sQ").pack
_TIMES: Final = struct.Struct("<BBBQBQ").pack  # kind; start and end times, fixed64
_LOW64: Final = (1 << 64) - 1
_BYTE: Final = [bytes((n,)) for n in range(128)]
_INT64: Final = 0xFFFF_FFFF_FFFF_FFFF  # a negative int64 is its two's complement
# Span.flags (fixed32): the is-remote bit is known (0x100), and the parent is remote (0x200).
_FLAGS_LOCAL: Final = b"\x85\x01" + struct.pack("<I", 0x100)
_FLAGS_REMOTE: Final = b"\x85\x01" + struct.pack("<I", 0x300)
_LINK_LOCAL: Final = b"\x35" + struct.pack("<I", 0x100)  # Link.flags, the same bits
_LINK_REMOTE: Final = b"\x35" + struct.pack("<I", 0x300)
_WARN_EVERY_S: Final = 60.0
_ENCODE_EVERY: Final = 32  # ended spans encoded together (see `OtlpExporter.on_end`)
# Bytes of spans in one request, whatever `max_batch` says: collectors refuse a request over
# their limit whole (the OpenTelemetry Collector's OTLP receivers: 4 MiB over gRPC, 20 MiB over
# HTTP), and a span of a failed request carries up to 40,960 characters of error text.
_MAX_BATCH_BYTES: Final = 4 * 1024 * 1024
# Bytes of encoded spans waiting, whatever `max_queue` says: with the collector away, 8192
# spans of failed requests would hold 100 to 330 MB in every process.
MAX_QUEUE_BYTES: Final = 64 * 1024 * 1024


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _BYTE[n]
    if n < 0x4000:  # a span's length, mostly
        return bytes(((n & 0x7F) | 0x80, n >> 7))
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field (a string, bytes or a nested message)."""
    return tag + _varint(len(payload)) + payload


def _any_value(value: AnyValue) -> bytes:
    """An `AnyValue` message (`common.proto`)."""
    if isinstance(value, str):
        return _field(b"\x0a", value.encode())
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + _varint(value & _INT64)
    if isinstance(value, float):
        return b"\x21" + _DOUBLE(value)
    if isinstance(value, bytes):
        return _field(b"\x3a", value)
    if isinstance(value, Sequence):
        return _field(b"\x2a", b"".join(_field(b"\x0a", _any_value(item)) for item in value))
    if isinstance(value, Mapping):
        return _field(b"\x32", b"".join(_key_value(b"\x0a", str(k), v) for k, v in value.items()))
    if value is None:
        return b""  # an empty AnyValue, as the SDK sends for None
    return _field(b"\x0a", str(value).encode())


# Text attributes as encoded before, by field tag and key: a request's spans repeat most of
# theirs (the operation, the transport, the route) from one request to the next. Each key
# keeps at most `_VALUES_PER_KEY` values, emptied when full, so a key whose values never
# repeat (a request id) churns a small table instead of crowding out the others and growing
# the process's working set. Only `str` and `int` values are kept, never a bool or a float:
# in a dict `True == 1 == 1.0`, and each must keep its own type on the wire.
_SEEN: dict[bytes, dict[str, dict[str | int, bytes]]] = {}
_VALUES_PER_KEY: Final = 64
_SEEN_MAX: Final = 4096  # keys (and span names): beyond, they are emptied and start again


def _attributes(tag: bytes, attributes: Mapping[str, AnyValue]) -> bytes:
    """Repeated `KeyValue` fields numbered by `tag`."""
    seen = _SEEN.get(tag)
    if seen is None:
        seen = _SEEN[tag] = {}
    parts = []
    for key, value in attributes.items():
        if type(value) is not str and type(value) is not int:
            parts.append(_key_value(tag, key, value))
            continue
        values = seen.get(key)
        if values is None:
            if len(seen) >= _SEEN_MAX:
                seen.clear()
            values = seen[key] = {}
        encoded = values.get(value)
        if encoded is None:
            encoded = _key_value(tag, key, value)
            if len(values) >= _VALUES_PER_KEY:
                values.clear()
            values[value] = encoded
        parts.append(encoded)
    return b"".join(parts)


def _key_value(tag: bytes, key: str, value: AnyValue) -> bytes:
    return _field(tag, _field(b"\x0a", key.encode()) + _field(b"\x12", _any_value(value)))


def encode_span(span: LeanSpan) -> bytes:
    """A `ScopeSpans` message (`trace.proto`) holding `span` and its scope, as the
    `scope_spans` field of a `ResourceSpans`."""
    trace_id, parent_id = span.trace_id, span.parent_id
    name, attributes, events = span.name, span.attributes, span.events
    parts = [_IDS(b"\x0a\x10", trace_id >> 64, trace_id & _LOW64, b"\x12\x08", span.span_id)]
    if span.trace_state:
        parts.append(_field(b"\x1a", span.trace_state.to_header().encode()))
    if parent_id:
        parts.append(_PARENT(b"\x22\x08", parent_id))
    encoded_name = _NAMES.get(name)
    if encoded_name is None:
        if len(_NAMES) >= _SEEN_MAX:
            _NAMES.clear()
        encoded_name = _NAMES[name] = _field(b"\x2a", name.encode())
    parts += (
        encoded_name,
        # The API's kinds count from 0, OTLP's from 1 (0 is "unspecified").
        _TIMES(0x30, span.kind._value_ + 1, 0x39, span.start_time, 0x41, span.end_time or 0),
    )  # fmt: skip
    if attributes:
        parts.append(_attributes(b"\x4a", attributes))
    if events:
        _add_events(parts, events)
    for link in span.links:
        linked = link.context
        encoded = (
            b"\x0a\x10" + linked.trace_id.to_bytes(16, "big")
            + b"\x12\x08" + linked.span_id.to_bytes(8, "big")
            + _attributes(b"\x22", link.attributes or {})
            + (_LINK_REMOTE if linked.is_remote else _LINK_LOCAL)
        )  # fmt: skip
        parts.append(_field(b"\x6a", encoded))
    status_code, status_message = span.status_code._value_, span.status_message
    if status_code or status_message:  # UNSET is 0, and an empty Status says so
        status = _field(b"\x12", status_message.encode()) if status_message else b""
        parts.append(_field(b"\x7a", status + b"\x18" + _BYTE[status_code]))
    else:
        parts.append(b"\x7a\x00")
    parts.append(_FLAGS_REMOTE if span.remote_parent else _FLAGS_LOCAL)
    scope = _SCOPES.get(span.scope) or _encode_scope(span.scope)
    body = b"".join(parts)
    size = _varint(len(body))
    # ScopeSpans { scope, spans: [Span] }, joined once rather than nested field by field.
    length = _varint(len(scope) + 1 + len(size) + len(body))
    return b"".join((b"\x12", length, scope, b"\x12", size, body))


def _add_events(parts: list[bytes], events: Iterable[tuple[str, int, Attributes]]) -> None:
    for name, when, attributes in events:
        if attributes:
            event = b"\x09" + _FIXED64(when) + _field(b"\x12", name.encode())
            parts.append(_field(b"\x5a", event + _attributes(b"\x1a", attributes)))
            continue
        # An event without attributes is the same bytes around its time: kept by name.
        around = _EVENTS.get(name)
        if around is None:
            if len(_EVENTS) >= _SEEN_MAX:  # names an application makes up as it goes
                _EVENTS.clear()
            encoded = _field(b"\x12", name.encode())
            around = _EVENTS[name] = (b"\x5a" + _varint(9 + len(encoded)) + b"\x09", encoded)
        parts += (around[0], _FIXED64(when), around[1])


def _encode_scope(scope: tuple[str, str]) -> bytes:
    """The `scope` field of a `ScopeSpans` (the tracer's name and version), kept once made."""
    name, version = scope
    encoded = _field(b"\x0a", name.encode())
    if version:
        encoded += _field(b"\x12", version.encode())
    _SCOPES[scope] = _field(b"\x0a", encoded)
    return _SCOPES[scope]


# Span names and the events without attributes, encoded before: a request's spans and events
# repeat theirs (span names are routes and subjects, never client text).
_NAMES: dict[str, bytes] = {}
_EVENTS: dict[str, tuple[bytes, bytes]] = {}
_SCOPES: dict[tuple[str, str], bytes] = {}  # instrumentation scopes, encoded once (a handful)


def encode_resource(attributes: Mapping[str, str]) -> bytes:
    """The `resource` field of a `ResourceSpans`: the process's name and instance."""
    return _field(b"\x0a", _attributes(b"\x0a", attributes))


def encode_request(resource: bytes, spans: Iterable[bytes]) -> bytes:
    """An `ExportTraceServiceRequest` of encoded `spans` (`encode_span`) from one process.

    Each span travels in a `ScopeSpans` of its own (a few bytes of scope repeated, which
    receivers merge), so that it is encoded once, as it ends, into bytes the exporter can
    keep without the garbage collector ever tracking them.
    """
    return _field(b"\x0a", resource + b"".join(spans))


def _connection(endpoint: str, timeout_s: float) -> http.client.HTTPConnection:
    """A kept-alive connection to the collector (TLS for `https://`, verified against the
    system's certificate authorities)."""
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL for OTLP export: {endpoint!r}")
    if parts.scheme == "https":
        return http.client.HTTPSConnection(parts.hostname, parts.port, timeout=timeout_s)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)


class OtlpExporter:
    """Sends ended spans to `endpoint` in batches from a thread of its own.

    A tracer provider's sink (`on_end`) and its `flush` and `close`; `close` runs at exit
    too, so the spans of a process that stops are not lost.
    """

    def __init__(
        self,
        endpoint: str,
        resource: Mapping[str, str],
        *,
        timeout_s: float,
        delay_s: float = 1.0,
        max_batch: int = 2048,
        max_queue: int = 8192,
    ) -> None:
        self.endpoint = endpoint
        self.dropped = 0  # spans not exported: the queue was full, or their batch failed
        self.queued_bytes = 0  # of the encoded spans in the queue
        self._resource = encode_resource(resource)
        self._timeout_s = timeout_s
        self._delay_s = delay_s
        self._max_batch = max_batch
        self._max_queue = max_queue
        self._pending: deque[LeanSpan] = deque()  # ended, not yet encoded
        self._encode_every = min(_ENCODE_EVERY, max_batch)  # a full batch leaves at once
        self._queue: deque[bytes] = deque()  # encoded, waiting for their batch
        self._wake = threading.Event()
        self._sending = threading.Lock()  # one batch on the wire at a time
        self._dropping = threading.Lock()
        self._queueing = threading.Lock()  # `queued_bytes`, from both threads
        self._closed = False
        self._warned_at = -_WARN_EVERY_S
        self._connection = _connection(endpoint, timeout_s)
        self._path = urlsplit(endpoint).path or "/v1/traces"
        self._thread = threading.Thread(target=self._run, name="nexus-otlp", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def on_end(self, span: LeanSpan) -> None:
        """Take `span` to be exported; never blocks.

        Spans are encoded a few dozen at a time (`_ENCODE_EVERY`), here or by `flush`: one
        after another, the encoder's code and data stay in the CPU's caches, and a span costs
        less than half of what it costs encoded alone between the request path's own work
        (measured over the worker's dispatch in a loop: 11 µs a request less, of 43 µs).
        What then waits for the batch is bytes, which the garbage collector does not track:
        spans kept as objects for up to `delay_s` reached its oldest generation and made the
        worker's full collections several times as frequent (from 4 to 31 µs a request).
        """
        if self._closed:
            self._count_dropped(1)
            return
        pending = self._pending
        pending.append(span)
        if len(pending) >= self._encode_every:
            self._encode_pending()

    def _encode_pending(self) -> None:
        """Move the ended spans to the queue, encoded; a span is dropped and counted when the
        queue is full or it cannot be encoded (an attribute no OTLP value holds), never
        raised into the request that ended it. Safe from two threads at once."""
        pending, queue = self._pending, self._queue
        while pending:
            try:
                span = pending.popleft()
            except IndexError:  # the other thread took the last one
                return
            if len(queue) >= self._max_queue:
                self._count_dropped(1)
                continue
            try:
                encoded = encode_span(span)
            except Exception as error:
                self._lost(1, f"span {span.name!r} not encodable: {type(error).__name__}: {error}")
                continue
            with self._queueing:
                if self.queued_bytes + len(encoded) > MAX_QUEUE_BYTES:
                    encoded = b""
                else:
                    self.queued_bytes += len(encoded)
            if not encoded:
                self._count_dropped(1)
                continue
            queue.append(encoded)
            if len(queue) == self._max_batch:
                self._wake.set()

    def flush(self) -> None:
        """Send every span ended by now, in batches, before returning."""
        with self._sending:
            self._encode_pending()
            queue = self._queue
            while queue:
                batch = self._next_batch()
                if not self._send(batch) and self._closed:
                    # Exiting with the collector away: one failed try is enough, or the
                    # process would wait a timeout for every batch still queued.
                    self._lost(len(queue), "the process is exiting")
                    queue.clear()
                    with self._queueing:
                        self.queued_bytes = 0

    def _next_batch(self) -> list[bytes]:
        """The spans of the next request, taken from the queue: up to `max_batch` of them and
        `_MAX_BATCH_BYTES` (one span at least, whatever its size)."""
        queue = self._queue
        batch = [queue.popleft()]
        size = len(batch[0])
        while queue and len(batch) < self._max_batch and size + len(queue[0]) <= _MAX_BATCH_BYTES:
            span = queue.popleft()
            batch.append(span)
            size += len(span)
        with self._queueing:
            self.queued_bytes -= size
        return batch

    def close(self) -> None:
        """Send what is queued and stop the thread; a second call does nothing."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        self._thread.join(self._timeout_s + 1.0)
        self.flush()
        # A span another thread was encoding as the last batch left: counted, not lost silently.
        leftover = len(self._pending) + len(self._queue)
        if leftover:
            self._pending.clear()
            self._queue.clear()
            self.queued_bytes = 0
            self._lost(leftover, "they ended as the exporter closed")
        self._connection.close()
        atexit.unregister(self.close)

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(self._delay_s)
            self._wake.clear()
            self.flush()

    def _send(self, batch: list[bytes]) -> bool:
        """POST `batch`, retrying what may be retried within the timeout; whether it went."""
        body = encode_request(self._resource, batch)
        deadline = time.monotonic() + self._timeout_s
        backoff = 1.0
        while True:
            try:
                self._connection.request("POST", self._path, body, _HEADERS)
                answer = self._connection.getresponse()
                answer.read()
            except (OSError, http.client.HTTPException) as error:
                self._connection.close()  # the next request opens a new connection
                retryable, problem = True, f"{type(error).__name__}: {error}"
            else:
                if 200 <= answer.status < 300:
                    return True
                retryable, problem = answer.status in _RETRYABLE, f"HTTP {answer.status}"
            pause = backoff * random.uniform(0.8, 1.2)
            if not retryable or self._closed or time.monotonic() + pause > deadline:
                self._lost(len(batch), problem)
                return False
            time.sleep(pause)
            backoff *= 2

    def _count_dropped(self, spans: int) -> None:
        with self._dropping:  # from the request path's thread and the exporter's
            self.dropped += spans
        METRICS.trace_spans_dropped.inc(spans)

    def _lost(self, spans: int, problem: str) -> None:
        self._count_dropped(spans)
        now = time.monotonic()
        if now - self._warned_at >= _WARN_EVERY_S:  # once a minute while it lasts
            self._warned_at = now
            logger.warning(
                "traces not exported to {}: {} ({} spans dropped so far)",
                self.endpoint,
                problem,
                self.dropped,
            )
