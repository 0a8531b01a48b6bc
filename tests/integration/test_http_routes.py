"""The HTTP shim's routes and status mapping over real NATS, Redis and workers."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import httpx
import msgspec
import pytest

from nexus_bus import Gateway, InvalidRequest, NotFound, Settings, Worker
from nexus_bus.embedded import ServerProcess
from nexus_bus.handlers import BUILTIN
from nexus_bus.resilience.policy import PolicyTable
from nexus_bus.specs import openapi_document
from tests.conftest import make_settings
from tests.integration.http_shim import (
    PROBE_OP,
    RunningShim,
    bearer,
    poll_until,
    probe_worker,
    running_shim,
)
from tests.integration.registry_ops import register_and_stop


@pytest.fixture(scope="module")
async def shim(settings: Settings, worker: Worker) -> AsyncIterator[RunningShim]:
    async with probe_worker(settings), running_shim(settings) as running:
        yield running


@pytest.fixture
async def client(shim: RunningShim, admin_token: str | None) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=shim.url, headers=bearer(admin_token)) as c:
        yield c


def problem(resp: httpx.Response, status: int, code: str) -> dict[str, object]:
    """Assert `resp` is a problem document with this status and code; return it."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/problem+json"
    doc: dict[str, object] = resp.json()
    assert doc["status"] == status and doc["code"] == code, doc
    assert doc["request_id"] == resp.headers["x-request-id"]
    return doc


async def test_put_then_get_round_trips_the_reply(client: httpx.AsyncClient, uid: str) -> None:
    key = f"http.{uid}"
    put = await client.post("/v1/data/put", json={"key": key, "value": {"n": [1, "x"]}})
    assert put.status_code == 200 and put.headers["content-type"] == "application/json"
    assert put.headers["x-request-id"]
    got = await client.post("/v1/data/get", json={"key": key})
    assert got.status_code == 200
    assert got.json() == {"key": key, "value": {"n": [1, "x"]}, "revision": put.json()["revision"]}


async def test_status_comes_from_nexus_status(client: httpx.AsyncClient, uid: str) -> None:
    missing = await client.post("/v1/data/get", json={"key": f"missing.{uid}"})
    problem(missing, 404, "not_found")
    key = f"cas.{uid}"
    await client.post("/v1/data/put", json={"key": key, "value": 1, "expected_revision": 0})
    again = await client.post("/v1/data/put", json={"key": key, "value": 2, "expected_revision": 0})
    problem(again, 409, "conflict")
    invalid = await client.post("/v1/data/get", json={"key": "has space"})
    problem(invalid, 400, "invalid_request")
    unknown_action = await client.post("/v1/data/nosuchaction", json={})
    problem(unknown_action, 404, "unknown_operation")


async def test_request_id_is_echoed_or_replaced(client: httpx.AsyncClient) -> None:
    mine = f"req-{uuid.uuid4().hex[:8]}"
    resp = await client.post(f"/v1/{PROBE_OP}/echo", json={}, headers={"X-Request-Id": mine})
    assert resp.headers["x-request-id"] == mine and resp.json()["request_id"] == mine
    bad = await client.post(f"/v1/{PROBE_OP}/echo", json={}, headers={"X-Request-Id": "a b;c"})
    assert bad.headers["x-request-id"] != "a b;c"
    assert bad.json()["request_id"] == bad.headers["x-request-id"]
    err = await client.post("/v1/data/get", json={"key": "x y"}, headers={"X-Request-Id": mine})
    assert problem(err, 400, "invalid_request")["request_id"] == mine


async def test_metadata_reaches_the_worker(client: httpx.AsyncClient) -> None:
    trace_id = uuid.uuid4().hex
    resp = await client.post(
        f"/v1/{PROBE_OP}/echo",
        json={"note": "hi"},
        headers={
            "traceparent": f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01",
            "tracestate": "vendor=opaque",
            "Idempotency-Key": "idem-123",
            "Nexus-Timeout-Ms": "1500",
        },
    )
    seen = resp.json()
    assert resp.status_code == 200 and seen["note"] == "hi"
    assert seen["trace_id"] == trace_id and seen["tracestate"] == "vendor=opaque"
    assert seen["idempotency_key"] == "idem-123"
    assert seen["timeout_ms"] == "1500"
    assert seen["client_ip"] == "127.0.0.1"


async def test_invalid_traceparent_is_replaced_and_tracestate_dropped(
    client: httpx.AsyncClient,
) -> None:
    resp = await client.post(
        f"/v1/{PROBE_OP}/echo",
        json={},
        headers={"traceparent": "00-" + "0" * 32 + "-" + "1" * 16 + "-01", "tracestate": "x=y"},
    )
    seen = resp.json()
    assert len(seen["trace_id"]) == 32 and seen["trace_id"] != "0" * 32
    assert seen["tracestate"] is None


async def test_a_later_version_traceparent_keeps_its_trace_and_tracestate(
    client: httpx.AsyncClient,
) -> None:
    """W3C Trace Context: a later version is read as version 00, and the trace kept."""
    trace_id = uuid.uuid4().hex
    headers = [
        ("traceparent", f"01-{trace_id}-b7ad6b7169203331-01"),
        ("tracestate", "congo=t61"),
        ("tracestate", "rojo=00f067aa0ba902b7"),  # repeated lines are one list
    ]
    seen = (await client.post(f"/v1/{PROBE_OP}/echo", json={}, headers=headers)).json()
    assert seen["trace_id"] == trace_id
    assert seen["tracestate"] == "congo=t61, rojo=00f067aa0ba902b7"


async def test_a_tracestate_with_tabs_between_its_members_is_forwarded(
    client: httpx.AsyncClient,
) -> None:
    """W3C Trace Context lets a tracestate list put spaces or tabs around its commas (OWS).
    A NATS header cannot carry a tab, and the shim answered such a request 400; the tabs
    travel as spaces, which mean the same."""
    trace_id = uuid.uuid4().hex
    headers = {"traceparent": f"00-{trace_id}-b7ad6b7169203331-01", "tracestate": "a=1,\tb=2"}
    resp = await client.post(f"/v1/{PROBE_OP}/echo", json={}, headers=headers)
    assert resp.status_code == 200, resp.text
    assert resp.json()["trace_id"] == trace_id and resp.json()["tracestate"] == "a=1, b=2"


async def test_timeout_budget_is_capped_and_validated(
    settings: Settings, client: httpx.AsyncClient
) -> None:
    seen = (await client.post(f"/v1/{PROBE_OP}/echo", json={})).json()
    assert seen["timeout_ms"] == str(settings.client.default_timeout_ms)
    huge = await client.post(
        f"/v1/{PROBE_OP}/echo", json={}, headers={"Nexus-Timeout-Ms": "999999999"}
    )
    # Capped by the shim's maximum, then by the operation's policy (30 s unless configured).
    policy_ms = int(PolicyTable(settings.resilience).get(PROBE_OP, "echo").timeout_s * 1000)
    assert huge.json()["timeout_ms"] == str(min(settings.http.max_timeout_ms, policy_ms))
    # Any integer the published schema admits (1 to 16 digits) is capped, not refused.
    for large in ("9999999999", "1000000000000000", "0000000000002000"):
        resp = await client.post(
            f"/v1/{PROBE_OP}/echo", json={}, headers={"Nexus-Timeout-Ms": large}
        )
        expected = min(int(large), settings.http.max_timeout_ms, policy_ms)
        assert resp.json()["timeout_ms"] == str(expected), large
    for bad in ("-5", "abc", "1.5", "1" * 17):
        resp = await client.post(
            f"/v1/{PROBE_OP}/echo", json={}, headers={"Nexus-Timeout-Ms": bad}
        )
        problem(resp, 400, "invalid_request")


async def test_unknown_fields_are_refused_naming_the_field(
    client: httpx.AsyncClient, gateway: Gateway, uid: str
) -> None:
    """`role` is not a field of data.put: 400 on both paths, and nothing is written."""
    body = {"key": f"role.{uid}", "value": 1, "role": "admin"}
    found = problem(await client.post("/v1/data/put", json=body), 400, "invalid_request")
    assert "unknown field `role`" in str(found["detail"])
    with pytest.raises(InvalidRequest, match="unknown field `role`"):
        await gateway.request("data", "put", body)
    with pytest.raises(NotFound):
        await gateway.request("data", "get", {"key": f"role.{uid}"})
    nested = {"messages": [{"role": "user", "content": "hi", "name": "x"}]}
    found = problem(await client.post("/v1/ai/complete", json=nested), 400, "invalid_request")
    assert "unknown field `name`" in str(found["detail"])


async def test_an_operation_may_declare_it_accepts_unknown_fields(
    client: httpx.AsyncClient, gateway: Gateway
) -> None:
    loose = await client.post(f"/v1/{PROBE_OP}/loose", json={"note": "n", "extra": 1})
    assert loose.status_code == 200 and loose.json() == {"note": "n"}
    assert await gateway.request(PROBE_OP, "loose", {"note": "m", "extra": 1}) == {"note": "m"}
    problem(await client.post(f"/v1/{PROBE_OP}/echo", json={"extra": 1}), 400, "invalid_request")


async def test_a_spent_budget_is_not_forwarded(
    settings: Settings, client: httpx.AsyncClient, uid: str
) -> None:
    """`Nexus-Timeout-Ms: 0`: the answer a caller gets once its deadline passed, unsent."""
    for spent in ("0", "00"):
        resp = await client.post(
            "/v1/data/put",
            json={"key": f"spent.{uid}", "value": 1},
            headers={"Nexus-Timeout-Ms": spent},
        )
        problem(resp, 504, "upstream_timeout")
    assert (await client.post("/v1/data/get", json={"key": f"spent.{uid}"})).status_code == 404


async def test_slow_operation_is_a_504(client: httpx.AsyncClient) -> None:
    resp = await client.post(
        f"/v1/{PROBE_OP}/sleep", json={"ms": 3000}, headers={"Nexus-Timeout-Ms": "300"}
    )
    problem(resp, 504, "upstream_timeout")


@pytest.mark.parametrize(("code", "status"), [("rate_limited", 429), ("unavailable", 503),
                                               ("circuit_open", 503)])
async def test_retryable_errors_carry_retry_after(
    client: httpx.AsyncClient, settings: Settings, code: str, status: int
) -> None:
    resp = await client.post(f"/v1/{PROBE_OP}/fail", json={"code": code})
    problem(resp, status, code)
    assert resp.headers["retry-after"] == str(settings.http.retry_after_s)


async def test_unknown_ops_are_404_and_unserved_ones_503_with_retry_after(
    settings: Settings, client: httpx.AsyncClient, uid: str
) -> None:
    problem(await client.post(f"/v1/nosuch{uid}/this", json={}), 404, "unknown_operation")
    op = f"unserved{uid}"
    await register_and_stop(settings, op)  # declared by a worker that has stopped since
    resp = await client.post(f"/v1/{op}/hello", json={})
    problem(resp, 503, "no_responders")
    assert resp.headers["retry-after"].isdigit()


async def test_internal_errors_are_500_problems(client: httpx.AsyncClient) -> None:
    resp = await client.post(f"/v1/{PROBE_OP}/fail", json={"code": "internal"})
    problem(resp, 500, "internal")
    assert "retry-after" not in resp.headers


async def test_missing_token_is_401_with_bearer_challenge(
    shim: RunningShim, admin_token: str | None
) -> None:
    if admin_token is None:
        pytest.skip("authentication is off in this test run")
    async with httpx.AsyncClient(base_url=shim.url) as anonymous:
        resp = await anonymous.post("/v1/data/get", json={"key": "k"})
        problem(resp, 401, "invalid_token")
        assert resp.headers["www-authenticate"] == 'Bearer realm="nexus-bus"'
        forged = await anonymous.post(
            "/v1/data/get", json={"key": "k"}, headers={"Authorization": "Bearer not.a.token"}
        )
        problem(forged, 401, "invalid_token")
        assert 'error="invalid_token"' in forged.headers["www-authenticate"]


@pytest.mark.parametrize(
    "authorization",
    [b"Bearer abc\xc3\xa9", b"Bearer " + b"a" * 5000],
    ids=["non-ascii", "oversized"],
)
async def test_a_token_no_nats_header_can_carry_is_401_as_on_every_route(
    shim: RunningShim, authorization: bytes
) -> None:
    """Not 400 or 431 from the header check: the answer the async path and workers give."""
    async with httpx.AsyncClient(base_url=shim.url) as c:
        for prefer in ({}, {"Prefer": "respond-async"}):
            headers = {"Authorization": authorization, **prefer}
            resp = await c.post(f"/v1/{PROBE_OP}/echo", json={}, headers=headers)
            problem(resp, 401, "invalid_token")
            assert resp.headers["www-authenticate"].startswith("Bearer")


async def test_token_without_the_scope_is_403(shim: RunningShim, admin_token: str | None) -> None:
    if admin_token is None:
        pytest.skip("authentication is off in this test run")
    from tests.conftest import issue_test_token

    reader = issue_test_token(("data:get",), subject="http-reader")
    async with httpx.AsyncClient(base_url=shim.url, headers=bearer(reader)) as c:
        resp = await c.post("/v1/data/put", json={"key": "k", "value": 1})
        problem(resp, 403, "forbidden")
        assert "www-authenticate" not in resp.headers


async def test_msgpack_in_and_out(client: httpx.AsyncClient, uid: str) -> None:
    key = f"mp.{uid}"
    body = msgspec.msgpack.encode({"key": key, "value": [1, 2]})
    headers = {"Content-Type": "application/msgpack"}
    put = await client.post("/v1/data/put", content=body, headers=headers)
    assert put.status_code == 200 and put.headers["content-type"] == "application/msgpack"
    got = await client.post(
        "/v1/data/get", content=msgspec.msgpack.encode({"key": key}), headers=headers
    )
    assert msgspec.msgpack.decode(got.content)["value"] == [1, 2]


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/nope", 404, "not_found"),
        ("POST", "/v1/data", 404, "not_found"),
        ("POST", "/v1/data/get/extra", 404, "not_found"),
        ("POST", "/v1//get", 404, "not_found"),
        ("POST", "/v1/Data/get", 404, "not_found"),
        ("POST", "/v1/da%20ta/get", 404, "not_found"),
        ("POST", "/v1/sys/anything", 404, "unknown_operation"),
        ("POST", "/v1/dlq/list", 404, "unknown_operation"),
        ("GET", "/v1/data/get", 405, "method_not_allowed"),
        ("POST", "/healthz", 405, "method_not_allowed"),
        ("POST", "/v1/events/topic", 405, "method_not_allowed"),
        # Starlette's router: its own plain-text 404/405 and slash redirects never show.
        ("GET", "/v1/ops/", 404, "not_found"),
        ("GET", "/healthz/", 404, "not_found"),
        ("POST", "/v1/jobs/some-id", 405, "method_not_allowed"),
        ("GET", "/v1/events/topic/ticket", 405, "method_not_allowed"),
        ("POST", "/docs/swagger-ui.css", 405, "method_not_allowed"),
        ("GET", "/docs/nope.js", 404, "not_found"),
    ],
)
async def test_unknown_routes_and_methods_are_problems(
    client: httpx.AsyncClient, method: str, path: str, status: int, code: str
) -> None:
    resp = await client.request(method, path, json={})
    problem(resp, status, code)
    if status == 405:
        assert resp.headers["allow"] in ("GET", "GET, HEAD", "POST")


async def test_health_readiness_metrics_openapi(client: httpx.AsyncClient) -> None:
    health = await client.get("/healthz")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"nats": True, "redis": True, "draining": False}
    await client.post(f"/v1/{PROBE_OP}/echo", json={})
    metrics = await client.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    assert f'nexus_request_duration_seconds_count{{action="echo",op="{PROBE_OP}"' in metrics.text
    assert 'transport="http"' in metrics.text
    for malformed in ("application/openmetrics-text; version=abc", "text/plain; version=1.a"):
        # prometheus_client raises on these; the text format is the answer, not a 500.
        lenient = await client.get("/metrics", headers={"Accept": malformed})
        assert lenient.status_code == 200
        assert lenient.headers["content-type"].startswith("text/plain")
    spec = await client.get("/openapi.json")
    assert spec.status_code == 200
    assert spec.json() == msgspec.json.decode(
        msgspec.json.encode(openapi_document(list(BUILTIN.values())))
    )
    assert "/v1/data/get" in spec.json()["paths"]


async def test_invented_operations_do_not_become_metric_labels(
    client: httpx.AsyncClient, uid: str
) -> None:
    await client.post(f"/v1/data/invented{uid}", json={})
    await client.post(f"/v1/madeup{uid}/x", json={})
    # The worker runs in this process too; only the shim's own series (transport="http") count.
    lines = [x for x in (await client.get("/metrics")).text.splitlines() if 'transport="http"' in x]
    assert not [x for x in lines if f"invented{uid}" in x or f"madeup{uid}" in x]
    assert [x for x in lines if 'op="_other"' in x]


async def test_readiness_follows_nats_and_redis(
    local_nats: ServerProcess, local_redis: ServerProcess
) -> None:
    own = make_settings(local_nats.url, local_redis.url + "/0")
    async with running_shim(own) as running, httpx.AsyncClient(base_url=running.url) as c:
        assert (await c.get("/readyz")).status_code == 200
        local_redis.kill()
        down = await c.get("/readyz")
        problem(down, 503, "unavailable")
        assert down.json()["checks"] == {"nats": True, "redis": False, "draining": False}
        assert down.headers["retry-after"]
        local_nats.kill()

        async def nats_down() -> bool:
            return bool((await c.get("/readyz")).json()["checks"]["nats"] is False)

        await poll_until(nats_down, 10)
        # Alive all along: liveness must not restart a process that waits for its servers.
        assert (await c.get("/healthz")).status_code == 200
        local_nats.start()
        local_redis.start()

        async def ready() -> bool:
            return (await c.get("/readyz")).status_code == 200

        await poll_until(ready, 15)
