"""OpenTelemetry spans of one request, collected in memory: shim → NATS → worker → Redis/KV.

Real nats-server and redis-server of the test's own (so no other worker of the session takes
the request), a real shim and worker in this process, and the SDK's in-memory exporter.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from nexus_bus import Gateway, Operations, RequestContext, Settings, Worker
from nexus_bus.config import TracingSettings
from nexus_bus.embedded import ServerProcess
from nexus_bus.errors import InternalError, Unavailable
from nexus_bus.handlers import builtin_groups
from nexus_bus.jobs.client import wait_job
from nexus_bus.observability.tracing import TRACING, configure_tracing
from tests.conftest import issue_test_token, make_settings
from tests.integration.http_shim import running_shim
from tests.integration.test_jobs import serving

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    assert configure_tracing(
        TracingSettings(), "nexus-test", instance="t", version="0", exporter=exporter
    )
    try:
        yield exporter
    finally:
        TRACING.shutdown()


@pytest.fixture
def own_settings(local_nats: ServerProcess, local_redis: ServerProcess) -> Settings:
    """Settings for this test's own servers: no other worker of the session serves there."""
    return make_settings(local_nats.url, local_redis.url + "/0")


@contextlib.asynccontextmanager
async def data_worker(settings: Settings) -> AsyncIterator[Worker]:
    """A worker serving `data`, started after tracing is configured (its Redis client is
    instrumented when it is created)."""
    worker = Worker(settings, builtin_groups(["data"]))
    await worker.start()
    try:
        yield worker
    finally:
        await worker.drain(1)


@pytest.fixture
async def traced_worker(
    spans: InMemorySpanExporter, own_settings: Settings
) -> AsyncIterator[Worker]:
    async with data_worker(own_settings) as worker:
        yield worker


def tree(spans: tuple[ReadableSpan, ...]) -> dict[int | None, list[ReadableSpan]]:
    """Children by parent span id (None: the roots in this process)."""
    children: dict[int | None, list[ReadableSpan]] = {}
    for span in spans:
        parent = span.parent.span_id if span.parent is not None else None
        children.setdefault(parent, []).append(span)
    return children


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


async def test_one_http_request_is_one_trace_from_the_shim_to_redis(
    spans: InMemorySpanExporter, own_settings: Settings, traced_worker: Worker, uid: str
) -> None:
    settings = own_settings
    token = issue_test_token()
    # Through the worker: a shim answering the read from the cache would make no worker span.
    shim_running = running_shim(settings, cached_reads=False)
    async with shim_running as shim, httpx.AsyncClient(base_url=shim.url) as http:
        auth = {"Authorization": f"Bearer {token}"}
        put = await http.post("/v1/data/put", json={"key": f"t.{uid}", "value": 1}, headers=auth)
        assert put.status_code == 200, put.text
        spans.clear()
        got = await http.post(
            "/v1/data/get",
            json={"key": f"t.{uid}"},
            headers={**auth, "traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-01"},
        )
        assert got.status_code == 200, got.text

    finished = spans.get_finished_spans()
    assert {f"{s.context.trace_id:032x}" for s in finished} == {TRACE_ID}
    children = tree(finished)
    # The shim's server span continues the caller's span.
    (http_span,) = children[int(CALLER_SPAN, 16)]
    assert http_span.name == "POST /v1/{op}/{action}" and http_span.kind is SpanKind.SERVER
    assert attrs(http_span)["http.route"] == "/v1/{op}/{action}"
    (request,) = children[http_span.context.span_id]
    assert request.name == "request nexus.data.get" and request.kind is SpanKind.CLIENT
    assert attrs(request)["messaging.system"] == "nats"
    (process,) = children[request.context.span_id]
    assert process.name == "process nexus.data.get" and process.kind is SpanKind.SERVER
    assert attrs(process)["nexus.attempt"] == 1
    # Authentication and validation are events on the worker's span, in order, before the
    # handler's span starts; the handler's span is the one child.
    (handle,) = children[process.context.span_id]
    assert handle.name == "handle"
    assert [e.name for e in process.events] == ["authenticate", "validate"]
    assert all(e.timestamp <= (handle.start_time or 0) for e in process.events)
    below_handler = children.get(handle.context.span_id, [])
    redis_spans = [
        s
        for s in below_handler
        if attrs(s).get("db.system") == "redis" or attrs(s).get("db.system.name") == "redis"
    ]
    assert redis_spans, [s.name for s in below_handler]
    # The Redis instrumentation never records a key or value: arguments become `?`.
    assert all(f"t.{uid}" not in str(attrs(s)) for s in redis_spans)


async def test_a_read_the_shim_answers_from_the_cache_is_one_trace_in_the_shim(
    spans: InMemorySpanExporter, own_settings: Settings, traced_worker: Worker, uid: str
) -> None:
    """The shim's cached read (docs/cache.md): its server span, and below it the Redis read
    that looked the key up; no NATS request, no worker span."""
    async with running_shim(own_settings) as shim, httpx.AsyncClient(base_url=shim.url) as http:
        auth = {"Authorization": f"Bearer {issue_test_token()}"}
        put = await http.post("/v1/data/put", json={"key": f"c.{uid}", "value": 1}, headers=auth)
        assert put.status_code == 200, put.text
        spans.clear()
        got = await http.post(
            "/v1/data/get",
            json={"key": f"c.{uid}"},
            headers={**auth, "traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-01"},
        )
        assert got.status_code == 200 and got.json()["value"] == 1, got.text

    finished = spans.get_finished_spans()
    assert {f"{s.context.trace_id:032x}" for s in finished} == {TRACE_ID}
    children = tree(finished)
    (http_span,) = children[int(CALLER_SPAN, 16)]
    assert http_span.name == "POST /v1/{op}/{action}" and http_span.kind is SpanKind.SERVER
    below = children.get(http_span.context.span_id, [])
    assert below and all(
        attrs(s).get("db.system") == "redis" or attrs(s).get("db.system.name") == "redis"
        for s in below
    ), [s.name for s in below]
    assert not [s for s in finished if "nexus.data.get" in s.name]


async def test_an_error_answer_marks_the_spans_and_a_gateway_call_continues_its_caller(
    spans: InMemorySpanExporter, own_settings: Settings, traced_worker: Worker, uid: str
) -> None:
    settings = own_settings
    async with await Gateway.connect(settings, token=issue_test_token()) as gw:
        with pytest.raises(Exception, match="not found"):
            await gw.request(
                "data",
                "get",
                {"key": f"none.{uid}"},
                traceparent=f"00-{TRACE_ID}-{CALLER_SPAN}-01",
            )
    finished = spans.get_finished_spans()
    children = tree(finished)
    (request,) = children[int(CALLER_SPAN, 16)]
    assert request.name == "request nexus.data.get"
    assert attrs(request)["error.type"] == "not_found"
    assert request.status.status_code is StatusCode.UNSET  # a 404 is the client's failure
    (process,) = children[request.context.span_id]
    assert attrs(process)["error.type"] == "not_found"


async def test_sampling_ratio_zero_records_new_traces_but_not_sampled_callers(
    own_settings: Settings,
) -> None:
    exporter = InMemorySpanExporter()
    configure_tracing(
        TracingSettings(sample_ratio=0.0),
        "nexus-test",
        instance="t",
        version="0",
        exporter=exporter,
    )
    try:
        async with (
            data_worker(own_settings),
            await Gateway.connect(own_settings, token=issue_test_token()) as gw,
        ):
            await gw.request("data", "list", {})  # a new trace: ratio 0 drops it
            assert exporter.get_finished_spans() == ()
            # A caller that sampled its trace decides for us (parent-based sampling).
            await gw.request("data", "list", {}, traceparent=f"00-{TRACE_ID}-{CALLER_SPAN}-01")
            assert {s.name for s in exporter.get_finished_spans()} >= {
                "request nexus.data.list",
                "process nexus.data.list",
            }
    finally:
        TRACING.shutdown()


def test_tracing_is_off_without_an_endpoint() -> None:
    assert configure_tracing(TracingSettings(), "nexus-test", instance="t", version="0") is False
    assert TRACING.enabled is False and TRACING.current_span_id() is None
    with TRACING.span("nothing") as span:
        assert span is None


async def test_a_job_submission_is_the_parent_of_each_delivery_attempt(
    spans: InMemorySpanExporter, own_settings: Settings, uid: str
) -> None:
    settings = own_settings
    ops = Operations(f"j{uid}")

    @ops.action("flaky")
    async def flaky(req: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
        if ctx.attempt == 1:
            raise Unavailable("not yet")
        return {"attempt": ctx.attempt}

    async with (
        await Gateway.connect(settings, token=issue_test_token()) as gw,
        serving(settings, ops, backoff_base_s=0.1, max_deliver=3),
    ):
        accepted = await gw.submit(
            ops.op, "flaky", {}, traceparent=f"00-{TRACE_ID}-{CALLER_SPAN}-01"
        )
        await wait_job(gw.nc, settings, accepted.job_id, timeout_s=15)

    finished = [s for s in spans.get_finished_spans() if f"{s.context.trace_id:032x}" == TRACE_ID]
    children = tree(tuple(finished))
    (submit,) = [
        s for s in children[int(CALLER_SPAN, 16)] if s.name == f"publish nexus.jobs.{ops.op}.flaky"
    ]
    assert submit.kind is SpanKind.PRODUCER and attrs(submit)["nexus.job_id"] == accepted.job_id
    attempts = sorted(
        (s for s in children[submit.context.span_id] if s.name == f"process nexus.{ops.op}.flaky"),
        key=lambda s: attrs(s)["nexus.attempt"],
    )
    assert [attrs(s)["nexus.attempt"] for s in attempts] == [1, 2]
    assert attrs(attempts[0])["error.type"] == "unavailable"
    assert attempts[0].status.status_code is StatusCode.ERROR
    assert "error.type" not in attrs(attempts[1])


def text_size(span: ReadableSpan) -> int:
    """Characters of a span's string values: attributes, events' attributes, status."""
    values = [*attrs(span).values(), span.status.description or ""]
    for event in span.events:
        values += (event.attributes or {}).values()
    return sum(len(v) for v in values if isinstance(v, str))


async def test_a_handler_exception_with_a_huge_message_makes_a_bounded_span(
    spans: InMemorySpanExporter, own_settings: Settings, uid: str
) -> None:
    """Before: a 3 MB exception message went into the handler's span three times (the
    exception event's message and stack trace, and the status description), a 9 MB span: a
    few of those make an OTLP batch over a collector's request size limit, and every span of
    that batch is lost with them."""
    ops = Operations(f"t{uid}")

    @ops.action("boom")
    async def boom(req: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
        raise RuntimeError(f"broken {uid} " + "x" * 3_000_000 + " end")

    worker = Worker(own_settings, [ops])
    await worker.start()
    try:
        async with await Gateway.connect(own_settings, token=issue_test_token()) as gw:
            with pytest.raises(InternalError):
                await gw.request(ops.op, "boom", {})
    finally:
        await worker.drain(1)
    (handle,) = [s for s in spans.get_finished_spans() if s.name == "handle"]
    assert max(map(text_size, spans.get_finished_spans())) < 256 * 1024
    (event,) = [e for e in handle.events if e.name == "exception"]
    assert (event.attributes or {})["exception.type"] == "RuntimeError"
    assert str((event.attributes or {})["exception.message"]).startswith(f"broken {uid} xxx")
    assert "in boom" in str((event.attributes or {})["exception.stacktrace"])
    assert handle.status.status_code is StatusCode.ERROR


class Unprintable(Exception):
    """An exception whose message cannot be built: its `__str__` raises."""

    def __str__(self) -> str:
        raise RuntimeError("no message")


async def test_a_handler_exception_whose_str_raises_still_ends_its_span(
    spans: InMemorySpanExporter, own_settings: Settings, uid: str
) -> None:
    ops = Operations(f"t{uid}")

    @ops.action("boom")
    async def boom(req: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
        raise Unprintable

    worker = Worker(own_settings, [ops])
    await worker.start()
    try:
        async with await Gateway.connect(own_settings, token=issue_test_token()) as gw:
            with pytest.raises(InternalError):
                await gw.request(ops.op, "boom", {})
    finally:
        await worker.drain(1)
    (handle,) = [s for s in spans.get_finished_spans() if s.name == "handle"]
    (event,) = [e for e in handle.events if e.name == "exception"]
    assert (event.attributes or {})["exception.type"] == "Unprintable"
    assert handle.status.status_code is StatusCode.ERROR


async def test_query_strings_never_reach_a_span(
    spans: InMemorySpanExporter, own_settings: Settings
) -> None:
    async with running_shim(own_settings) as shim, httpx.AsyncClient(base_url=shim.url) as http:
        await http.get("/v1/events/orders?ticket=s3cret-ticket")
    (span,) = [s for s in spans.get_finished_spans() if s.name == "GET /v1/events/{topic}"]
    assert "s3cret" not in str(attrs(span)) and attrs(span)["url.path"] == "/v1/events/orders"


async def test_latency_buckets_carry_the_trace_as_an_openmetrics_exemplar(
    spans: InMemorySpanExporter, own_settings: Settings, traced_worker: Worker, uid: str
) -> None:
    settings = own_settings
    async with running_shim(settings) as shim, httpx.AsyncClient(base_url=shim.url) as http:
        await http.post(
            "/v1/data/list",
            json={"prefix": uid},
            headers={
                "Authorization": f"Bearer {issue_test_token()}",
                "traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-01",
            },
        )
        openmetrics = await http.get(
            "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        )
        plain = await http.get("/metrics")
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    exemplars = [
        line
        for line in openmetrics.text.splitlines()
        if line.startswith("nexus_request_duration_seconds_bucket")
        and f'trace_id="{TRACE_ID}"' in line
    ]
    assert any('transport="http"' in line for line in exemplars), exemplars
    assert any('transport="nats"' in line for line in exemplars), exemplars  # the worker's
    # Scrapers that ask for Prometheus's text format get it, without exemplars.
    assert plain.headers["content-type"].startswith("text/plain") and "trace_id" not in plain.text


async def test_an_unsampled_caller_leaves_no_span_and_no_orphan_trace_anywhere(
    spans: InMemorySpanExporter, own_settings: Settings, traced_worker: Worker, uid: str
) -> None:
    settings = own_settings
    async with running_shim(settings) as shim, httpx.AsyncClient(base_url=shim.url) as http:
        auth = {"Authorization": f"Bearer {issue_test_token()}"}
        await http.post("/v1/data/put", json={"key": f"u.{uid}", "value": 1}, headers=auth)
        spans.clear()
        got = await http.post(
            "/v1/data/get",
            json={"key": f"u.{uid}"},
            headers={**auth, "traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-00"},
        )
        assert got.status_code == 200
    # A Redis command outside any request starts no trace of its own either.
    assert traced_worker.services is not None
    await traced_worker.services.redis.ping()
    assert spans.get_finished_spans() == ()
