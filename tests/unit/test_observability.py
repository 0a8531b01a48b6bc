import io
import json
from datetime import datetime

from nexus_bus.observability import (
    Metrics,
    bind_request,
    configure_logging,
    log_context,
    logger,
    release,
)
from nexus_bus.observability.logging import info_line


def test_json_log_lines_carry_the_contract_fields() -> None:
    sink = io.StringIO()
    configure_logging("svc-a", "INFO", sink=sink)
    try:
        with log_context(trace_id="t" * 32, correlation_id="req-1", op="data", action="get"):
            logger.bind(status=200, duration_ms=1.5).info("served")
        logger.debug("filtered out")
        logger.info("outside")
    finally:
        configure_logging("nexus-test", "WARNING", json_lines=False)
    lines = sink.getvalue().splitlines()
    assert len(lines) == 2
    assert json.loads(lines[1])["trace_id"] is None  # the context ended with its block
    doc = json.loads(lines[0])
    assert doc["service"] == "svc-a" and doc["level"] == "INFO" and doc["message"] == "served"
    assert doc["trace_id"] == "t" * 32 and doc["correlation_id"] == "req-1"
    assert (doc["op"], doc["action"], doc["status"], doc["duration_ms"]) == (
        "data",
        "get",
        200,
        1.5,
    )
    assert "timestamp" in doc


def test_info_lines_match_the_handler_and_its_level() -> None:
    """`info_line` writes past loguru (a line per request), in the handler's shape."""
    sink = io.StringIO()
    fields = {"trace_id": "t" * 32, "correlation_id": "r-1", "op": "data", "status": 200}
    configure_logging("svc-a", "INFO", sink=sink)
    try:
        info_line("access", **fields)
        logger.bind(**fields).info("access")
        configure_logging("svc-a", "WARNING", sink=sink)
        info_line("dropped", **fields)
    finally:
        configure_logging("nexus-test", "WARNING", json_lines=False)
    fast, slow = (json.loads(line) for line in sink.getvalue().splitlines())
    assert fast.pop("timestamp")[:10] == slow.pop("timestamp")[:10]
    assert fast == slow
    assert datetime.fromisoformat(json.loads(sink.getvalue().splitlines()[0])["timestamp"]).tzinfo


def test_request_context_nests_and_bound_values_win() -> None:
    sink = io.StringIO()
    configure_logging("svc-b", "INFO", sink=sink)
    try:
        outer = bind_request(op="jobs-op", correlation_id="job")
        inner = bind_request(correlation_id="req-2", trace_id="a" * 32)
        logger.bind(op="bound").info("inner")
        release(inner)
        logger.info("outer")
        release(outer)
    finally:
        configure_logging("nexus-test", "WARNING", json_lines=False)
    first, second = (json.loads(line) for line in sink.getvalue().splitlines())
    assert (first["op"], first["correlation_id"], first["trace_id"]) == ("bound", "req-2", "a" * 32)
    assert (second["op"], second["correlation_id"], second["trace_id"]) == ("jobs-op", "job", None)


def test_metrics_names_and_labels() -> None:
    m = Metrics()
    m.observe("data", "get", 200, "nats", 0.002)
    m.observe("data", "get", 200, "nats", 0.004)
    m.count_error("data", "not_found")
    count = m.registry.get_sample_value(
        "nexus_request_duration_seconds_count",
        {"op": "data", "action": "get", "status": "200", "transport": "nats"},
    )
    assert count == 2
    assert (
        m.registry.get_sample_value("nexus_error_rate_total", {"op": "data", "code": "not_found"})
        == 1
    )


def test_the_trace_is_worked_out_once_and_only_when_used() -> None:
    """The dispatcher binds a LazyTrace: nothing is parsed or drawn unless a line is logged or
    the handler reads `ctx.trace`, and then the log and the handler agree."""
    from nexus_bus.bus.metadata import LazyTrace
    from nexus_bus.context import RequestContext

    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    for headers, trace_id in (({"traceparent": parent}, parent[3:35]), ({}, None)):
        lazy = LazyTrace(headers)
        assert lazy._trace is None
        sink = io.StringIO()
        configure_logging("svc", "INFO", sink=sink)
        try:
            with log_context(trace_id=lazy, correlation_id="r"):
                assert lazy._trace is None  # binding alone parses nothing
                logger.info("inside")
        finally:
            configure_logging("nexus-test", "WARNING", json_lines=False)
        logged = json.loads(sink.getvalue())["trace_id"]
        ctx = RequestContext(
            op="o", action="a", request_id="r", deadline_ms=0, services=None,  # type: ignore[arg-type]
            trace=lazy, headers=headers,
        )
        assert ctx.trace is lazy.get() and ctx.trace.trace_id == logged
        assert ctx.trace.span_id != "00f067aa0ba902b7"  # this hop's own span
        if trace_id:
            assert logged == trace_id
        else:
            assert len(logged) == 32  # a new trace, the same for both


def test_a_context_without_a_trace_takes_it_from_its_headers() -> None:
    from nexus_bus.context import RequestContext

    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    ctx = RequestContext(
        op="o", action="a", request_id="r", deadline_ms=0, services=None,  # type: ignore[arg-type]
        headers={"traceparent": parent},
    )
    assert ctx.trace.trace_id == parent[3:35] and ctx.trace is ctx.trace


def test_request_durations_expose_what_prometheus_histogram_does() -> None:
    """The hot-path histogram, scraped, reads exactly as prometheus-client's `Histogram`
    given the same observations (without the optional `_created` sample)."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from nexus_bus.constants import M_REQUEST_DURATION
    from nexus_bus.observability.metrics import _BUCKETS

    ours = Metrics()
    reference = Histogram(
        M_REQUEST_DURATION,
        "Time to answer a request, by operation, status and transport.",
        ("op", "action", "status", "transport"),
        buckets=_BUCKETS,
        registry=(registry := CollectorRegistry()),
    )
    for seconds, status in [(0.0001, 200), (0.0005, 200), (0.0049, 404), (3, 200), (11, 200)]:
        ours.observe("data", "get", status, "nats", seconds)
        reference.labels("data", "get", str(status), "nats").observe(seconds)
    exposed = [
        line for line in generate_latest(ours.registry).decode().splitlines()
        if M_REQUEST_DURATION in line
    ]
    expected = [
        line for line in generate_latest(registry).decode().splitlines()
        if "_created" not in line
    ]
    assert exposed == expected and len(expected) > 30
