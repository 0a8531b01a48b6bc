"""Idempotency-Key on the synchronous path: one execution, the first reply replayed.

Real NATS, Redis, workers and HTTP shim. A counting operation tells how often a handler ran;
`data.put` shows the same with the KV's revisions.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec
import pytest
from prometheus_client import REGISTRY

from nexus_bus import Gateway, Operations, RateLimited, RequestContext, Settings, Worker
from nexus_bus.bus.connection import connect_nats
from nexus_bus.constants import (
    H_IDEMPOTENT_REPLAYED,
    H_SERVICE_ERROR,
    H_SERVICE_ERROR_CODE,
    H_STATUS,
)
from nexus_bus.resilience.policy import PolicySettings
from tests.conftest import issue_test_token
from tests.integration.http_shim import RunningShim, bearer, running_shim

COUNT_OP = "idemprobe"
counted = Operations(COUNT_OP, description="Counts its executions (idempotency tests).")
RUNS: dict[str, int] = {}


class CountRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Count one execution under `name`."""

    name: str
    sleep_ms: int = 50


@counted.action("run")
async def run(req: CountRequest, ctx: RequestContext) -> dict[str, Any]:
    """Count, wait a little (so duplicates overlap), answer the count at this time."""
    RUNS[req.name] = RUNS.get(req.name, 0) + 1
    await asyncio.sleep(req.sleep_ms / 1000)
    return {"name": req.name, "run": RUNS[req.name]}


@counted.action("limited")
async def limited(req: CountRequest, ctx: RequestContext) -> dict[str, Any]:
    """429 on the first run under a name (a budget or an upstream's limit), then answer."""
    RUNS[req.name] = RUNS.get(req.name, 0) + 1
    if RUNS[req.name] == 1:
        raise RateLimited("over the budget for now", retry_after=0.1)
    return {"name": req.name, "run": RUNS[req.name]}


@pytest.fixture(scope="module")
async def shim(settings: Settings, worker: Worker) -> AsyncIterator[RunningShim]:
    extra = Worker(settings, [counted])
    await extra.start()
    try:
        async with running_shim(settings) as running:
            yield running
    finally:
        await extra.drain(1)


async def test_fifty_concurrent_puts_with_one_key_run_once_and_get_one_reply(
    shim: RunningShim, admin_token: str | None, uid: str
) -> None:
    key = f"idem.{uid}"
    headers = {**bearer(admin_token), "Idempotency-Key": f"put-{uid}"}
    async with httpx.AsyncClient(base_url=shim.url, headers=headers, timeout=15) as c:
        answers = await asyncio.gather(
            *(c.post("/v1/data/put", json={"key": key, "value": "once"}) for _ in range(50))
        )
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers][:3]
        assert len({a.content for a in answers}) == 1  # every caller got the same reply
        replayed = [a for a in answers if a.headers.get("idempotent-replayed") == "true"]
        assert len(replayed) == 49
        got = await c.post(
            "/v1/data/get", json={"key": key}, headers={"Idempotency-Key": f"get-{uid}"}
        )
        assert got.json()["revision"] == answers[0].json()["revision"]  # no second write


async def test_the_handler_runs_once_for_concurrent_and_later_repeats(
    shim: RunningShim, admin_token: str | None, uid: str
) -> None:
    headers = {**bearer(admin_token), "Idempotency-Key": f"count-{uid}"}
    body = {"name": uid, "sleep_ms": 100}
    async with httpx.AsyncClient(base_url=shim.url, headers=headers, timeout=15) as c:
        answers = await asyncio.gather(
            *(c.post(f"/v1/{COUNT_OP}/run", json=body) for _ in range(20))
        )
        later = await c.post(f"/v1/{COUNT_OP}/run", json=body)
    assert RUNS[uid] == 1
    assert {a.status_code for a in answers} == {200} and later.status_code == 200
    assert all(a.json() == {"name": uid, "run": 1} for a in [*answers, later])
    assert later.headers["idempotent-replayed"] == "true"


async def test_same_key_with_another_body_is_a_mismatch_and_bad_keys_are_refused(
    shim: RunningShim, admin_token: str | None, uid: str
) -> None:
    async with httpx.AsyncClient(
        base_url=shim.url, headers=bearer(admin_token), timeout=15
    ) as c:
        key = {"Idempotency-Key": f"mm-{uid}"}
        first = await c.post("/v1/data/put", json={"key": f"mm.{uid}", "value": 1}, headers=key)
        assert first.status_code == 200
        other = await c.post("/v1/data/put", json={"key": f"mm.{uid}", "value": 2}, headers=key)
        assert other.status_code == 422 and other.json()["code"] == "idempotency_mismatch"
        long_key = {"Idempotency-Key": "k" * 256}
        too_long = await c.post("/v1/data/put", json={"key": f"l.{uid}", "value": 1},
                                headers=long_key)
        assert too_long.status_code == 400 and too_long.json()["code"] == "invalid_request"
        ok_key = {"Idempotency-Key": "k" * 255}
        assert (await c.post("/v1/data/put", json={"key": f"l.{uid}", "value": 1},
                             headers=ok_key)).status_code == 200


async def test_keys_are_scoped_by_subject_and_nats_callers_get_replays(
    settings: Settings, shim: RunningShim, uid: str
) -> None:
    body = msgspec.json.encode({"name": f"s{uid}", "sleep_ms": 0})
    tokens = [issue_test_token(subject=f"alice-{uid}"), issue_test_token(subject=f"bob-{uid}")]
    nc = await connect_nats(settings.nats)
    try:
        replies = []
        for token in (*tokens, tokens[0]):  # alice, bob, alice again
            headers = {"Authorization": f"Bearer {token}", "Idempotency-Key": f"same-{uid}"}
            replies.append(await nc.request(f"nexus.{COUNT_OP}.run", body, 5, headers=headers))
        runs = [msgspec.json.decode(r.data)["run"] for r in replies]
        assert runs == [1, 2, 1]  # bob's key is his own; alice's repeat is replayed
        assert (replies[2].headers or {}).get(H_IDEMPOTENT_REPLAYED) == "true"
        assert H_IDEMPOTENT_REPLAYED not in (replies[1].headers or {})
        bad = await nc.request(
            f"nexus.{COUNT_OP}.run", body, 5,
            headers={"Authorization": f"Bearer {tokens[0]}", "Idempotency-Key": "tab\there"},
        )
        assert (bad.headers or {}).get("Nexus-Status") == "400"
    finally:
        await nc.close()


async def test_a_replayed_error_carries_the_nats_micro_error_headers(
    settings: Settings, worker: Worker, admin_token: str | None, uid: str
) -> None:
    # docs/contract.md: a reply that is not 200 carries `Nats-Service-Error-Code` and
    # `Nats-Service-Error`; a NATS micro client tells an error by them, and without them
    # took the replayed 409 for a success.
    body = msgspec.json.encode({"key": f"rc.{uid}", "value": 1, "expected_revision": 99})
    headers = {"Authorization": f"Bearer {admin_token}", "Idempotency-Key": f"rc-{uid}"}
    nc = await connect_nats(settings.nats)
    try:
        first, again = [await nc.request("nexus.data.put", body, 5, headers=headers)
                        for _ in range(2)]  # fmt: skip
    finally:
        await nc.close()
    assert (again.headers or {}).get(H_IDEMPOTENT_REPLAYED) == "true"
    for reply in (first, again):
        assert reply.headers is not None and reply.headers[H_STATUS] == "409"
        assert reply.headers.get(H_SERVICE_ERROR_CODE) == "409"
        assert reply.headers.get(H_SERVICE_ERROR, "").startswith("conflict: ")


async def test_a_429_is_not_kept_so_the_retry_its_retry_after_invites_runs(
    settings: Settings, shim: RunningShim, admin_token: str | None, uid: str
) -> None:
    # Retryable like a 5xx: replayed for idempotency_retention_s, the retry Retry-After asks
    # for (with the same key, as a safe retry should be) got the same 429 for a day.
    body = msgspec.json.encode({"name": f"rl{uid}"})
    headers = {"Authorization": f"Bearer {admin_token}", "Idempotency-Key": f"rl-{uid}"}
    nc = await connect_nats(settings.nats)
    try:
        limited = await nc.request(f"nexus.{COUNT_OP}.limited", body, 5, headers=headers)
        await asyncio.sleep(0.1)
        retried = await nc.request(f"nexus.{COUNT_OP}.limited", body, 5, headers=headers)
        again = await nc.request(f"nexus.{COUNT_OP}.limited", body, 5, headers=headers)
    finally:
        await nc.close()
    assert (limited.headers or {}).get(H_STATUS) == "429"
    assert (retried.headers or {}).get(H_STATUS) == "200"
    assert msgspec.json.decode(retried.data)["run"] == 2
    assert (again.headers or {}).get(H_IDEMPOTENT_REPLAYED) == "true"  # a success is kept
    assert again.data == retried.data and RUNS[f"rl{uid}"] == 2


async def test_a_lost_reply_is_retried_with_its_key_and_gets_the_original_result(
    settings: Settings, shim: RunningShim, admin_token: str | None, uid: str
) -> None:
    """The first attempt's reply comes too late (the worker applied it, the caller had given
    up on that attempt); the gateway retries with the same key and receives the first
    execution's result instead of running it again."""
    policy = PolicySettings(attempt_timeout_ms=300, attempts=3, backoff_base_ms=10)
    own = settings.model_copy(
        update={"resilience": settings.resilience.model_copy(
            update={"ops": {f"{COUNT_OP}.run": policy}}
        )}
    )
    before = _retries(COUNT_OP)
    gw = await Gateway.connect(own, token=admin_token)
    try:
        reply = await gw.request_raw(
            COUNT_OP,
            "run",
            msgspec.json.encode({"name": f"lost{uid}", "sleep_ms": 450}),
            gw.build_headers(timeout_s=3.0, idempotency_key=f"lost-{uid}"),
            timeout_s=3.0,
        )
    finally:
        await gw.close()
    assert reply.status == 200 and msgspec.json.decode(reply.body)["run"] == 1
    assert reply.headers.get(H_IDEMPOTENT_REPLAYED) == "true"  # the retry's answer
    assert RUNS[f"lost{uid}"] == 1  # applied once
    assert _retries(COUNT_OP) > before


def _retries(op: str) -> float:
    value = REGISTRY.get_sample_value(
        "nexus_retries_total", {"op": op, "action": "run", "reason": "upstream_timeout"}
    )
    return value or 0.0
