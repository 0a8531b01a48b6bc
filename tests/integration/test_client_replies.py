"""The gateway client against malformed replies: a responder that is not a nexus-bus worker
(or a broken one) answers on a real NATS server, and the client raises the documented
`NexusError`s, never a stray exception from decoding."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import nats.aio.client
import nats.errors
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY

from nexus_bus import Gateway, Settings
from nexus_bus.config import TracingSettings
from nexus_bus.constants import UNKNOWN_LABEL
from nexus_bus.errors import InternalError, NexusError
from nexus_bus.observability.metrics import MAX_ERROR_CODES
from nexus_bus.observability.tracing import TRACING, configure_tracing

Replies = dict[str, tuple[dict[str, str] | None, bytes]]


@pytest.fixture
async def answering(
    nats_pair: tuple[nats.aio.client.Client, ...], settings: Settings, uid: str
) -> AsyncIterator[tuple[Gateway, str, Replies]]:
    """A gateway, the op a fake responder serves, and the replies it gives per action."""
    server_side, client = nats_pair
    replies: Replies = {}

    async def answer(msg: nats.aio.client.Msg) -> None:
        headers, body = replies[msg.subject.rsplit(".", 1)[-1]]
        await server_side.publish(msg.reply, body, headers=headers)

    op = f"fake{uid}"
    await server_side.subscribe(f"nexus.{op}.*", cb=answer)
    await server_side.flush()
    # A flushed subscription of another connection was still answered "no responders" now
    # and then (about one request in a hundred): wait until it answers.
    replies["ready"] = ({"Nexus-Status": "200"}, b"{}")
    for _ in range(100):
        with contextlib.suppress(nats.errors.NoRespondersError):
            await client.request(f"nexus.{op}.ready", b"", timeout=1)
            break
        await asyncio.sleep(0.01)
    yield Gateway(client, settings), op, replies


@pytest.mark.parametrize("status", ["000", "099", "100", "199", "302"])
async def test_a_status_no_worker_sends_is_an_internal_error(
    answering: tuple[Gateway, str, Replies], status: str
) -> None:
    gateway, op, replies = answering
    replies["get"] = ({"Nexus-Status": status}, b'{"key": "k"}')
    with pytest.raises(InternalError):
        await gateway.request(op, "get", {"key": "k"}, timeout=2)


async def test_a_deeply_nested_error_body_is_an_internal_error(
    answering: tuple[Gateway, str, Replies],
) -> None:
    gateway, op, replies = answering
    deep = b'{"a":' * 5000 + b"1" + b"}" * 5000
    replies["get"] = ({"Nexus-Status": "500"}, deep)
    replies["put"] = (None, deep)  # no Nexus-Status: taken as 500
    for action in ("get", "put"):
        with pytest.raises(InternalError, match="without a problem document"):
            await gateway.request(op, action, {}, timeout=2)


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        ({"Nexus-Status": "200"}, b"<html>oops</html>"),
        ({"Nexus-Status": "200"}, b'{"key": "k"} trailing'),
        ({"Nexus-Status": "200"}, b"[" * 5000),
        ({"Nexus-Status": "200", "Content-Type": "text/html"}, b"{}"),
        ({"Nexus-Status": "200", "Content-Type": "application/msgpack"}, b"\xc1"),
    ],
    ids=["not-json", "trailing", "deep", "content-type", "bad-msgpack"],
)
async def test_a_success_reply_that_does_not_decode_is_an_internal_error(
    answering: tuple[Gateway, str, Replies], headers: dict[str, str], body: bytes
) -> None:
    # The caller's request was fine: 400 invalid_request or 415 would send it looking for a
    # fault in its own input.
    gateway, op, replies = answering
    replies["get"] = (headers, body)
    with pytest.raises(InternalError, match=f"{op}.get replied with a body"):
        await gateway.request(op, "get", {"key": "k"}, timeout=2)


async def test_error_codes_a_responder_invents_do_not_grow_the_metrics_without_bound(
    answering: tuple[Gateway, str, Replies],
) -> None:
    """Every distinct `code` in a reply body was a new `nexus_error_rate_total` series for
    good: a broken or hostile responder (or a handler passing on what one sent) could grow
    the client's /metrics, and Prometheus, without bound."""
    gateway, op, replies = answering
    for i in range(300):
        code = f"made_up_{i}" if i % 2 else "x" * 5000 + str(i)
        problem = {"type": "about:blank", "title": "x", "status": 503, "code": code}
        replies["get"] = ({"Nexus-Status": "503"}, json.dumps(problem).encode())
        with pytest.raises(NexusError):
            await gateway.request(op, "get", {}, timeout=2)
    codes = {
        sample.labels["code"]
        for family in REGISTRY.collect()
        if family.name == "nexus_error_rate"
        for sample in family.samples
        if sample.labels.get("op") == op
    }
    assert len(codes) <= MAX_ERROR_CODES
    assert UNKNOWN_LABEL in codes
    assert all(len(code) <= 64 for code in codes)


async def test_an_error_code_header_a_responder_invents_is_bounded_in_the_client_span(
    answering: tuple[Gateway, str, Replies],
) -> None:
    """Before: the client span's `error.type` was the `Nats-Service-Error` header's code as
    sent, so a responder's 500 KB header made a 500 KB attribute on every such span."""
    gateway, op, replies = answering
    code = "c" * 500_000
    replies["get"] = ({"Nexus-Status": "503", "Nats-Service-Error": f"{code}: x"}, b"{}")
    spans = InMemorySpanExporter()
    assert configure_tracing(
        TracingSettings(), "nexus-test", instance="t", version="0", exporter=spans
    )
    try:
        with pytest.raises(NexusError):
            await gateway.request(
                op, "get", {}, timeout=2, traceparent=f"00-{'a' * 32}-{'b' * 16}-01"
            )
    finally:
        TRACING.shutdown()
    [span] = [s for s in spans.get_finished_spans() if s.name == f"request nexus.{op}.get"]
    error_type = str((span.attributes or {})["error.type"])
    assert error_type.startswith("ccc") and len(error_type) <= 300
    assert len(span.status.description or "") <= 300
