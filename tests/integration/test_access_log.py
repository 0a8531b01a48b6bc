"""Access lines: one JSON line per request in the shim and in the worker, joined by trace id.

A real shim and a real worker in this process, logging into one captured sink at INFO.
"""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from nexus_bus import Settings
from nexus_bus.config import LogSettings
from nexus_bus.observability import configure_logging
from tests.integration.http_shim import (
    PROBE_OP,
    RunningShim,
    bearer,
    probe_worker,
    running_shim,
)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def with_log(settings: Settings, **log: Any) -> Settings:
    """`settings` with its log section changed (validated)."""
    merged = LogSettings(**{**settings.log.model_dump(), **log})
    return settings.model_copy(update={"log": merged})


@pytest.fixture
def sink() -> Iterator[io.StringIO]:
    captured = io.StringIO()
    configure_logging("nexus-test", "INFO", sink=captured)
    try:
        yield captured
    finally:
        configure_logging("nexus-test", "WARNING", json_lines=False)


def access_lines(sink: io.StringIO, request_id: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in sink.getvalue().splitlines()]
    return [
        doc for doc in lines if doc["message"] == "access" and doc["correlation_id"] == request_id
    ]


@pytest.fixture
async def shim(settings: Settings, sink: io.StringIO) -> AsyncIterator[RunningShim]:
    logged = with_log(settings, level="INFO")  # access lines are on by default
    async with probe_worker(logged), running_shim(logged) as running:
        yield running


@pytest.fixture
async def client(
    shim: RunningShim, admin_token: str | None
) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=shim.url, headers=bearer(admin_token)) as c:
        yield c


async def test_one_line_per_request_in_shim_and_worker_sharing_the_trace(
    client: httpx.AsyncClient, sink: io.StringIO, admin_token: str | None, uid: str
) -> None:
    resp = await client.post(
        f"/v1/{PROBE_OP}/echo", json={"note": "hi"}, headers={"X-Request-Id": f"acc-{uid}"}
    )
    assert resp.status_code == 200
    seen_trace = resp.json()["trace_id"]  # the trace the handler ran in
    lines = access_lines(sink, f"acc-{uid}")
    assert sorted(doc["transport"] for doc in lines) == ["http", "nats"]
    shim = next(doc for doc in lines if doc["transport"] == "http")
    worker = next(doc for doc in lines if doc["transport"] == "nats")
    assert shim["trace_id"] == worker["trace_id"] == seen_trace
    assert {k: shim[k] for k in ("level", "method", "route", "op", "action", "status")} == {
        "level": "INFO",
        "method": "POST",
        "route": "/v1/{op}/{action}",
        "op": PROBE_OP,
        "action": "echo",
        "status": 200,
    }
    assert shim["request_id"] == worker["request_id"] == f"acc-{uid}"
    assert shim["client"] == "127.0.0.1"
    assert (worker["op"], worker["action"], worker["status"]) == (PROBE_OP, "echo", 200)
    assert 0 < worker["duration_ms"] <= shim["duration_ms"] < 5000
    if admin_token:
        assert admin_token not in sink.getvalue()  # no token ever reaches a log line


async def test_the_client_trace_and_failures_are_logged_too(
    client: httpx.AsyncClient, sink: io.StringIO, uid: str
) -> None:
    traced = await client.post(
        f"/v1/{PROBE_OP}/echo",
        json={},
        headers={"X-Request-Id": f"tr-{uid}", "traceparent": TRACEPARENT},
    )
    assert traced.status_code == 200
    assert {doc["trace_id"] for doc in access_lines(sink, f"tr-{uid}")} == {TRACE_ID}
    refused = await client.post(
        f"/v1/{PROBE_OP}/fail", json={"code": "conflict"}, headers={"X-Request-Id": f"f-{uid}"}
    )
    assert refused.status_code == 409
    assert sorted(doc["status"] for doc in access_lines(sink, f"f-{uid}")) == [409, 409]
    missing = await client.get(f"/v1/jobs/{'0' * 32}", headers={"X-Request-Id": f"j-{uid}"})
    [line] = access_lines(sink, f"j-{uid}")  # answered by the shim alone
    assert (line["route"], line["op"]) == ("/v1/jobs/{id}", None)
    assert line["status"] == missing.status_code == 404


async def test_access_lines_can_be_turned_off(
    settings: Settings, admin_token: str | None, sink: io.StringIO, uid: str
) -> None:
    quiet = with_log(settings, level="INFO", access=False)
    async with (
        probe_worker(quiet),
        running_shim(quiet) as shim,
        httpx.AsyncClient(base_url=shim.url, headers=bearer(admin_token)) as c,
    ):
        resp = await c.post(f"/v1/{PROBE_OP}/echo", json={}, headers={"X-Request-Id": f"q-{uid}"})
    assert resp.status_code == 200
    assert access_lines(sink, f"q-{uid}") == []
