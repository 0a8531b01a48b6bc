"""The spans behind the OpenTelemetry API: a tracer provider at a tenth of the SDK's cost.

Everything that makes or reads a span speaks the OpenTelemetry API (`opentelemetry-api`):
`Tracing` in `tracing.py`, the Redis instrumentation, the W3C propagator, log lines reading
the current span. This module is what stands behind that API when tracing is on, in place of
`opentelemetry-sdk`'s `TracerProvider`.

Why not the SDK: a request traced at sampling 1.0 makes four spans or more (shim server,
NATS client, worker, handle, one per Redis command), and one SDK
span costs about as much to start and end as a whole hop of the request: measured on one
machine (`docs/observability.md`, "What a span costs"), 50 µs to start and end one SDK span
and 46 µs to encode it for OTLP in the export thread, against 3 to 6 µs and 2 µs here. With the
SDK, tracing every request cut throughput to a third; the target is a loss of 15% at most.
What the SDK spends it on — attribute validation and limits, a lock per span, a processor
chain, protobuf objects built field by field — buys nothing this gateway uses.

What is kept: the API's `Span`, `SpanContext` and context (so instrumentation written for the
API works unchanged), parent-based sampling (a span follows its parent's decision; a root is
recorded only where a request enters, see `_records_root`), the OTLP data model. The request
path also keeps its current trace in `CURRENT`, a context variable of its own: one read
finds a step's parent, and a trace that is not recorded (`CarriedContext`) is carried there
alone. Spans end in a `sink`: `otlp.OtlpExporter` batches and exports them,
`tracing_sdk.SdkExporterSink` hands them to an SDK `SpanExporter` (the tests' in-memory one).
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar, Token
from typing import Final, NamedTuple

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import (
    INVALID_SPAN,
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import AnyValue, Attributes

from nexus_bus.observability.bounds import bounded_traceback, cut, text_of

__all__ = [
    "CURRENT",
    "CarriedContext",
    "LeanSpan",
    "LeanTracer",
    "LeanTracerProvider",
    "SpanSink",
    "current_parent",
]

SpanSink = Callable[["LeanSpan"], None]  # takes each span as it ends

_SAMPLED: Final = TraceFlags(TraceFlags.SAMPLED)
_UNSAMPLED: Final = TraceFlags(TraceFlags.DEFAULT)
_random_bits: Final = random.getrandbits
_NO_STATE: Final = TraceState()
_ENTRY_KINDS: Final = frozenset({SpanKind.SERVER, SpanKind.CONSUMER, SpanKind.PRODUCER})
_NEXUS_OP: Final = "nexus.op"  # on the spans of a request's own hops


class LeanSpan(trace.Span):
    """A recorded span: what OTLP exports of it, and nothing else.

    Ids are kept as integers and the API's `SpanContext` is made only when asked for (most
    spans are never asked). Used as a context manager (`Tracing.span` and `step`), the span
    is current inside the block and ends when it leaves; an exception escaping the block is
    recorded and marks it an error. Current means current in `CURRENT`, where the request
    path and this module look; in OpenTelemetry's context as well only when `api_current`
    (application code runs in the block and may look there): making a context current there
    costs more than the rest of the span (1.5 of 2.7 µs in a loop). `scope` is the
    instrumentation scope (the tracer's name and version) it was made by. Not thread-safe: a
    span belongs to the task that made it.
    """

    __slots__ = (
        "_api_current",
        "_context",
        "_current",
        "_sink",
        "_token",
        "attributes",
        "end_time",
        "events",
        "kind",
        "links",
        "name",
        "parent_id",
        "remote_parent",
        "scope",
        "span_id",
        "start_time",
        "status_code",
        "status_message",
        "trace_id",
        "trace_state",
    )  # fmt: skip

    sampled = True  # for `Tracing`: a span of ours is recorded, so its trace is sampled
    remote = False  # and it is this process's, not a caller's

    def __init__(
        self,
        name: str,
        trace_id: int,
        parent_id: int,
        remote_parent: bool,
        trace_state: TraceState | None,
        kind: SpanKind,
        attributes: dict[str, AnyValue],
        scope: tuple[str, str],
        sink: SpanSink,
        links: Sequence[Link] = (),
        start_time: int | None = None,
        api_current: bool = True,
    ) -> None:
        self.name = name
        self.trace_id = trace_id
        self.span_id = _random_bits(64) or 1
        self.parent_id = parent_id  # 0: a root
        self.remote_parent = remote_parent
        self.trace_state = trace_state
        self.kind = kind
        self.attributes = attributes
        # (name, time, attributes or None: most events have none)
        self.events: list[tuple[str, int, Mapping[str, AnyValue] | None]] | None = None
        self.links = links
        self.status_code = StatusCode.UNSET
        self.status_message: str | None = None
        self.scope = scope
        self._sink = sink
        self._context: SpanContext | None = None
        self._api_current = api_current
        self._token: object = None
        self._current: Token[LeanSpan | CarriedContext | None] | None = None
        self.end_time: int | None = None
        self.start_time = start_time if start_time is not None else time.time_ns()

    def __enter__(self) -> LeanSpan:
        if self._api_current:
            self._token = otel_context.attach(trace.set_span_in_context(self))
        self._current = CURRENT.set(self)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, _: object
    ) -> None:
        try:
            if error is not None and self.end_time is None:
                self.record_exception(error, escaped=True)
                self.set_status(StatusCode.ERROR, f"{kind.__name__}: {text_of(error)}")  # type: ignore[union-attr]
            self.end()
        finally:
            CURRENT.reset(self._current)  # type: ignore[arg-type]
            if self._token is not None:
                otel_context.detach(self._token)  # type: ignore[arg-type]

    def end(self, end_time: int | None = None) -> None:
        """Record the end and hand the span to the sink; a second call does nothing."""
        if self.end_time is None:
            self.end_time = end_time if end_time is not None else time.time_ns()
            self._sink(self)

    def get_span_context(self) -> SpanContext:
        context = self._context
        if context is None:
            context = self._context = SpanContext(
                self.trace_id, self.span_id, False, _SAMPLED, self.trace_state or _NO_STATE
            )
        return context

    @property
    def parent(self) -> SpanContext | None:
        """The parent's context (None for a root)."""
        if not self.parent_id:
            return None
        return SpanContext(
            self.trace_id, self.parent_id, self.remote_parent, _SAMPLED,
            self.trace_state or _NO_STATE,
        )  # fmt: skip

    def set_attributes(self, attributes: Mapping[str, AnyValue]) -> None:
        if self.end_time is None:
            self.attributes.update(_kept(attributes))

    def set_attribute(self, key: str, value: AnyValue) -> None:
        if self.end_time is None:
            self.attributes[key] = tuple(value) if type(value) is list else value

    def add_event(
        self, name: str, attributes: Attributes = None, timestamp: int | None = None
    ) -> None:
        if self.end_time is None:
            if self.events is None:
                self.events = []
            when = timestamp if timestamp is not None else time.time_ns()
            self.events.append((name, when, dict(_kept(attributes)) if attributes else None))

    def update_name(self, name: str) -> None:
        if self.end_time is None:
            self.name = name

    def is_recording(self) -> bool:
        return self.end_time is None

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        """As the SDK does: OK is final, and only an error carries a description."""
        if self.end_time is not None or self.status_code is StatusCode.OK:
            return
        if isinstance(status, Status):
            code, description = status.status_code, status.description
        else:
            code = status
        self.status_code = code
        if code is not StatusCode.ERROR:
            self.status_message = None
        else:  # an exception's text (a whole request, maybe): bounded
            self.status_message = cut(description) if description else description

    def record_exception(
        self,
        exception: BaseException,
        attributes: Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        """An `exception` event with the semantic conventions' attributes."""
        fields: dict[str, AnyValue] = {
            "exception.type": type(exception).__qualname__,
            "exception.message": cut(text_of(exception)),
            "exception.stacktrace": bounded_traceback(exception),
            "exception.escaped": str(escaped),
        }
        fields.update(attributes or {})
        self.add_event("exception", fields, timestamp)


def _kept(attributes: Mapping[str, AnyValue]) -> Mapping[str, AnyValue]:
    """`attributes` as a span keeps them: a list value copied to a tuple, since a span is
    encoded after it ends (in runs, see `otlp.OtlpExporter.on_end`) and what it holds must
    not change meanwhile; other values are immutable already."""
    if list in set(map(type, attributes.values())):
        return {k: tuple(v) if type(v) is list else v for k, v in attributes.items()}
    return attributes


class CarriedContext:
    """A trace current with no span of this process recording it: a caller's trace that is
    not sampled, a new trace left out by the sampling ratio, or a caller's span continued
    (`Tracing.continued`). Its ids are what the next hop's `traceparent` carries.

    Made current for a block in `CURRENT` only, not in OpenTelemetry's context: that takes
    one context-variable write instead of a new context, and what reads OpenTelemetry's
    context (the Redis instrumentation) then sees no span, which for a trace that is not
    sampled records the same nothing.
    """

    __slots__ = ("_token", "remote", "sampled", "span_id", "trace_id", "trace_state")

    def __init__(
        self,
        trace_id: int,
        span_id: int,
        sampled: bool,
        trace_state: TraceState | None,
        remote: bool,
    ) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.sampled = sampled
        self.trace_state = trace_state
        self.remote = remote
        self._token: Token[LeanSpan | CarriedContext | None] | None = None

    def __enter__(self) -> None:
        self._token = CURRENT.set(self)

    def __exit__(self, *_: object) -> None:
        CURRENT.reset(self._token)  # type: ignore[arg-type]


# What a block of nexus-bus's request path runs in: a span of ours, a carried context, or
# None (then OpenTelemetry's current span, if any, is an application's own).
CURRENT: ContextVar[LeanSpan | CarriedContext | None] = ContextVar("nexus_trace", default=None)


class _Parent(NamedTuple):
    """What a new span needs of a parent that is neither ours nor carried: an application's
    span, or one in a context passed to `start_span`."""

    trace_id: int
    span_id: int
    sampled: bool
    trace_state: TraceState | None
    remote: bool


def current_parent(
    context: otel_context.Context | None = None,
) -> LeanSpan | CarriedContext | _Parent | None:
    """The parent of a span started now: in `context` when one is given (the API's rule),
    else the request path's current span or carried trace (`CURRENT`), else the span an
    application made current through the OpenTelemetry API (a Python caller's own trace
    continues); None outside any."""
    if context is None:
        current = CURRENT.get()
        if current is not None:
            return current
    span = trace.get_current_span(context)
    if isinstance(span, LeanSpan):
        return span
    span_context = span.get_span_context()
    if not span_context.is_valid:
        return None
    return _Parent(
        span_context.trace_id, span_context.span_id, span_context.trace_flags.sampled,
        span_context.trace_state or None, span_context.is_remote,
    )  # fmt: skip


class _Current:
    """`start_as_current_span`'s context manager for a span this module did not make (one
    recording nothing): current inside the block, ended when it leaves."""

    __slots__ = ("_end", "_span", "_token")

    def __init__(self, span: trace.Span, end: bool) -> None:
        self._span = span
        self._end = end
        self._token: object = None

    def __enter__(self) -> trace.Span:
        self._token = otel_context.attach(trace.set_span_in_context(self._span))
        return self._span

    def __exit__(self, *_: object) -> None:
        if self._end:
            self._span.end()
        otel_context.detach(self._token)  # type: ignore[arg-type]


class LeanTracer(trace.Tracer):
    """Makes `LeanSpan`s for one instrumentation scope."""

    def __init__(self, scope: tuple[str, str], sink: SpanSink) -> None:
        self._scope = scope
        self._sink = sink

    def open(
        self,
        name: str,
        kind: SpanKind,
        attributes: Attributes,
        trace_id: int,
        parent_id: int = 0,
        remote_parent: bool = False,
        trace_state: TraceState | None = None,
        api_current: bool = False,
    ) -> LeanSpan:
        """A recorded span of `trace_id` under `parent_id` (0: the trace's root), sampled
        already: the fast path `Tracing` takes, with no context lookup. Current in
        OpenTelemetry's context too only with `api_current` (see `LeanSpan`)."""
        return LeanSpan(
            name, trace_id, parent_id, remote_parent, trace_state, kind,
            dict(_kept(attributes)) if attributes else {}, self._scope, self._sink,
            api_current=api_current,
        )  # fmt: skip

    def start_span(
        self,
        name: str,
        context: otel_context.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> trace.Span:
        """A child of the span current in `context` taking its sampling decision, or a new
        trace where a request enters (see `_records_root`); else a span recording nothing."""
        parent = current_parent(context)
        if parent is None:
            if not _records_root(kind, attributes):
                return INVALID_SPAN
            trace_id, parent_id, remote, state = _random_bits(128) or 1, 0, False, None
        elif not parent.sampled:
            state = parent.trace_state or _NO_STATE
            unsampled = SpanContext(
                parent.trace_id, parent.span_id, parent.remote, _UNSAMPLED, state
            )
            return NonRecordingSpan(unsampled)
        else:
            trace_id, parent_id = parent.trace_id, parent.span_id
            remote, state = parent.remote, parent.trace_state
        return LeanSpan(
            name, trace_id, parent_id, remote, state, kind,
            dict(_kept(attributes)) if attributes else {}, self._scope, self._sink,
            links or (), start_time,
        )  # fmt: skip

    def start_as_current_span(  # type: ignore[override]
        self,
        name: str,
        context: otel_context.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> contextlib.AbstractContextManager[trace.Span]:
        """`start_span`, current for a `with` block (a class, not a generator: half the cost)."""
        span = self.start_span(name, context, kind, attributes, links, start_time)
        if isinstance(span, LeanSpan) and end_on_exit:
            return span
        return _Current(span, end_on_exit)


def _records_root(kind: SpanKind, attributes: Attributes) -> bool:
    """Whether a span with no parent starts a recorded trace.

    `Tracing.span` has applied the sampling ratio before it asks for a request's root span (a
    trace left out never reaches the tracer), so such a root is recorded. A client or internal
    root that the gateway did not make (a Redis command outside any request; the gateway marks
    its own hops with `nexus.op`) is background work, dropped rather than exported as a trace
    of one span.
    """
    return kind in _ENTRY_KINDS or bool(attributes and _NEXUS_OP in attributes)


class LeanTracerProvider(trace.TracerProvider):
    """The process's tracers, all ending their spans in `sink`.

    `resource` names the process (`service.name`, `service.instance.id`, ...); `flush` and
    `close` are the sink's (export what is buffered; and stop).
    """

    def __init__(
        self,
        resource: Mapping[str, str],
        sink: SpanSink,
        flush: Callable[[], object] = lambda: None,
        close: Callable[[], object] = lambda: None,
    ) -> None:
        self.resource = dict(resource)
        self._sink = sink
        self._flush = flush
        self._close = close
        self._tracers: dict[tuple[str, str], LeanTracer] = {}

    def get_tracer(
        self,
        instrumenting_module_name: str,
        instrumenting_library_version: str | None = None,
        schema_url: str | None = None,
        attributes: Attributes = None,
    ) -> LeanTracer:
        scope = (instrumenting_module_name, instrumenting_library_version or "")
        tracer = self._tracers.get(scope)
        if tracer is None:
            tracer = self._tracers[scope] = LeanTracer(scope, self._sink)
        return tracer

    def force_flush(self) -> None:
        """Export every span that has ended."""
        self._flush()

    def shutdown(self) -> None:
        """Export what is buffered and stop the sink."""
        self._close()
