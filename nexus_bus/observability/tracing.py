"""Distributed tracing with OpenTelemetry: off unless an OTLP endpoint is configured.

`configure_tracing` sets up the process's tracer provider (`tracer.LeanTracerProvider`:
parent-based sampling, the ratio applied by `Tracing.span` to new traces; spans exported in
batches over OTLP/HTTP protobuf by `otlp.OtlpExporter`, imported only then) and keeps it in
`TRACING`. The request path asks `TRACING.enabled` once per hop and otherwise does nothing:
with tracing off no span object, context or header is made, so the cost is an attribute read.

The provider is this process's own, not OpenTelemetry's global one: a library must not take
the global slot from the application that imports it, and tests switch tracing on and off
in one process. The W3C `traceparent` the request path already carries is the propagation
format, so a span's trace id is the caller's trace id.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, Final

from opentelemetry.trace import (
    Span,
    SpanKind,
    Status,
    StatusCode,
)
from opentelemetry.trace.span import TraceState

from nexus_bus.config import TracingSettings
from nexus_bus.constants import H_TRACEPARENT, H_TRACESTATE
from nexus_bus.observability.bounds import cut
from nexus_bus.observability.traceparent import traceparent_fields
from nexus_bus.observability.tracer import (
    CURRENT,
    CarriedContext,
    LeanSpan,
    LeanTracer,
    LeanTracerProvider,
    current_parent,
)

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

__all__ = ["TRACING", "SpanKind", "Tracing", "configure_tracing", "mark_error"]

_NOTHING: Final = contextlib.nullcontext()
_MAX_ERROR_TYPE: Final = 256  # characters of an error answer's code kept as `error.type`
_random_bits: Final = random.getrandbits


class Tracing:
    """The process's tracer, or nothing; `TRACING` is the shared instance.

    The request path's own spans are made here directly (`tracer.LeanTracer.open`), with the
    W3C trace context parsed and written here: each is a few microseconds, and a request
    makes four or more of them (docs/observability.md, "What a span costs").
    """

    def __init__(self) -> None:
        self.enabled = False
        self.provider: LeanTracerProvider | None = None
        self._tracer: LeanTracer | None = None
        self._ratio = 1.0

    def install(self, provider: LeanTracerProvider, sample_ratio: float = 1.0) -> None:
        """Trace with `provider` from now on, recording `sample_ratio` of the traces that
        start here (`span` decides for a new trace; a span follows its parent's decision)."""
        self.provider = provider
        self._tracer = provider.get_tracer("nexus_bus")
        self._ratio = sample_ratio
        self.enabled = True

    def shutdown(self) -> None:
        """Export what is buffered and stop tracing."""
        provider, self.provider = self.provider, None
        self.enabled = False
        self._tracer = None
        if provider is not None:
            provider.shutdown()

    def span(
        self,
        name: str,
        *,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Mapping[str, Any] | None = None,
        parent_headers: Mapping[str, str] | None = None,
        application: bool = False,
    ) -> contextlib.AbstractContextManager[Span | None]:
        """An entry span (a request arriving or leaving): a child of `parent_headers`'
        `traceparent` (or of the current span), or the root of a new trace. `application`:
        application code may run in it, as in `step`.

        A shared do-nothing context manager when tracing is off. When the caller did not
        sample its trace, no span is made at all (it would record nothing), but its ids
        become current (`CarriedContext`) so that every span below knows the trace is not
        sampled and the next hop's `traceparent` continues it. A new trace is sampled here,
        at the process's ratio: one left out gets only its ids, which is most of what
        tracing at a low ratio costs a request.
        """
        tracer = self._tracer
        if tracer is None:
            return _NOTHING
        if parent_headers is not None:
            caller = _traceparent(parent_headers)
            if caller is not None:
                trace_id, span_id, sampled, state = caller
                if not sampled:
                    return CarriedContext(trace_id, span_id, False, state, True)
                return tracer.open(
                    name, kind, attributes, trace_id, span_id, True, state, application
                )
        else:
            parent = current_parent()
            if parent is not None:
                if not parent.sampled:
                    return _NOTHING
                return tracer.open(
                    name, kind, attributes, parent.trace_id, parent.span_id, parent.remote,
                    parent.trace_state, application,
                )  # fmt: skip
        if self._ratio < 1.0 and random.random() >= self._ratio:
            return CarriedContext(_random_bits(128) or 1, _random_bits(64) or 1, False, None, False)
        return tracer.open(
            name, kind, attributes, _random_bits(128) or 1, api_current=application
        )

    def step(
        self,
        name: str,
        *,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Mapping[str, Any] | None = None,
        application: bool = False,
    ) -> contextlib.AbstractContextManager[Span | None]:
        """A span for a step of a sampled request (a handler, a KV call); nothing outside
        one, so a step never starts a trace of its own. `application`: application code
        runs in the step (a handler), so the span is made current in OpenTelemetry's context
        too, where `trace.get_current_span()` and an application's own tracer look."""
        tracer = self._tracer
        if tracer is None:
            return _NOTHING
        current = CURRENT.get()
        if type(current) is LeanSpan:  # the common case first: a step of our own span
            return tracer.open(
                name, kind, attributes, current.trace_id, current.span_id, False,
                current.trace_state, application,
            )  # fmt: skip
        parent = current_parent()
        if parent is None or not parent.sampled:
            return _NOTHING
        return tracer.open(
            name, kind, attributes, parent.trace_id, parent.span_id, parent.remote,
            parent.trace_state, application,
        )  # fmt: skip

    def mark(self, name: str) -> contextlib.AbstractContextManager[None]:
        """A step of the request's own bookkeeping (authenticate, validate): an event named
        `name` on the current recorded span at the moment the step ends, however it ends
        (with `error.type` when it raised).

        Not a span of its own: these steps take a few microseconds on the hot path (a cached
        token, a small body), less than recording a span costs, and nothing runs below them
        that a span would parent (docs/observability.md, "What is recorded")."""
        if self._tracer is None:
            return _NOTHING
        current = CURRENT.get()
        if type(current) is not LeanSpan:
            return _NOTHING
        return _Mark(current, name)

    def inject(self, headers: MutableMapping[str, str]) -> None:
        """Write the current trace's `traceparent` (and `tracestate`) into `headers`."""
        if not self.enabled:
            return
        parent = current_parent()
        if parent is None:
            return
        flags = "01" if parent.sampled else "00"
        headers[H_TRACEPARENT] = f"00-{parent.trace_id:032x}-{parent.span_id:016x}-{flags}"
        if parent.trace_state:
            headers[H_TRACESTATE] = parent.trace_state.to_header()

    def continued(self, headers: Mapping[str, str]) -> contextlib.AbstractContextManager[None]:
        """Make the trace in `headers` current when none is (a caller outside any span)."""
        if not self.enabled or current_parent() is not None:
            return _NOTHING
        caller = _traceparent(headers)
        if caller is None:
            return _NOTHING
        trace_id, span_id, sampled, state = caller
        return CarriedContext(trace_id, span_id, sampled, state, True)

    def current_trace_id(self, *, sampled: bool = True) -> str | None:
        """The current trace id in hex; by default only when the trace is recorded (a
        metric exemplar must point at a trace that exists), else for any (log lines)."""
        if not self.enabled:
            return None
        parent = current_parent()
        if parent is None or (sampled and not parent.sampled):
            return None
        return f"{parent.trace_id:032x}"

    def current_span_id(self) -> str | None:
        """The current span's id in hex, for log lines; None when off or outside a span."""
        if not self.enabled:
            return None
        parent = current_parent()
        return None if parent is None else f"{parent.span_id:016x}"


class _Mark:
    """`Tracing.mark`'s block: an event on `span` when it leaves."""

    __slots__ = ("_name", "_span")

    def __init__(self, span: LeanSpan, name: str) -> None:
        self._span = span
        self._name = name

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        if kind is None:
            self._span.add_event(self._name)
        else:  # the step failed here; the exception itself is the span's to record
            self._span.add_event(self._name, {"error.type": kind.__qualname__})


def _traceparent(headers: Mapping[str, str]) -> tuple[int, int, bool, TraceState | None] | None:
    """The caller's trace id, span id, sampled flag and trace state from its W3C
    `traceparent` (and `tracestate`); None when absent or not valid (`traceparent_fields`)."""
    fields = traceparent_fields(headers.get(H_TRACEPARENT))
    if fields is None:
        return None
    trace_hex, span_hex, flags = fields
    state = headers.get(H_TRACESTATE)
    return (
        int(trace_hex, 16), int(span_hex, 16), bool(int(flags, 16) & 0x01),
        TraceState.from_header([state]) if state else None,
    )  # fmt: skip


def mark_error(span: Span | None, status: int, code: str) -> None:
    """Record an error answer on `span` (semantic conventions: `error.type`, status ERROR
    for server errors only, since a 4xx is the client's, not the span's, failure)."""
    if span is None:
        return
    # A reply's code is whatever its responder sent (a header of up to a megabyte).
    code = cut(code, _MAX_ERROR_TYPE)
    span.set_attribute("error.type", code)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR, code))


TRACING: Final = Tracing()


def configure_tracing(
    settings: TracingSettings,
    service: str,
    *,
    instance: str,
    version: str,
    exporter: SpanExporter | None = None,
) -> bool:
    """Start tracing for this process when `settings` name an endpoint (or `exporter`, an
    OpenTelemetry SDK exporter, is given, as tests do); return whether it is on.

    Spans are sampled by the caller's decision when there is one, else by
    `settings.sample_ratio`, and exported in batches in the background (through `exporter`
    one by one as they end).
    """
    if exporter is None and not settings.otlp_endpoint:
        return False
    resource = {
        "service.name": service,
        "service.instance.id": instance,
        "service.version": version,
    }
    if exporter is not None:
        from nexus_bus.observability.tracing_sdk import SdkExporterSink

        sink = SdkExporterSink(exporter, resource)
        provider = LeanTracerProvider(resource, sink, close=sink.close)
    else:
        from nexus_bus.observability.otlp import OtlpExporter

        otlp = OtlpExporter(
            str(settings.otlp_endpoint),
            resource,
            timeout_s=settings.export_timeout_s,
            delay_s=settings.batch_delay_s,
            max_batch=settings.max_batch,
            max_queue=max(settings.max_queue, settings.max_batch),
        )
        provider = LeanTracerProvider(resource, otlp.on_end, flush=otlp.flush, close=otlp.close)
    TRACING.install(provider, settings.sample_ratio)
    return True
