import pytest

from nexus_bus.bus._speedups import headers as nats_headers
from nexus_bus.bus.metadata import (
    JETSTREAM_HEADERS_ALLOWANCE,
    SPENT_DEADLINE_MS,
    budget_headers,
    check_headers,
    check_publish_size,
    clean_request_id,
    deadline_ms,
    headers_size,
    parse_traceparent,
    trace_from_headers,
)
from nexus_bus.constants import H_DEADLINE, H_TIMEOUT_MS, H_TRACEPARENT
from nexus_bus.errors import HeadersTooLarge, InvalidRequest, PayloadTooLarge

VALID_TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_request_ids_are_kept_when_clean_and_replaced_otherwise() -> None:
    assert clean_request_id("abc-123") == "abc-123"
    for bad in (None, "", "a b", "x\r\ny", "a" * 129, "<script>"):
        fresh = clean_request_id(bad)
        assert fresh != bad and len(fresh) == 24


def test_traceparent_parsing() -> None:
    ctx = parse_traceparent(VALID_TP)
    assert ctx is not None and ctx.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    for bad in (
        "garbage",
        "00-" + "0" * 32 + "-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-" + "0" * 16 + "-01",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        VALID_TP.upper(),
        VALID_TP + "-more",  # only a later version may append fields
    ):
        assert parse_traceparent(bad) is None
    # A later version is continued, as the tracer continues it: the same trace in both.
    later = parse_traceparent("01" + VALID_TP[2:-2] + "03-and-more")
    assert later is not None and later.trace_id == ctx.trace_id and later.flags == "03"


def test_trace_continues_or_starts() -> None:
    child = trace_from_headers({H_TRACEPARENT: VALID_TP})
    assert child.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert child.span_id != "00f067aa0ba902b7"
    fresh = trace_from_headers({H_TRACEPARENT: "bogus"})
    assert len(fresh.trace_id) == 32 and fresh.trace_id != child.trace_id


def test_deadline_prefers_absolute_then_relative_then_default() -> None:
    now = 1_000_000
    assert deadline_ms({H_DEADLINE: "1000500", H_TIMEOUT_MS: "9"}, now, 5000) == 1_000_500
    assert deadline_ms({H_TIMEOUT_MS: "250"}, now, 5000) == 1_000_250
    assert deadline_ms({H_DEADLINE: "-5", H_TIMEOUT_MS: "x"}, now, 5000) == 1_005_000
    assert budget_headers(0.25, now) == {H_TIMEOUT_MS: "250", H_DEADLINE: "1000250"}


@pytest.mark.parametrize(
    "headers",
    [{H_TIMEOUT_MS: "0"}, {H_TIMEOUT_MS: "000"}, {H_TIMEOUT_MS: "0", H_DEADLINE: "9999999999999"}],
)
def test_a_spent_budget_is_a_deadline_past_any_clock_skew(headers: dict[str, str]) -> None:
    """`Nexus-Timeout-Ms: 0` counted from receipt would still run within the allowed skew."""
    assert deadline_ms(headers, 1_000_000, 5000) == SPENT_DEADLINE_MS


def test_header_checks() -> None:
    headers = {"Nexus-Request-Id": "r" * 24, "traceparent": f"00-{'1' * 32}-{'2' * 16}-01"}
    size = check_headers(headers, max_value_bytes=100, max_total_bytes=1000)
    assert size == headers_size(headers) == len(nats_headers.encode_headers(headers))
    with pytest.raises(InvalidRequest):
        check_headers({"A": "b\r\nX: y"}, max_value_bytes=100, max_total_bytes=1000)
    with pytest.raises(InvalidRequest):
        check_headers({"A B": "b"}, max_value_bytes=100, max_total_bytes=1000)
    with pytest.raises(HeadersTooLarge):
        check_headers({"A": "b" * 11}, max_value_bytes=10, max_total_bytes=1000)
    with pytest.raises(HeadersTooLarge):
        check_headers(
            {f"H{i}": "v" * 9 for i in range(20)}, max_value_bytes=10, max_total_bytes=100
        )


def test_a_publish_is_held_to_max_payload_with_its_headers() -> None:
    headers = {"Nats-Msg-Id": "m" * 32, "Nats-Batch-Sequence": "1"}
    limit = 1000 + len(nats_headers.encode_headers(headers))
    check_publish_size("p", b"x" * 1000, headers, limit)
    with pytest.raises(PayloadTooLarge):
        check_publish_size("p", b"x" * 1001, headers, limit)
    check_publish_size("p", b"x" * limit, None, limit)  # no header block at all
    # Through nats-py's JetStream API: a header block even without headers of ours, and the
    # allowance for the headers nats-py adds.
    block = len(nats_headers.encode_headers({}))
    room = limit - block - JETSTREAM_HEADERS_ALLOWANCE
    check_publish_size("p", b"x" * room, None, limit, jetstream=True)
    with pytest.raises(PayloadTooLarge):
        check_publish_size("p", b"x" * (room + 1), None, limit, jetstream=True)


def test_the_jetstream_allowance_covers_what_nats_py_adds() -> None:
    """nats-py 2.16's own headers at their longest: a 20-digit revision or a 64-character
    stream name, each with a TTL."""
    block = len(nats_headers.encode_headers({}))
    ttl = {"Nats-TTL": "9" * 20}
    for added in (
        {"Nats-Expected-Last-Subject-Sequence": str(2**64 - 1), **ttl},
        {"Nats-Expected-Stream": "S" * 64, **ttl},
    ):
        assert len(nats_headers.encode_headers(added)) - block <= JETSTREAM_HEADERS_ALLOWANCE


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("Bearer ok", None),
        ("", None),
        ("Bearer a\r\nX: y", InvalidRequest),
        ("Bearer \x00", InvalidRequest),
        ("Bearer é", InvalidRequest),
        ("Bearer " + "t" * 94, HeadersTooLarge),  # one byte over max_value_bytes
    ],
)
def test_header_checks_of_the_usual_names(value: str, error: type[Exception] | None) -> None:
    """The one-pass check of the usual header names refuses what the per-header one does."""
    headers = {
        "Nexus-Request-Id": "r" * 24,
        "traceparent": VALID_TP,
        H_TIMEOUT_MS: "5000",
        H_DEADLINE: "1700000000000",
        "Authorization": value,
    }
    if error is None:
        assert check_headers(headers, max_value_bytes=100, max_total_bytes=1000) == (
            len(nats_headers.encode_headers(headers))
        )
        with pytest.raises(HeadersTooLarge):  # the total counts too
            check_headers(headers, max_value_bytes=100, max_total_bytes=100)
    else:
        with pytest.raises(error):
            check_headers(headers, max_value_bytes=100, max_total_bytes=1000)
