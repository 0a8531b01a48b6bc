"""Hands the tracer's spans to an OpenTelemetry SDK `SpanExporter`, one by one as they end.

For an exporter passed to `configure_tracing` (the tests' `InMemorySpanExporter`, a console
exporter while debugging): each span becomes the SDK's `ReadableSpan`, with its context,
parent, kind, attributes, events, status, times and the process's resource, and is exported
at once, as the SDK's `SimpleSpanProcessor` does. Production export does not come here
(`otlp.OtlpExporter`), and the SDK is imported only by this module: it comes with the test
extra (`pip install 'nexus-bus[test]'`), not with the runtime.
"""

from __future__ import annotations

from collections.abc import Mapping

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Status

from nexus_bus.observability.tracer import LeanSpan

__all__ = ["SdkExporterSink", "readable"]


def readable(span: LeanSpan, resource: Resource) -> ReadableSpan:
    """`span` as the SDK's `ReadableSpan`, with the process's `resource`."""
    events = [
        Event(name, attributes, timestamp=when) for name, when, attributes in span.events or ()
    ]
    return ReadableSpan(
        name=span.name,
        context=span.get_span_context(),
        parent=span.parent,
        resource=resource,
        attributes=span.attributes,
        events=events,
        links=span.links,
        kind=span.kind,
        status=Status(span.status_code, span.status_message),
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=InstrumentationScope(*span.scope),
    )


class SdkExporterSink:
    """A tracer provider's sink exporting each span through `exporter` as it ends."""

    def __init__(self, exporter: SpanExporter, resource: Mapping[str, str]) -> None:
        self._exporter = exporter
        self._resource = Resource.create(dict(resource))

    def __call__(self, span: LeanSpan) -> None:
        self._exporter.export([readable(span, self._resource)])

    def close(self) -> None:
        """Shut the exporter down."""
        self._exporter.shutdown()
