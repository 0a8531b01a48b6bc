"""The OpenTelemetry SDK side of tracing, imported only when tracing is switched on.

`tracer_provider` builds the process's provider: parent-based sampling around
`EntrySampler` (the ratio for new traces is applied before the SDK is asked, by
`Tracing.span`), a batch processor and OTLP over HTTP/protobuf (a simple processor for an
exporter a test passes in). `tracing.py` holds everything the request path touches, on the
OpenTelemetry API alone, so a process with tracing off never loads the SDK.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from opentelemetry import context as otel_context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
)
from opentelemetry.trace import Link, SpanKind
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import Attributes

from nexus_bus.config import TracingSettings

_NEXUS_OP: Final = "nexus.op"  # on the spans of a request's own hops


class EntrySampler(Sampler):
    """Samples a new trace only where a request starts one.

    `Tracing.span` has already applied the sampling ratio to a request's new trace (one it
    left out never reaches the SDK). A root span of a Redis command or a KV call (a client
    span not made by the gateway, which marks its spans with `nexus.op`) is background work
    outside any request, and is dropped rather than exported as a trace of one span.
    """

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
        return ALWAYS_ON.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        """What the sampler does, for debugging output."""
        return "EntrySampler"


def tracer_provider(
    settings: TracingSettings,
    service: str,
    *,
    instance: str,
    version: str,
    exporter: SpanExporter | None = None,
) -> TracerProvider:
    """The process's provider, exporting to `settings.otlp_endpoint` (or to `exporter`)."""
    if exporter is None:
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
        resource=resource, sampler=ParentBased(EntrySampler())
    )
    provider.add_span_processor(processor)
    return provider
