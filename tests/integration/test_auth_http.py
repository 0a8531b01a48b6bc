"""Authentication on the HTTP path: a real shim (uvicorn on a free port) in front of workers.

The shim forwards `Authorization` and the client address; the worker decides. These tests
check what an HTTP client sees: the status, the problem `code`, `WWW-Authenticate: Bearer`
on 401 and `Retry-After` on 429.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from nexus_bus import Settings, Worker
from nexus_bus.auth import Keyring, TokenCodec, generate_key
from nexus_bus.http.server import create_server
from tests.conftest import issue_test_token, make_settings
from tests.integration.test_auth_nats import _bad_tokens, probe_group


@pytest.fixture(scope="module")
async def shim(settings: Settings, worker: Worker) -> AsyncIterator[str]:
    """The shim on a free port, trusting 127.0.0.1 as a proxy so tests can name clients."""
    shim_settings = settings.model_copy(
        update={"http": settings.http.model_copy(
            update={"port": 0, "trusted_proxies": ["127.0.0.1/32"], "drain_delay_s": 0.0}
        )}
    )
    server = create_server(shim_settings)
    task = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and not task.done(), "shim did not start"
        await asyncio.sleep(0.02)
    yield f"http://127.0.0.1:{server.bound_port}"
    server.should_exit = True
    await asyncio.wait_for(task, 15)


@pytest.fixture
async def http(shim: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=shim, timeout=10) as client:
        yield client


def as_client(ip: str, bearer: str | None = None) -> dict[str, str]:
    headers = {"X-Forwarded-For": ip}
    if bearer is not None:
        headers["Authorization"] = f"Bearer {bearer}"
    return headers


async def test_missing_token_is_401_with_a_bearer_challenge(http: httpx.AsyncClient) -> None:
    answer = await http.post("/v1/data/get", json={"key": "k"})
    assert answer.status_code == 401
    assert answer.headers["www-authenticate"].startswith("Bearer")
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.json()["code"] == "invalid_token"


@pytest.mark.parametrize(
    "kind",
    [
        "tampered-payload", "tampered-signature", "truncated", "truncated-signature",
        "wrong-key", "unknown-kid", "alg-none", "alg-hs256-confusion", "expired",
        "not-yet-valid", "malformed", "empty-claims",
    ],
)
async def test_bad_tokens_are_401_over_http(http: httpx.AsyncClient, kind: str) -> None:
    bad = _bad_tokens()[kind]
    answer = await http.post(
        "/v1/data/get", json={"key": "k"}, headers=as_client(f"198.51.100.{len(kind)}", bad)
    )
    assert answer.status_code == 401, answer.text
    assert answer.json()["code"] == "invalid_token"
    assert "Bearer" in answer.headers["www-authenticate"]


async def test_oversized_token_is_refused_before_the_bus(http: httpx.AsyncClient) -> None:
    huge = issue_test_token() + "A" * 5000
    answer = await http.post(
        "/v1/data/get", json={"key": "k"}, headers=as_client("192.0.2.50", huge)
    )
    assert answer.status_code in (401, 431)  # the header limit may bite before the token's
    answer = await http.post(
        "/v1/data/get", json={"key": "k"}, headers=as_client("192.0.2.50", "A" * 4000 + ".b.c")
    )
    assert answer.status_code == 401 and answer.json()["code"] == "invalid_token"


async def test_scopes_and_revocation_over_http(http: httpx.AsyncClient, uid: str) -> None:
    admin = as_client("192.0.2.10", issue_test_token())
    answer = await http.post(
        "/v1/auth/issue", json={"subject": f"web-{uid}", "scopes": ["data:get"]}, headers=admin
    )
    assert answer.status_code == 200, answer.text
    issued = answer.json()
    reader = as_client("192.0.2.10", issued["token"])
    answer = await http.post("/v1/data/get", json={"key": f"absent-{uid}"}, headers=reader)
    assert answer.status_code == 404 and answer.json()["code"] == "not_found"  # past auth
    answer = await http.post("/v1/data/put", json={"key": uid, "value": 1}, headers=reader)
    assert answer.status_code == 403 and answer.json()["code"] == "forbidden"
    assert "www-authenticate" not in answer.headers
    answer = await http.post("/v1/auth/revoke", json={"jti": issued["jti"]}, headers=admin)
    assert answer.status_code == 200 and answer.json()["revoked"] is True
    answer = await http.post("/v1/data/get", json={"key": f"absent-{uid}"}, headers=reader)
    assert answer.status_code == 401 and "revoked" in answer.json()["detail"]


async def test_repeated_failures_are_429_without_locking_out_valid_clients(
    http: httpx.AsyncClient, worker: Worker
) -> None:
    limit = worker.settings.auth.rate_limit_failures
    attacker = f"203.0.113.{uuid.uuid4().int % 250}"
    proven = issue_test_token(("data:get",), subject="proven-web")
    ok = await http.post("/v1/data/get", json={"key": "x"}, headers=as_client(attacker, proven))
    assert ok.status_code == 404  # authenticated (the key is absent)
    for _ in range(limit):
        answer = await http.post("/v1/data/get", json={"key": "x"},
                                 headers=as_client(attacker, "forged.token.guess"))
        assert answer.status_code == 401
    answer = await http.post("/v1/data/get", json={"key": "x"},
                             headers=as_client(attacker, "forged.token.guess"))
    assert answer.status_code == 429 and answer.json()["code"] == "rate_limited"
    assert int(answer.headers["retry-after"]) >= 0
    # The proven client at the same address still gets through; other addresses are untouched.
    ok = await http.post("/v1/data/get", json={"key": "x"}, headers=as_client(attacker, proven))
    assert ok.status_code == 404
    other = await http.post("/v1/data/get", json={"key": "x"},
                            headers=as_client("192.0.2.99", "forged.token.guess"))
    assert other.status_code == 401


@asynccontextmanager
async def probe_worker(settings: Settings, op: str) -> AsyncIterator[None]:
    worker = Worker(settings, [probe_group(op)])
    await worker.start()
    try:
        yield
    finally:
        await worker.drain(1)


async def test_public_operation_over_http(
    http: httpx.AsyncClient, nats_url: str, redis_url: str, uid: str
) -> None:
    op = f"probe{uid}"
    async with probe_worker(make_settings(nats_url, redis_url), op):
        answer = await http.post(f"/v1/{op}/ping", json={})
        assert answer.status_code == 200 and answer.json() == {"pong": True, "anonymous": True}
        answer = await http.post(f"/v1/{op}/whoami", json={})
        assert answer.status_code == 401


async def test_key_rotation_over_http(
    http: httpx.AsyncClient, nats_url: str, redis_url: str, tmp_path: Path, uid: str
) -> None:
    op = f"probe{uid}"
    keys = tmp_path / "keys"
    generate_key(keys, kid="2026a-old")
    old = TokenCodec(Keyring.from_dir(keys)).issue(
        "old", frozenset({"*"}), 600, now=int(time.time()), jti=uuid.uuid4().hex
    ).token
    generate_key(keys, kid="2026b-new")
    settings = make_settings(nats_url, redis_url, auth={"keys_dir": str(keys)})
    async with probe_worker(settings, op):
        headers = as_client("192.0.2.77", old)
        minted = await http.post(f"/v1/{op}/mint", json={"subject": "new", "scopes": ["*"]},
                                 headers=headers)
        assert minted.status_code == 200 and minted.json()["kid"] == "2026b-new"
        for bearer, who in ((old, "old"), (minted.json()["token"], "new")):
            answer: Any = await http.post(f"/v1/{op}/whoami", json={},
                                          headers=as_client("192.0.2.77", bearer))
            assert answer.status_code == 200 and answer.json()["subject"] == who
