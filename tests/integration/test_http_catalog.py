"""The shim describing itself: the `/docs` page (offline), `/asyncapi.json` and `/v1/ops`."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from urllib.parse import urljoin, urlsplit

import httpx
import jsonschema
import msgspec
import pytest

from nexus_bus import Settings, Worker
from nexus_bus.registry.policies import gateway_policy
from nexus_bus.resilience.policy import PolicySettings, PolicyTable
from tests.integration.http_shim import (
    PROBE_OP,
    RunningShim,
    bearer,
    probe_ops,
    probe_worker,
    running_shim,
)
from tests.integration.registry_ops import register_and_stop

CONTENT_TYPES = {".css": "text/css", ".js": "text/javascript", ".png": "image/png"}


@pytest.fixture(scope="module")
async def shim(settings: Settings, worker: Worker) -> AsyncIterator[RunningShim]:
    async with probe_worker(settings), running_shim(settings) as running:
        yield running


@pytest.fixture
async def client(shim: RunningShim) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=shim.url, timeout=10) as c:
        yield c


async def test_docs_page_loads_only_local_assets(client: httpx.AsyncClient) -> None:
    page = await client.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp
    refs = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert len(refs) >= 5
    page_url = str(page.url)
    loaded = set()
    for ref in refs:
        url = urljoin(page_url, ref)
        assert urlsplit(url).netloc == urlsplit(page_url).netloc, f"{ref} is not local"
        resp = await client.get(url)
        assert resp.status_code == 200, ref
        suffix = "." + ref.rsplit(".", 1)[-1]
        if suffix in CONTENT_TYPES:
            assert resp.headers["content-type"].startswith(CONTENT_TYPES[suffix]), ref
            loaded.add(ref.rsplit("/", 1)[-1])
    bundle = await client.get("/docs/swagger-ui-bundle.js")
    assert b"SwaggerUIBundle" in bundle.content and len(bundle.content) > 500_000
    init = (await client.get("/docs/nexus-init.js")).text
    assert 'url: "openapi.json"' in init  # what the page renders: this shim's document
    assert {"swagger-ui.css", "swagger-ui-bundle.js", "nexus-init.js"} <= loaded


async def test_only_listed_assets_are_served(client: httpx.AsyncClient) -> None:
    for path in ("/docs/../pyproject.toml", "/docs/swagger-editor.js", "/docs/LICENSE",
                 "/docs/%2e%2e/etc/passwd", "/docs/"):
        resp = await client.get(path)
        assert resp.status_code == 404, path
    resp = await client.post("/docs/swagger-ui.css")
    assert resp.status_code == 405


async def test_asyncapi_document_is_served(client: httpx.AsyncClient) -> None:
    resp = await client.get("/asyncapi.json")
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
    doc = resp.json()
    assert doc["asyncapi"].startswith("3.") and "data.get" in doc["channels"]


async def test_a_messagepack_call_is_one_the_openapi_document_describes(
    client: httpx.AsyncClient, admin_token: str | None, uid: str
) -> None:
    """MessagePack bodies are part of the contract, and a MessagePack request is answered in
    MessagePack; the document listed only JSON, so a client generated from it (or a schema
    fuzzer) could neither send the one nor accept the other."""
    operation = (await client.get("/openapi.json")).json()["paths"]["/v1/data/get"]["post"]
    key = f"mp.{uid}"
    auth = bearer(admin_token)
    put = await client.post("/v1/data/put", json={"key": key, "value": [1]}, headers=auth)
    assert put.status_code == 200, put.text
    got = await client.post(
        "/v1/data/get",
        content=msgspec.msgpack.encode({"key": key}),
        headers={**auth, "Content-Type": "application/msgpack"},
    )
    assert got.status_code == 200, got.text
    assert msgspec.msgpack.decode(got.content)["value"] == [1]
    assert "application/msgpack" in operation["requestBody"]["content"]
    assert got.headers["content-type"] in operation["responses"]["200"]["content"]


async def test_an_idempotency_key_a_worker_refuses_is_one_the_openapi_document_refuses(
    client: httpx.AsyncClient, admin_token: str | None, uid: str
) -> None:
    """Workers refuse a key over 255 characters with 400 (docs/resilience.md); the published
    parameter was any string, so a client keeping to the document got that 400."""
    doc = (await client.get("/openapi.json")).json()
    allows = jsonschema.Draft202012Validator(
        doc["components"]["parameters"]["Idempotency-Key"]["schema"]
    ).is_valid
    body = {"key": f"idem.{uid}", "value": 1}
    long = uid + "k" * 300  # unique: a key is kept for a day, with the body it first came with
    for key in [long[:200], long[:255], long[:256], f"{uid} a key, with = and spaces"]:
        resp = await client.post(
            "/v1/data/put", json=body, headers={**bearer(admin_token), "Idempotency-Key": key}
        )
        assert resp.status_code in (200, 400), resp.text
        assert allows(key) == (resp.status_code == 200), (len(key), resp.text)


async def test_ops_lists_declared_operations_and_who_serves_them(
    settings: Settings, client: httpx.AsyncClient, admin_token: str | None, uid: str
) -> None:
    stopped = f"stopped{uid}"
    registration = await register_and_stop(settings, stopped)
    resp = await client.get("/v1/ops", headers=bearer(admin_token))
    assert resp.status_code == 200, resp.text
    listed = {o["op"]: o for o in resp.json()["operations"]}
    probe = listed[PROBE_OP]
    assert probe["served"] and probe["instances"] >= 1 and probe["declared_by"] == "registry"
    echo = next(a for a in probe["actions"] if a["action"] == "echo")
    assert echo["scope"] == f"{PROBE_OP}:echo"
    assert echo["schema"]["$defs"]["request"] and echo["schema"]["$defs"]["reply"] is not None
    assert listed["data"]["served"]  # the session's worker
    assert listed[stopped]["served"] is False and listed[stopped]["instances"] == 0
    assert registration.declarations[0].op == stopped
    assert sorted(a.action for a in probe_ops) == [a["action"] for a in probe["actions"]]


async def test_ops_show_the_shim_s_own_policy_beside_what_the_workers_enforce(
    settings: Settings, client: httpx.AsyncClient, admin_token: str | None, uid: str
) -> None:
    limited = f"limited{uid}"
    worker_side = settings.model_copy(update={"resilience": settings.resilience.model_copy(
        update={"ops": {f"{limited}.hello": PolicySettings(rate_limit_per_s=3, attempts=1)}}
    )})
    await register_and_stop(worker_side, limited)
    resp = await client.get("/v1/ops", headers=bearer(admin_token))
    assert resp.status_code == 200, resp.text
    listed = {o["op"]: o for o in resp.json()["operations"]}
    actions = {a["action"]: a for a in listed["data"]["actions"]}
    # What a caller through this shim gets: its own resolved policy, field for field.
    table = PolicyTable(settings.resilience)
    assert actions["get"]["policy"]["gateway"] == msgspec.to_builtins(
        gateway_policy(table, "data", "get")
    )
    assert actions["get"]["policy"]["gateway"]["cacheable"] is True
    assert actions["put"]["policy"]["gateway"]["idempotent"] is False
    assert actions["put"]["policy"]["worker"] == {
        "enabled": True, "rate_limit_per_s": 0.0, "rate_limit_burst": 0,
        "idempotency_retention_s": settings.resilience.idempotency_retention_s,
        "idempotency_lease_ms": settings.resilience.idempotency_lease_ms,
    }
    (hello,) = listed[limited]["actions"]
    # The limit is the worker's; the attempts are the shim's (its settings have no entry).
    assert hello["policy"]["worker"]["rate_limit_per_s"] == 3.0
    assert hello["policy"]["gateway"]["attempts"] == 3


async def test_ops_needs_a_token(client: httpx.AsyncClient, admin_token: str | None) -> None:
    if admin_token is None:
        pytest.skip("authentication is off in this test run")
    resp = await client.get("/v1/ops")
    assert resp.status_code == 401 and resp.json()["code"] == "invalid_token"

