"""What one span costs, in-process: the OpenTelemetry SDK beside nexus-bus's own provider.

    python -m benchmarks.bench_tracing [--spans 20000]

For each, in one process and one run: starting a span, making it current and ending it (a
request's server span with the worker's attributes, and three steps under it, as
`Dispatcher` makes them), then encoding the ended spans for OTLP (the SDK's encoder in the
export thread; ours as each span ends). The figures quoted in docs/observability.md ("What a
span costs") come from here. A loop runs the code hot: inside a serving process, between
everything else a request does, the same code costs several times as much (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from nexus_bus.observability.otlp import encode_span
from nexus_bus.observability.tracer import LeanSpan, LeanTracerProvider

TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
CALLER = 0xB7AD6B7169203331


def attributes(n: int) -> dict[str, Any]:
    return {
        "messaging.system": "nats",
        "messaging.operation.type": "process",
        "messaging.destination.name": "nexus.bench.echo",
        "messaging.message.id": f"{n:024x}",
        "nexus.op": "bench",
        "nexus.action": "echo",
        "nexus.transport": "nats",
        "nexus.attempt": 1,
    }


ENCODED = 2000  # spans kept for the encoding figure; the others are dropped as they end


class _Keep(SpanExporter):
    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if len(self.spans) < ENCODED:  # keeping them all would time the garbage collector
            self.spans.extend(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def sdk(count: int) -> tuple[float, float]:
    """µs per span to start, make current and end; µs per span to encode."""
    kept = _Keep()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(kept))
    tracer = provider.get_tracer("nexus_bus")
    parent = trace.set_span_in_context(
        trace.NonRecordingSpan(
            trace.SpanContext(TRACE_ID, CALLER, True, trace.TraceFlags(trace.TraceFlags.SAMPLED))
        )
    )

    def request(n: int) -> None:
        with tracer.start_as_current_span(
            "process nexus.bench.echo", context=parent, kind=trace.SpanKind.SERVER,
            attributes=attributes(n),
        ):  # fmt: skip
            for step in ("authenticate", "validate", "handle"):
                with tracer.start_as_current_span(step):
                    pass

    made = _per_span(request, count)
    started = time.perf_counter()
    encode_spans(kept.spans).SerializeToString()
    return made, (time.perf_counter() - started) / len(kept.spans) * 1e6


def ours(count: int) -> tuple[float, float]:
    """The same with nexus-bus's provider (`tracer.py`) and encoder (`otlp.py`)."""
    kept: list[LeanSpan] = []

    def keep(span: LeanSpan) -> None:
        if len(kept) < ENCODED:  # keeping them all would time the garbage collector
            kept.append(span)

    tracer = LeanTracerProvider({"service.name": "bench"}, keep).get_tracer("nexus_bus")

    def request(n: int) -> None:
        # Current in OpenTelemetry's context too (`api_current`), as the SDK's spans are.
        with tracer.open(
            "process nexus.bench.echo", trace.SpanKind.SERVER, attributes(n), TRACE_ID,
            CALLER, True, api_current=True,
        ) as span:  # fmt: skip
            for step in ("authenticate", "validate", "handle"):
                with tracer.open(
                    step, trace.SpanKind.INTERNAL, None, TRACE_ID, span.span_id,
                    api_current=True,
                ):  # fmt: skip
                    pass

    made = _per_span(request, count)
    started = time.perf_counter()
    for span in kept:
        encode_span(span)
    return made, (time.perf_counter() - started) / len(kept) * 1e6


def _per_span(request: Callable[[int], None], count: int) -> float:
    requests = count // 4
    for n in range(min(requests, 1000)):  # warm up
        request(n)
    started = time.perf_counter()
    for n in range(requests):
        request(n)
    return (time.perf_counter() - started) / (requests * 4) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spans", type=int, default=20_000)
    args = parser.parse_args()
    print(f"{'µs per span':<28}{'start+current+end':>18}{'encode':>9}")
    for name, run in (("opentelemetry-sdk", sdk), ("nexus-bus (tracer.py)", ours)):
        made, encoded = run(args.spans)
        print(f"{name:<28}{made:>18.1f}{encoded:>9.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
