"""Sampling of new traces: `Tracing.span` applies the ratio before the SDK is asked, so a
trace left out costs only its ids, and the provider's sampler follows the parent's decision."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from nexus_bus.config import TracingSettings
from nexus_bus.observability.tracing import TRACING, SpanKind, configure_tracing

SAMPLED_PARENT = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
UNSAMPLED_PARENT = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"}


@pytest.fixture
def exported(request: pytest.FixtureRequest) -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    settings = TracingSettings(sample_ratio=request.param)
    configure_tracing(settings, "nexus-test", instance="t", version="0", exporter=exporter)
    try:
        yield exporter
    finally:
        TRACING.shutdown()


def _sampled(traceparent: str) -> bool:
    return bool(int(traceparent[-2:], 16) & 1)  # the sampled bit (0x02 marks a random id)


def _roots(n: int) -> list[str]:
    """Start `n` new traces with a step each; the `traceparent` each would send on."""
    sent = []
    for _ in range(n):
        with TRACING.span("GET /x", kind=SpanKind.SERVER), TRACING.step("authenticate"):
            headers: dict[str, str] = {}
            TRACING.inject(headers)
            sent.append(headers["traceparent"])
    return sent


@pytest.mark.parametrize("exported", [0.0], indirect=True)
def test_ratio_zero_records_nothing_but_still_propagates_a_trace(
    exported: InMemorySpanExporter,
) -> None:
    sent = _roots(50)
    assert exported.get_finished_spans() == ()
    assert len(set(sent)) == 50 and not any(map(_sampled, sent))
    assert all(TRACING.current_trace_id(sampled=False) is None for _ in sent)  # detached
    # A sampled caller decides for us, whatever the ratio.
    with TRACING.span("process", kind=SpanKind.CONSUMER, parent_headers=SAMPLED_PARENT):
        pass
    (span,) = exported.get_finished_spans()
    assert f"{span.context.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"


@pytest.mark.parametrize("exported", [0.25], indirect=True)
def test_a_ratio_records_that_share_of_new_traces_whole(exported: InMemorySpanExporter) -> None:
    sent = _roots(2000)
    spans = exported.get_finished_spans()
    roots = [s for s in spans if s.parent is None]
    assert 400 < len(roots) < 600  # 500 expected; 6 standard deviations either way
    assert len(spans) == 2 * len(roots)  # each recorded trace keeps its step
    assert sum(map(_sampled, sent)) == len(roots)


@pytest.mark.parametrize("exported", [1.0], indirect=True)
def test_ratio_one_records_every_trace_and_follows_an_unsampled_caller(
    exported: InMemorySpanExporter,
) -> None:
    _roots(20)
    assert len(exported.get_finished_spans()) == 40
    with (
        TRACING.span("process", kind=SpanKind.CONSUMER, parent_headers=UNSAMPLED_PARENT),
        TRACING.step("handle"),
    ):
        pass
    assert len(exported.get_finished_spans()) == 40


TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER = "b7ad6b7169203331"


@pytest.mark.parametrize(
    ("traceparent", "continued"),
    [
        (f"00-{TRACE}-{CALLER}-01", True),
        (f" 00-{TRACE}-{CALLER}-01 ", True),  # surrounding whitespace is allowed
        (f"00-{TRACE}-{CALLER}-03", True),  # other flag bits do not matter
        (f"01-{TRACE}-{CALLER}-01-later-fields", True),  # a later version may add fields
        (f"00-{TRACE}-{CALLER}-01-more", False),  # version 00 may not
        (f"ff-{TRACE}-{CALLER}-01", False),  # version ff is invalid
        (f"00-{'0' * 32}-{CALLER}-01", False),  # all-zero ids are invalid
        (f"00-{TRACE}-{'0' * 16}-01", False),
        (f"00-{TRACE.upper()}-{CALLER}-01", False),  # lower-case hex only
        (f"00-{TRACE}-{CALLER}", False),
        ("garbage", False),
        ("", False),
    ],
)
@pytest.mark.parametrize("exported", [1.0], indirect=True)
def test_a_callers_traceparent_is_read_as_w3c_trace_context_says(
    exported: InMemorySpanExporter, traceparent: str, continued: bool
) -> None:
    headers = {"traceparent": traceparent, "tracestate": "vendor=value"}
    with TRACING.span("process", kind=SpanKind.CONSUMER, parent_headers=headers):
        sent: dict[str, str] = {}
        TRACING.inject(sent)
    (span,) = exported.get_finished_spans()
    if continued:
        assert f"{span.context.trace_id:032x}" == TRACE
        assert span.parent is not None and f"{span.parent.span_id:016x}" == CALLER
        assert span.parent.is_remote
        assert sent["tracestate"] == "vendor=value"  # passed on unchanged
    else:  # a new trace, not an error
        assert f"{span.context.trace_id:032x}" != TRACE and span.parent is None
    assert sent["traceparent"] == f"00-{span.context.trace_id:032x}-{span.context.span_id:016x}-01"


@pytest.mark.parametrize("exported", [1.0], indirect=True)
def test_a_call_made_inside_an_unsampled_request_carries_its_trace_unsampled(
    exported: InMemorySpanExporter,
) -> None:
    with (
        TRACING.span("process", kind=SpanKind.SERVER, parent_headers=UNSAMPLED_PARENT),
        TRACING.step("handle"),
    ):
        sent: dict[str, str] = {}
        with TRACING.continued(sent), TRACING.span("request", kind=SpanKind.CLIENT):
            TRACING.inject(sent)  # what a handler's own gateway call sends on
        assert TRACING.current_trace_id(sampled=False) == TRACE
        assert TRACING.current_trace_id() is None  # not recorded: no exemplar
    assert sent["traceparent"] == f"00-{TRACE}-{CALLER}-00"
    assert exported.get_finished_spans() == ()


@pytest.mark.parametrize("exported", [1.0], indirect=True)
def test_an_applications_own_span_is_the_parent_of_a_gateway_call(
    exported: InMemorySpanExporter,
) -> None:
    from opentelemetry.sdk.trace import TracerProvider

    application = TracerProvider().get_tracer("my-app")  # the application's own SDK
    sent: dict[str, str] = {}
    with (
        application.start_as_current_span("checkout") as mine,
        TRACING.span("request nexus.data.get", kind=SpanKind.CLIENT),
    ):
        TRACING.inject(sent)
    (span,) = exported.get_finished_spans()
    assert span.context.trace_id == mine.get_span_context().trace_id
    assert span.parent is not None and span.parent.span_id == mine.get_span_context().span_id
    assert sent["traceparent"].split("-")[1] == f"{span.context.trace_id:032x}"


@pytest.mark.parametrize("exported", [1.0], indirect=True)
def test_application_code_sees_the_handler_span_and_the_steps_before_are_events(
    exported: InMemorySpanExporter,
) -> None:
    assert TRACING.provider is not None
    instrumentation = TRACING.provider.get_tracer("opentelemetry.instrumentation.redis")
    with TRACING.span("process", kind=SpanKind.SERVER, parent_headers=SAMPLED_PARENT):
        # The request path's own spans are current for it, not in OpenTelemetry's context...
        assert not trace.get_current_span().get_span_context().is_valid
        # ...where an instrumentation calling the API still finds its parent.
        with (
            TRACING.mark("authenticate"),
            TRACING.step("jetstream get") as step,
            instrumentation.start_as_current_span("GET", kind=SpanKind.CLIENT),
        ):
            pass
        with TRACING.step("handle", application=True) as handle:
            assert trace.get_current_span() is handle  # a handler's code sees its span
        assert step is not None and handle is not None
        with pytest.raises(PermissionError), TRACING.mark("validate"):
            raise PermissionError("a step that fails leaves its event, with the error's type")
    with TRACING.span(
        "process nexus.a.b", kind=SpanKind.SERVER, parent_headers=SAMPLED_PARENT, application=True
    ) as worker:
        assert trace.get_current_span() is worker  # where an authenticator of yours runs
    spans = {s.name: s for s in exported.get_finished_spans()}
    process = spans["process"]
    assert [e.name for e in process.events] == ["authenticate", "validate"]
    assert dict(process.events[1].attributes or {}) == {"error.type": "PermissionError"}
    assert spans["GET"].parent is not None
    assert spans["GET"].parent.span_id == spans["jetstream get"].context.span_id
    assert spans["handle"].parent is not None
    assert spans["handle"].parent.span_id == process.context.span_id
