"""Distributed tracing with OpenTelemetry: off unless an OTLP endpoint is configured.

`configure_tracing` sets up one SDK tracer provider for the process (parent-based ratio
sampling, a batch processor, OTLP over HTTP/protobuf) and keeps it in `TRACING`. The request
path asks `TRACING.enabled` once per hop and otherwise does nothing: with tracing off no
span object, context or header is made, so the cost is an attribute read.

The provider is this process's own, not OpenTelemetry's global one: a library must not take
the global slot from the application that imports it, and tests switch tracing on and off
in one process. The W3C `traceparent` the request path already carries is the propagation
format, so a span's trace id is the caller's trace id.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from typing import Any, Final

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import (
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import Attributes

from nexus_bus.config import TracingSettings

__all__ = ["TRACING", "EntrySampler", "SpanKind", "Tracing", "configure_tracing", "mark_error"]

_PROPAGATOR: Final = TraceContextTextMapPropagator()
_NOTHING: Final = contextlib.nullcontext()
_NEXUS_OP: Final = "nexus.op"  # on the spans of a request's own hops


class Tracing:
    """The process's tracer, or nothing; `TRACING` is the shared instance."""

    def __init__(self) -> None:
        self.enabled = False
        self.provider: TracerProvider | None = None
        self._tracer: trace.Tracer = trace.NoOpTracer()

    def install(self, provider: TracerProvider) -> None:
        """Trace with `provider` from now on."""
        self.provider = provider
        self._tracer = provider.get_tracer("nexus_bus")
        self.enabled = True

    def shutdown(self) -> None:
        """Export what is buffered and stop tracing."""
        provider, self.provider = self.provider, None
        self.enabled = False
        self._tracer = trace.NoOpTracer()
        if provider is not None:
            provider.shutdown()

    def span(
        self,
        name: str,
        *,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Mapping[str, Any] | None = None,
        parent_headers: Mapping[str, str] | None = None,
    ) -> contextlib.AbstractContextManager[Span | None]:
        """An entry span (a request arriving or leaving): a child of `parent_headers`'
        `traceparent` (or of the current span), or the root of a new trace.

        A shared do-nothing context manager when tracing is off. When the caller did not
        sample its trace, no span is made at all (it would record nothing), but its context
        becomes current so that every span below knows the trace is not sampled.
        """
        if not self.enabled:
            return _NOTHING
        parent = _PROPAGATOR.extract(parent_headers) if parent_headers is not None else None
        context = trace.get_current_span(parent).get_span_context()
        if context.is_valid and not context.trace_flags.sampled:
            return _NOTHING if parent is None else _Attached(parent)
        return self._tracer.start_as_current_span(
            name, context=parent, kind=kind, attributes=attributes
        )

    def step(
        self,
        name: str,
        *,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Mapping[str, Any] | None = None,
    ) -> contextlib.AbstractContextManager[Span | None]:
        """A span for a step of a sampled request (authenticate, a KV call); nothing
        outside one, so a step never starts a trace of its own."""
        if not self.enabled:
            return _NOTHING
        context = trace.get_current_span().get_span_context()
        if not (context.is_valid and context.trace_flags.sampled):
            return _NOTHING
        return self._tracer.start_as_current_span(name, kind=kind, attributes=attributes)

    def inject(self, headers: MutableMapping[str, str]) -> None:
        """Write the current span's `traceparent` (and `tracestate`) into `headers`."""
        if self.enabled and trace.get_current_span().get_span_context().is_valid:
            _PROPAGATOR.inject(headers)

    @contextlib.contextmanager
    def continued(self, headers: Mapping[str, str]) -> Iterator[None]:
        """Make the trace in `headers` current when no span is (a caller outside any span)."""
        if not self.enabled or trace.get_current_span().get_span_context().is_valid:
            yield
            return
        token = otel_context.attach(_PROPAGATOR.extract(headers))
        try:
            yield
        finally:
            otel_context.detach(token)

    def current_trace_id(self, *, sampled: bool = True) -> str | None:
        """The current span's trace id in hex; by default only when the trace is recorded
        (a metric exemplar must point at a trace that exists), else for any (log lines)."""
        if not self.enabled:
            return None
        context = trace.get_current_span().get_span_context()
        if not context.is_valid or (sampled and not context.trace_flags.sampled):
            return None
        return f"{context.trace_id:032x}"

    def current_span_id(self) -> str | None:
        """The current span's id in hex, for log lines; None when off or outside a span."""
        if not self.enabled:
            return None
        context = trace.get_current_span().get_span_context()
        return f"{context.span_id:016x}" if context.is_valid else None


class _Attached:
    """Makes an OpenTelemetry context current for a block (a caller's unsampled trace)."""

    __slots__ = ("_context", "_token")

    def __init__(self, context: otel_context.Context) -> None:
        self._context = context
        self._token: object = None

    def __enter__(self) -> None:
        self._token = otel_context.attach(self._context)

    def __exit__(self, *exc: object) -> None:
        otel_context.detach(self._token)  # type: ignore[arg-type]


class EntrySampler(Sampler):
    """Samples new traces at `ratio`, but only where a request starts one.

    A root span of a Redis command or a KV call (a client span not made by the gateway,
    which marks its spans with `nexus.op`) is background work outside any request, and is
    dropped rather than exported as a trace of one span.
    """

    def __init__(self, ratio: float) -> None:
        self._ratio = TraceIdRatioBased(ratio)

    def should_sample(
        self,
        parent_context: otel_context.Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        """Drop infrastructure roots; otherwise the ratio decides."""
        if kind in (SpanKind.CLIENT, SpanKind.INTERNAL, None) and not (
            attributes and _NEXUS_OP in attributes
        ):
            return SamplingResult(Decision.DROP)
        return self._ratio.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        """What the sampler does, for debugging output."""
        return f"EntrySampler({self._ratio.get_description()})"


def mark_error(span: Span | None, status: int, code: str) -> None:
    """Record an error answer on `span` (semantic conventions: `error.type`, status ERROR
    for server errors only, since a 4xx is the client's, not the span's, failure)."""
    if span is None:
        return
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
    """Start tracing for this process when `settings` name an endpoint (or `exporter` is
    given, as tests do); return whether it is on.

    Spans are sampled by the caller's decision when there is one, else by
    `settings.sample_ratio`, and exported in batches in the background.
    """
    if exporter is None:
        if not settings.otlp_endpoint:
            return False
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(
            endpoint=settings.otlp_endpoint, timeout=settings.export_timeout_s
        )
        processor: BatchSpanProcessor | SimpleSpanProcessor = BatchSpanProcessor(exporter)
    else:
        processor = SimpleSpanProcessor(exporter)
    resource = Resource.create(
        {"service.name": service, "service.instance.id": instance, "service.version": version}
    )
    provider = TracerProvider(
        resource=resource, sampler=ParentBased(EntrySampler(settings.sample_ratio))
    )
    provider.add_span_processor(processor)
    TRACING.install(provider)
    return True
