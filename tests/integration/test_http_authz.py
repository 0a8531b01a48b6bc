"""Authorization on the shim's own routes: async submits, job status, event streams.

These three routes never reach a worker's request path, so the shim checks the token itself
with the workers' authenticator (docs/http.md, docs/auth.md). Real NATS, Redis, workers and a
real shim; what a client sees is asserted, and what reached JetStream is counted.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from nexus_bus import Gateway, Operations, RequestContext, Settings, Worker
from nexus_bus.config import ConfigError
from nexus_bus.constants import JOBS_STREAM
from nexus_bus.embedded import free_port
from nexus_bus.http import ShimApp
from nexus_bus.jobs.envelope import job_id_for
from tests.conftest import issue_test_token, make_settings
from tests.integration.http_shim import RunningShim, bearer, poll_until, running_shim
from tests.servers import ServerProcess

ASYNC = {"Prefer": "respond-async"}
HEARTBEAT_S = 0.5

# Known to the shim (so it can tell public actions apart) but served by no worker: jobs
# submitted to it stay in NEXUS_JOBS, where they can be counted.
PUBLIC_OP = "authzpublic"
public_ops = Operations(PUBLIC_OP, description="Authorization probe: one public action.")


@public_ops.action("ping", public=True)
async def ping(req: dict[str, Any], ctx: RequestContext) -> dict[str, bool]:
    """Public: anyone may call it."""
    return {"pong": True}


@public_ops.action("secret")
async def secret(req: dict[str, Any], ctx: RequestContext) -> dict[str, bool]:
    """Needs scope `authzpublic:secret`."""
    return {"secret": True}


@pytest.fixture(scope="module")
async def shim(settings: Settings, worker: Worker) -> AsyncIterator[RunningShim]:
    """A shim trusting 127.0.0.1 as a proxy, so tests name their clients (rate limits)."""
    async with running_shim(
        settings,
        groups=[*worker.groups, public_ops],
        trusted_proxies=["127.0.0.1/32"],
        sse_heartbeat_s=HEARTBEAT_S,
    ) as running:
        yield running


@pytest.fixture
async def http(shim: RunningShim) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=shim.url, timeout=10) as client:
        yield client


async def jobs_published(gateway: Gateway) -> int:
    """The last sequence of NEXUS_JOBS: grows with every message stored, never shrinks."""
    info = await gateway.nc.jetstream().stream_info(JOBS_STREAM)
    assert info.state.last_seq is not None
    return info.state.last_seq


def as_client(ip: str, token: str | None = None, **extra: str) -> dict[str, str]:
    return {"X-Forwarded-For": ip, **bearer(token), **extra}


def unserved_op(uid: str) -> str:
    """An op no worker serves and the shim does not know: not public, needs its scope."""
    return f"authz{uid}"


# --- Prefer: respond-async ---------------------------------------------------------------


async def test_async_submit_without_a_token_is_401_and_publishes_nothing(
    http: httpx.AsyncClient, gateway: Gateway, admin_token: str, uid: str
) -> None:
    before = await jobs_published(gateway)
    key = f"key-{uid}"
    for op, action in ((unserved_op(uid), "run"), ("data", "put")):
        body = {"key": f"k{uid}", "value": 1}
        sync = await http.post(f"/v1/{op}/{action}", json=body, headers=as_client("192.0.2.1"))
        answer = await http.post(
            f"/v1/{op}/{action}", json=body,
            headers=as_client("192.0.2.1", None, **ASYNC, **{"Idempotency-Key": key}),
        )
        assert answer.status_code == 401, answer.text
        assert answer.json()["code"] == "invalid_token"
        assert answer.headers["www-authenticate"].startswith("Bearer")
        if op == "data":  # served: the synchronous call answers the same
            assert (sync.status_code, sync.json()["code"]) == (401, "invalid_token")
        # Not even the job's status document was written.
        job_id = job_id_for(op, action, key)
        missing = await http.get(f"/v1/jobs/{job_id}", headers=bearer(admin_token))
        assert missing.status_code == 404
    assert await jobs_published(gateway) == before


async def test_async_submit_without_the_scope_is_403_and_publishes_nothing(
    http: httpx.AsyncClient, gateway: Gateway, uid: str
) -> None:
    reader = issue_test_token(("data:get", f"{unserved_op(uid)}:read"), subject=f"r-{uid}")
    before = await jobs_published(gateway)
    body = {"key": f"k{uid}", "value": 1}
    sync = await http.post("/v1/data/put", json=body, headers=as_client("192.0.2.2", reader))
    assert (sync.status_code, sync.json()["code"]) == (403, "forbidden")
    for op, action in (("data", "put"), (unserved_op(uid), "run")):
        answer = await http.post(
            f"/v1/{op}/{action}", json=body, headers=as_client("192.0.2.2", reader, **ASYNC)
        )
        assert answer.status_code == 403, answer.text
        assert answer.json()["code"] == "forbidden"
        assert "www-authenticate" not in answer.headers
    assert await jobs_published(gateway) == before


async def test_async_submit_with_bad_tokens_is_401_then_429(
    http: httpx.AsyncClient, gateway: Gateway, settings: Settings, uid: str
) -> None:
    attacker = f"203.0.113.{int(uid[:4], 16) % 250 + 1}"
    path = f"/v1/{unserved_op(uid)}/run"
    forged = as_client(attacker, "forged.token.x", **ASYNC)
    before = await jobs_published(gateway)
    for _ in range(settings.auth.rate_limit_failures):
        answer = await http.post(path, json={}, headers=forged)
        assert answer.status_code == 401 and answer.json()["code"] == "invalid_token"
    answer = await http.post(path, json={}, headers=forged)
    assert answer.status_code == 429 and answer.json()["code"] == "rate_limited"
    assert int(answer.headers["retry-after"]) >= 0
    assert await jobs_published(gateway) == before


async def test_async_submit_with_the_scope_is_accepted(
    http: httpx.AsyncClient, gateway: Gateway, uid: str
) -> None:
    op = unserved_op(uid)
    runner = issue_test_token((f"{op}:run",), subject=f"w-{uid}")
    before = await jobs_published(gateway)
    headers = as_client("192.0.2.3", runner, **ASYNC)
    answer = await http.post(f"/v1/{op}/run", json={}, headers=headers)
    assert answer.status_code == 202, answer.text
    assert await jobs_published(gateway) == before + 1
    status = await http.get(answer.headers["location"], headers=bearer(runner))
    assert status.status_code == 200 and status.json()["status"] == "pending"


async def test_public_actions_stay_public_for_async_submits(
    http: httpx.AsyncClient, gateway: Gateway
) -> None:
    before = await jobs_published(gateway)
    anonymous = as_client("192.0.2.4", **ASYNC)
    public = await http.post(f"/v1/{PUBLIC_OP}/ping", json={}, headers=anonymous)
    assert public.status_code == 202, public.text
    assert await jobs_published(gateway) == before + 1
    private = await http.post(f"/v1/{PUBLIC_OP}/secret", json={}, headers=anonymous)
    assert private.status_code == 401 and private.json()["code"] == "invalid_token"
    # A token sent to a public action is still checked, as a worker would.
    forged = await http.post(
        f"/v1/{PUBLIC_OP}/ping", json={}, headers=as_client("192.0.2.4", "forged.token.y", **ASYNC)
    )
    assert forged.status_code == 401
    assert await jobs_published(gateway) == before + 1


async def test_async_submit_without_the_revocation_store_is_503(
    nats_url: str, worker: Worker, gateway: Gateway, local_redis: ServerProcess, uid: str
) -> None:
    settings = make_settings(nats_url, local_redis.url + "/0")
    token = issue_test_token((f"{unserved_op(uid)}:run",), subject=f"u-{uid}")
    async with (
        running_shim(settings) as own,
        httpx.AsyncClient(base_url=own.url, timeout=10) as client,
    ):
        local_redis.kill()  # the revocation store's read path
        before = await jobs_published(gateway)
        answer = await client.post(
            f"/v1/{unserved_op(uid)}/run", json={}, headers={**bearer(token), **ASYNC}
        )
        assert answer.status_code == 503, answer.text
        problem = answer.json()
        assert problem["code"] == "unavailable" and answer.headers["retry-after"]
        assert "token revocation store" in problem["detail"]  # refused by auth, before the submit
        assert await jobs_published(gateway) == before


# --- GET /v1/jobs/{id} --------------------------------------------------------------------


async def test_job_status_needs_a_token_with_the_jobs_scope(
    http: httpx.AsyncClient, admin_token: str, uid: str
) -> None:
    writer = issue_test_token(("data:put",), subject=f"w-{uid}")
    submitted = await http.post(
        "/v1/data/put", json={"key": f"k{uid}", "value": 1},
        headers={**bearer(writer), **ASYNC, "Idempotency-Key": f"guessable-{uid}"},
    )
    assert submitted.status_code == 202, submitted.text
    location = submitted.headers["location"]
    absent = f"/v1/jobs/{job_id_for('data', 'put', f'other-{uid}')}"

    anonymous = await http.get(location)
    assert anonymous.status_code == 401 and anonymous.json()["code"] == "invalid_token"
    assert anonymous.headers["www-authenticate"].startswith("Bearer")
    # Without a token an existing job and an absent one answer alike: ids cannot be probed.
    assert (await http.get(absent)).status_code == 401
    forged = await http.get(location, headers=bearer("forged.token.z"))
    assert forged.status_code == 401

    reader = issue_test_token(("data:get", "stream:*"), subject=f"r-{uid}")
    hidden = await http.get(location, headers=bearer(reader))
    assert hidden.status_code == 404 and hidden.json()["code"] == "not_found"
    missing = await http.get(absent, headers=bearer(reader))
    assert missing.status_code == 404
    assert hidden.json()["detail"].replace(location.rsplit("/", 1)[1], "ID") == (
        missing.json()["detail"].replace(absent.rsplit("/", 1)[1], "ID")
    )

    for allowed in (writer, issue_test_token(("data:*",)), admin_token):
        found = await http.get(location, headers=bearer(allowed))
        assert found.status_code == 200, found.text
        assert (found.json()["op"], found.json()["action"]) == ("data", "put")


# --- GET /v1/events/{topic} ---------------------------------------------------------------


async def read_to_end(lines: AsyncIterator[str], timeout_s: float) -> list[dict[str, str]]:
    """Every SSE frame until the server closes the stream (fields by name; comments as ':')."""
    frames: list[dict[str, str]] = []
    frame: dict[str, str] = {}
    async with asyncio.timeout(timeout_s):
        async for line in lines:
            if line == "":
                if frame:
                    frames.append(frame)
                frame = {}
                continue
            name, _, value = line.partition(":")
            frame[name or ":"] = value.lstrip(" ")
    return frames


def end_problem(frames: list[dict[str, str]]) -> dict[str, Any]:
    """The problem document of the stream's final `end` event."""
    assert frames and frames[-1].get("event") == "end", frames[-3:]
    problem: dict[str, Any] = msgspec.json.decode(frames[-1]["data"])
    return problem


async def test_revoking_the_token_ends_its_event_stream(
    http: httpx.AsyncClient, shim: RunningShim, admin_token: str, uid: str
) -> None:
    issued = await http.post(
        "/v1/auth/issue", json={"subject": f"sse-{uid}", "scopes": ["stream:read"]},
        headers=bearer(admin_token),
    )
    assert issued.status_code == 200, issued.text
    token, jti = issued.json()["token"], issued.json()["jti"]
    other = issue_test_token(("stream:read",), subject=f"other-{uid}")
    async with (
        http.stream("GET", f"/v1/events/t{uid}", headers=bearer(token)) as resp,
        http.stream("GET", f"/v1/events/t{uid}", headers=bearer(other)) as bystander,
    ):
        assert resp.status_code == bystander.status_code == 200
        lines = resp.aiter_lines()
        async with asyncio.timeout(5):
            while not (await anext(lines)).startswith(":"):  # a heartbeat: the stream is live
                pass
        revoked = await http.post(
            "/v1/auth/revoke", json={"jti": jti}, headers=bearer(admin_token)
        )
        assert revoked.status_code == 200
        started = time.monotonic()
        frames = await read_to_end(lines, timeout_s=10)
        assert time.monotonic() - started < 5
        problem = end_problem(frames)
        assert problem["code"] == "invalid_token" and "revoked" in problem["detail"]
        # Only the revoked token's stream ended: the other one still gets heartbeats.
        other_lines = bystander.aiter_lines()
        async with asyncio.timeout(5):
            while not (await anext(other_lines)).startswith(":"):
                pass
    refused = await http.get(f"/v1/events/t{uid}", headers=bearer(token))
    assert refused.status_code == 401


async def test_an_event_stream_ends_when_its_token_expires(
    http: httpx.AsyncClient, uid: str
) -> None:
    token = issue_test_token(("stream:read",), subject=f"short-{uid}", ttl_s=2)
    expires_at = time.time() + 2
    async with http.stream("GET", f"/v1/events/t{uid}", headers=bearer(token)) as resp:
        assert resp.status_code == 200
        frames = await read_to_end(resp.aiter_lines(), timeout_s=10)
    ended = time.time()
    # At `exp` itself, not `exp` plus the verification leeway (10 s here).
    assert expires_at - 1.5 <= ended < expires_at + 3
    problem = end_problem(frames)
    assert problem["code"] == "invalid_token" and "expired" in problem["detail"]
    assert any(f.get(":") == "keepalive" for f in frames)  # it streamed until then


async def test_a_valid_token_keeps_its_stream_across_rechecks(
    settings: Settings, worker: Worker, admin_token: str, uid: str
) -> None:
    quick = settings.model_copy(
        update={"auth": settings.auth.model_copy(update={"cache_ttl_s": 0.2})}
    )
    token = issue_test_token(("stream:read",), subject=f"long-{uid}")
    async with (
        running_shim(quick, sse_heartbeat_s=0.2) as own,
        httpx.AsyncClient(base_url=own.url, timeout=10) as client,
        client.stream("GET", f"/v1/events/t{uid}", headers=bearer(token)) as resp,
    ):
        lines = resp.aiter_lines()
        await asyncio.sleep(1.5)  # several re-checks and heartbeats
        published = await client.post(
            "/v1/stream/publish", json={"topic": f"t{uid}", "event": "still here"},
            headers=bearer(admin_token),
        )
        assert published.status_code == 200
        async with asyncio.timeout(5):
            while (await anext(lines)) != 'data: "still here"':
                pass


# --- auth off, and a shim without keys ----------------------------------------------------


async def test_with_auth_off_the_routes_behave_as_before(
    settings: Settings, worker: Worker, tmp_path: Path, uid: str
) -> None:
    off = settings.model_copy(
        update={"auth": settings.auth.model_copy(
            update={"enabled": False, "keys_dir": tmp_path / "no-keys"}
        )}
    )
    async with (
        running_shim(off) as own,
        httpx.AsyncClient(base_url=own.url, timeout=10) as anonymous,
    ):
        accepted = await anonymous.post(f"/v1/{unserved_op(uid)}/run", json={}, headers=ASYNC)
        assert accepted.status_code == 202, accepted.text
        status = await anonymous.get(accepted.headers["location"])
        assert status.status_code == 200 and status.json()["status"] == "pending"


async def test_a_shim_enforcing_auth_without_keys_does_not_start(
    settings: Settings, tmp_path: Path
) -> None:
    keyless = settings.model_copy(
        update={"auth": settings.auth.model_copy(update={"keys_dir": tmp_path / "no-keys"})}
    )
    app = ShimApp(keyless)
    with pytest.raises(ConfigError, match="no keys"):
        await app.startup()
    assert app.nc is not None and app.nc.is_closed  # what startup opened is released



@pytest.fixture
def cli_shim(settings: Settings, worker: Worker) -> Iterator[str]:
    """`nexus-bus shim --app <this module>:public_ops` as a process; its URL."""
    port = free_port()
    env = {
        **os.environ,
        "NEXUS_NATS__URL": settings.nats.url,
        "NEXUS_REDIS__URL": settings.redis.url,
        "NEXUS_AUTH__KEYS_DIR": str(settings.auth.keys_dir),
        "NEXUS_LOG__LEVEL": "WARNING",
    }
    app = f"{__name__}:public_ops"
    proc = subprocess.Popen(
        [sys.executable, "-m", "nexus_bus", "shim", "--port", str(port), "--app", app],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


async def test_the_shim_command_learns_public_actions_from_app(cli_shim: str) -> None:
    async with httpx.AsyncClient(base_url=cli_shim, timeout=5) as client:

        async def ready() -> bool:
            try:
                return (await client.get("/readyz")).status_code == 200
            except httpx.TransportError:
                return False

        await poll_until(ready, 20)
        public = await client.post(f"/v1/{PUBLIC_OP}/ping", json={}, headers=ASYNC)
        assert public.status_code == 202, public.text
        private = await client.post(f"/v1/{PUBLIC_OP}/secret", json={}, headers=ASYNC)
        assert private.status_code == 401
        described = (await client.get("/openapi.json")).json()["paths"]
        assert f"/v1/{PUBLIC_OP}/ping" in described and "/v1/data/get" in described
