"""What the OTLP exporter sends: the official protobuf types decode it to what the
OpenTelemetry SDK's own encoder makes of the same spans, and it is delivered in batches,
retried on the answers the OTLP/HTTP specification calls retryable, and bounded in memory.

The collector here is a real HTTP server on a free port (the standard library's), answering
as a test tells it to.
"""

from __future__ import annotations

import contextlib
import http.server
import threading
import time
from collections.abc import Iterator

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.trace import Link, SpanContext, SpanKind, StatusCode, TraceFlags
from opentelemetry.trace.span import TraceState
from prometheus_client import REGISTRY

from nexus_bus.observability.otlp import (
    MAX_QUEUE_BYTES,
    OtlpExporter,
    encode_request,
    encode_resource,
    encode_span,
)
from nexus_bus.observability.tracer import LeanSpan, LeanTracerProvider
from nexus_bus.observability.tracing_sdk import readable

RESOURCE = {"service.name": "nexus-test", "service.instance.id": "t-1", "service.version": "0"}


def ended(**overrides: object) -> list[LeanSpan]:
    """Spans covering every field the encoder writes, ended."""
    done: list[LeanSpan] = []
    tracer = LeanTracerProvider(RESOURCE, done.append).get_tracer("nexus_bus", "1.2")
    attributes = {
        "s": "text é", "yes": True, "no": False, "n": 200, "minus": -7, "big": 2**62,
        "x": 0.25, "raw": b"\x00\x01", "words": ["a", "b"], "numbers": [1, 2], "none": None,
        "empty": "", "zero": 0, **overrides,
    }  # fmt: skip
    root = tracer.open("root", SpanKind.SERVER, attributes, 0x0AF7651916CD43DD8448EB211C80319C)
    with root:
        remote = tracer.open(
            "child of a remote caller", SpanKind.CONSUMER, {"k": "v"}, root.trace_id,
            0xB7AD6B7169203331, True, TraceState([("vendor", "value")]),
        )  # fmt: skip
        remote.add_event("retry", {"attempt": 2})
        remote.add_event("validate")  # no attributes: its bytes kept by name
        remote.add_event("validate", timestamp=remote.start_time + 5)
        remote.set_status(StatusCode.ERROR, "it broke")
        remote.end()
        linked = SpanContext(0x1, 0x2, True, TraceFlags(TraceFlags.SAMPLED))
        with tracer.start_as_current_span(
            "linked", kind=SpanKind.CLIENT, links=[Link(linked, {"why": "batch"})]
        ) as span:
            span.set_status(StatusCode.OK)
        try:
            with tracer.start_as_current_span("fails", kind=SpanKind.PRODUCER):
                raise ValueError("bad")
        except ValueError:
            pass
    return done


def decoded(body: bytes) -> ExportTraceServiceRequest:
    return ExportTraceServiceRequest.FromString(body)


def test_what_is_exported_decodes_to_what_the_sdk_encodes() -> None:
    spans = ended()
    ours = decoded(encode_request(encode_resource(RESOURCE), map(encode_span, spans)))
    sdk = encode_spans([readable(s, Resource(RESOURCE)) for s in spans])

    assert ours.resource_spans[0].resource == sdk.resource_spans[0].resource
    (expected_scope,) = sdk.resource_spans[0].scope_spans
    expected = {span.name: span for span in expected_scope.spans}
    scopes = ours.resource_spans[0].scope_spans  # one span each
    assert [len(scope.spans) for scope in scopes] == [1, 1, 1, 1]
    for scope in scopes:
        assert scope.scope == expected_scope.scope  # nexus_bus 1.2
        assert scope.spans[0] == expected[scope.spans[0].name], scope.spans[0].name


def test_the_span_tree_and_fields_survive_the_round_trip() -> None:
    spans = {s.name: s for s in ended()}
    body = encode_request(encode_resource(RESOURCE), map(encode_span, spans.values()))
    exported = {
        scope.spans[0].name: scope.spans[0] for scope in decoded(body).resource_spans[0].scope_spans
    }

    root = exported["root"]
    assert root.trace_id.hex() == "0af7651916cd43dd8448eb211c80319c"
    assert root.parent_span_id == b"" and root.kind == 2  # SERVER
    attributes = {kv.key: kv.value for kv in root.attributes}
    assert attributes["s"].string_value == "text é"
    assert attributes["no"].HasField("bool_value") and not attributes["no"].bool_value
    assert attributes["minus"].int_value == -7 and attributes["big"].int_value == 2**62
    assert [v.int_value for v in attributes["numbers"].array_value.values] == [1, 2]
    assert attributes["zero"].HasField("int_value")  # a zero is sent, not left out
    child = exported["child of a remote caller"]
    assert child.parent_span_id.hex() == "b7ad6b7169203331"
    assert child.flags == 0x300  # its parent is remote
    assert child.trace_state == "vendor=value"
    assert child.status.code == 2 and child.status.message == "it broke"
    assert child.events[0].name == "retry"
    failed = exported["fails"]
    assert failed.parent_span_id == root.span_id
    assert failed.events[0].name == "exception" and failed.status.code == 2


def test_values_equal_in_python_keep_their_own_type_on_the_wire() -> None:
    provider = LeanTracerProvider(RESOURCE, lambda span: None)
    tracer = provider.get_tracer("nexus_bus")
    spans = []
    for value in (True, 1, 1.0, "1", 1, True):  # equal (or alike) values, one key
        with tracer.open("typed", SpanKind.INTERNAL, {"value": value}, 1) as span:
            spans.append(span)
    body = encode_request(encode_resource(RESOURCE), map(encode_span, spans))
    values = [
        scope.spans[0].attributes[0].value for scope in decoded(body).resource_spans[0].scope_spans
    ]
    assert [v.WhichOneof("value") for v in values] == [
        "bool_value", "int_value", "double_value", "string_value", "int_value", "bool_value",
    ]  # fmt: skip


def test_a_list_attribute_is_kept_as_it_was_when_set() -> None:
    ended_spans: list[LeanSpan] = []
    tracer = LeanTracerProvider(RESOURCE, ended_spans.append).get_tracer("nexus_bus")
    tags, more = ["a"], ["x"]
    with tracer.open("listed", SpanKind.INTERNAL, {"tags": tags}, 1) as span:
        span.set_attribute("more", more)
        span.set_attributes({"most": more})
        span.add_event("seen", {"tags": tags})
    tags.append("changed after the span ended")  # it is encoded later, in a run of spans
    more.append("changed")
    body = encode_request(encode_resource(RESOURCE), map(encode_span, ended_spans))
    (exported,) = [scope.spans[0] for scope in decoded(body).resource_spans[0].scope_spans]
    values = {
        kv.key: [v.string_value for v in kv.value.array_value.values] for kv in exported.attributes
    }
    assert values == {"tags": ["a"], "more": ["x"], "most": ["x"]}
    (event,) = exported.events
    assert [v.string_value for v in event.attributes[0].value.array_value.values] == ["a"]


class Collector(http.server.ThreadingHTTPServer):
    """An OTLP/HTTP trace endpoint answering each POST with the next status in `answers`
    (then 200), keeping the bodies it accepted."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.answers: list[int] = []
        self.accepted: list[bytes] = []
        self.posts = 0
        # The OpenTelemetry Collector's OTLP/HTTP receiver refuses a body over 20 MiB
        # (confighttp's max_request_body_size default) with 413.
        self.max_body = 20 * 1024 * 1024

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1/traces"

    def span_names(self) -> list[str]:
        return [
            span.name
            for body in self.accepted
            for scope in decoded(body).resource_spans[0].scope_spans
            for span in scope.spans
        ]


class _Handler(http.server.BaseHTTPRequestHandler):
    server: Collector

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.posts += 1
        status = self.server.answers.pop(0) if self.server.answers else 200
        if len(body) > self.server.max_body:
            status = 413
        if status == 200:
            assert self.headers["Content-Type"] == "application/x-protobuf"
            self.server.accepted.append(body)
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[Collector]:
    server = Collector()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def exporting(collector: Collector, **options: float) -> tuple[LeanTracerProvider, OtlpExporter]:
    exporter = OtlpExporter(
        collector.url, RESOURCE, timeout_s=options.pop("timeout_s", 5.0), **options
    )  # type: ignore[arg-type]
    provider = LeanTracerProvider(RESOURCE, exporter.on_end, exporter.flush, exporter.close)
    return provider, exporter


def dropped_total() -> float:
    return REGISTRY.get_sample_value("nexus_trace_spans_dropped_total") or 0.0


def make_spans(provider: LeanTracerProvider, count: int) -> None:
    tracer = provider.get_tracer("nexus_bus")
    for n in range(count):
        with tracer.open(f"span {n}", SpanKind.SERVER, None, n + 1):
            pass


def test_spans_leave_in_batches_and_close_sends_the_rest(collector: Collector) -> None:
    provider, exporter = exporting(collector, delay_s=60.0, max_batch=4)
    make_spans(provider, 10)
    deadline = time.monotonic() + 5
    while len(collector.span_names()) < 8 and time.monotonic() < deadline:
        time.sleep(0.01)  # the thread wakes when a batch is full, not after `delay_s`
    assert len(collector.span_names()) >= 8
    provider.shutdown()
    for body in collector.accepted:
        assert len(decoded(body).resource_spans[0].scope_spans) <= 4
    assert collector.span_names() == [f"span {n}" for n in range(10)]
    assert exporter.dropped == 0


def test_a_retryable_answer_is_sent_again(collector: Collector) -> None:
    collector.answers = [503, 429]
    provider, exporter = exporting(collector, delay_s=60.0)
    make_spans(provider, 3)
    started = time.monotonic()
    provider.force_flush()
    assert collector.posts == 3  # refused twice, then accepted
    assert collector.span_names() == ["span 0", "span 1", "span 2"]
    assert 2.0 <= time.monotonic() - started < 5.0  # after about 1 s, then about 2 s
    assert exporter.dropped == 0
    provider.shutdown()


def test_a_refused_batch_is_dropped_and_counted_not_retried(collector: Collector) -> None:
    collector.answers = [400]
    provider, exporter = exporting(collector, delay_s=60.0)
    counted = dropped_total()
    make_spans(provider, 3)
    provider.force_flush()
    assert collector.posts == 1 and collector.accepted == []
    assert exporter.dropped == 3
    assert dropped_total() == counted + 3
    make_spans(provider, 1)  # the next batch goes out as usual
    provider.shutdown()
    assert collector.span_names() == ["span 0"]


def test_an_absent_collector_costs_the_timeout_then_drops(collector: Collector) -> None:
    url = collector.url
    collector.shutdown()
    collector.server_close()  # nothing listens there now
    exporter = OtlpExporter(url, RESOURCE, timeout_s=1.5, delay_s=60.0)
    provider = LeanTracerProvider(RESOURCE, exporter.on_end, exporter.flush, exporter.close)
    make_spans(provider, 2)
    started = time.monotonic()
    provider.force_flush()
    assert time.monotonic() - started < 3.0
    assert exporter.dropped == 2
    provider.shutdown()


def test_the_queue_is_bounded_and_on_end_never_waits(collector: Collector) -> None:
    collector.answers = [503] * 100  # a collector that never accepts
    provider, exporter = exporting(
        collector, delay_s=60.0, max_batch=2, max_queue=5, timeout_s=30.0
    )
    started = time.monotonic()
    make_spans(provider, 50)
    assert time.monotonic() - started < 1.0
    assert exporter.dropped >= 40  # at most the queue and a batch in flight were kept
    collector.answers = []
    provider.shutdown()


def test_an_endpoint_that_is_not_http_is_refused_at_once() -> None:
    with pytest.raises(ValueError, match="not an http"):
        OtlpExporter("grpc://collector:4317", RESOURCE, timeout_s=1.0)


def test_a_span_that_cannot_be_encoded_is_dropped_not_raised(collector: Collector) -> None:
    provider, exporter = exporting(collector, delay_s=60.0)
    tracer = provider.get_tracer("nexus_bus")
    with tracer.open("bad", SpanKind.SERVER, None, 1) as span:
        span.set_attribute(7, "a key that is not text")  # type: ignore[arg-type]
    make_spans(provider, 1)
    provider.shutdown()
    assert exporter.dropped == 1
    assert collector.span_names() == ["span 0"]



def test_a_batch_of_big_spans_stays_under_a_collectors_request_limit(
    collector: Collector,
) -> None:
    """Before: a batch was up to `max_batch` spans whatever their size, so 2000 spans of
    handlers failing with long messages (about 16 KB each, bounded as they are) went out as
    one 32 MB request, which the collector refused (413), dropping all 2000."""
    provider, exporter = exporting(collector, delay_s=60.0)
    tracer = provider.get_tracer("nexus_bus")
    for n in range(2000):
        with (
            contextlib.suppress(RuntimeError),
            tracer.open(f"span {n}", SpanKind.SERVER, None, n + 1),
        ):
            raise RuntimeError("x" * 100_000)
    provider.force_flush()
    assert exporter.dropped == 0
    assert collector.span_names() == [f"span {n}" for n in range(2000)]
    assert max(map(len, collector.accepted)) <= 8 * 1024 * 1024
    provider.shutdown()


def test_the_queue_is_bounded_in_bytes_too(collector: Collector) -> None:
    """Before: the queue was bounded only by its count of spans (8192 by default), so with
    the collector away a burst of failed requests (a span with one long error message holds
    about 13 KB of its text, with chained ones up to 40 KB) held 105 to 330 MB in every
    process; here 6000 of them, 77 MB, were all kept."""
    collector.answers = [503] * 100  # a collector that never accepts
    provider, exporter = exporting(collector, delay_s=60.0, max_batch=8192, timeout_s=30.0)
    tracer = provider.get_tracer("nexus_bus")
    for n in range(6000):
        with (
            contextlib.suppress(RuntimeError),
            tracer.open(f"span {n}", SpanKind.SERVER, None, n + 1),
        ):
            raise RuntimeError(f"{n} " + "x" * 100_000)
    assert exporter.dropped > 0
    assert exporter.queued_bytes <= MAX_QUEUE_BYTES
    collector.answers = []
    provider.shutdown()
