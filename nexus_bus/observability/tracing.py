"""Distributed tracing with OpenTelemetry: off unless an OTLP endpoint is configured.

`configure_tracing` sets up one SDK tracer provider for the process (parent-based
sampling, the ratio applied by `Tracing.span` to new traces, a batch processor, OTLP over
HTTP/protobuf; `tracing_sdk.py`, imported only then) and keeps it in `TRACING`. The request
path asks `TRACING.enabled` once per hop and otherwise does nothing: with tracing off no
span object, context or header is made, so the cost is an attribute read.

The provider is this process's own, not OpenTelemetry's global one: a library must not take
the global slot from the application that imports it, and tests switch tracing on and off
in one process. The W3C `traceparent` the request path already carries is the propagation
format, so a span's trace id is the caller's trace id.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, Final

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import (
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from nexus_bus.config import TracingSettings

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

__all__ = ["TRACING", "SpanKind", "Tracing", "configure_tracing", "mark_error"]

_PROPAGATOR: Final = TraceContextTextMapPropagator()
_NOTHING: Final = contextlib.nullcontext()
_UNSAMPLED: Final = TraceFlags(TraceFlags.DEFAULT)


class Tracing:
    """The process's tracer, or nothing; `TRACING` is the shared instance."""

    def __init__(self) -> None:
        self.enabled = False
        self.provider: TracerProvider | None = None
        self._tracer: trace.Tracer = trace.NoOpTracer()
        self._ratio = 1.0

    def install(self, provider: TracerProvider, sample_ratio: float = 1.0) -> None:
        """Trace with `provider` from now on, recording `sample_ratio` of the traces that
        start here (`span` decides for a new trace; the provider's sampler follows parents)."""
        self.provider = provider
        self._tracer = provider.get_tracer("nexus_bus")
        self._ratio = sample_ratio
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
        becomes current so that every span below knows the trace is not sampled. A new
        trace is sampled here, at the process's ratio, before the SDK is asked: one left
        out gets only its ids (a trace id to propagate and log), no SDK span, which is most
        of what tracing at a low ratio costs a request.
        """
        if not self.enabled:
            return _NOTHING
        parent = _PROPAGATOR.extract(parent_headers) if parent_headers is not None else None
        context = trace.get_current_span(parent).get_span_context()
        if context.is_valid:
            if not context.trace_flags.sampled:
                return _NOTHING if parent is None else _Attached(parent)
        elif self._ratio < 1.0 and random.random() >= self._ratio:
            return _Attached(trace.set_span_in_context(_unsampled_root(), parent))
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


def _unsampled_root() -> NonRecordingSpan:
    """A new trace that is not recorded: random ids (never the invalid all-zero ones)."""
    return NonRecordingSpan(
        SpanContext(
            trace_id=random.getrandbits(128) or 1,
            span_id=random.getrandbits(64) or 1,
            is_remote=False,
            trace_flags=_UNSAMPLED,
        )
    )


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
    if exporter is None and not settings.otlp_endpoint:
        return False
    # Imported only now: the SDK (with psutil, for its resource detectors) is several MB of
    # every process, and tracing is off by default.
    from nexus_bus.observability.tracing_sdk import tracer_provider

    TRACING.install(
        tracer_provider(settings, service, instance=instance, version=version, exporter=exporter),
        settings.sample_ratio,
    )
    return True
