import io
import json

from nexus_bus.observability import (
    Metrics,
    bind_request,
    configure_logging,
    log_context,
    logger,
    release,
)


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
