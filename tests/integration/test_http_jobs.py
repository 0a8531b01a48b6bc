"""`Prefer: respond-async` → 202 + Location, and `GET /v1/jobs/{id}`, over real JetStream."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from prometheus_client import REGISTRY

from nexus_bus import Settings, Worker
from tests.conftest import issue_test_token
from tests.integration.http_shim import RunningShim, bearer, poll_until, running_shim

ASYNC = {"Prefer": "respond-async"}


@pytest.fixture(scope="module")
async def shim(settings: Settings, worker: Worker) -> AsyncIterator[RunningShim]:
    async with running_shim(settings) as running:
        yield running


@pytest.fixture
async def client(shim: RunningShim, admin_token: str | None) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=shim.url, headers=bearer(admin_token), timeout=10) as c:
        yield c


async def test_respond_async_runs_the_operation_as_a_job(
    client: httpx.AsyncClient, uid: str
) -> None:
    key = f"job.{uid}"
    accepted = await client.post(
        "/v1/data/put", json={"key": key, "value": {"async": True}}, headers=ASYNC
    )
    assert accepted.status_code == 202, accepted.text
    body = accepted.json()
    assert body["status"] == "pending" and len(body["job_id"]) == 32
    location = accepted.headers["location"]
    assert location == f"/v1/jobs/{body['job_id']}"
    assert accepted.headers["x-request-id"]

    async def finished() -> bool:
        doc = (await client.get(location)).json()
        return bool(doc["status"] in ("succeeded", "failed", "dead"))

    await poll_until(finished, 20)
    job = (await client.get(location)).json()
    assert job["id"] == body["job_id"] and (job["op"], job["action"]) == ("data", "put")
    assert job["status"] == "succeeded" and job["result"]["key"] == key
    got = await client.post("/v1/data/get", json={"key": key})
    assert got.json()["value"] == {"async": True}


async def test_a_pending_job_document_has_its_attempts(
    client: httpx.AsyncClient, uid: str
) -> None:
    """No worker serves this op: the job stays pending, and says it ran 0 times."""
    accepted = await client.post(f"/v1/idle{uid}/run", json={}, headers=ASYNC)
    assert accepted.status_code == 202, accepted.text
    job = (await client.get(accepted.headers["location"])).json()
    assert job == {
        "id": accepted.json()["job_id"],
        "op": f"idle{uid}",
        "action": "run",
        "status": "pending",
        "attempts": 0,
    }


async def test_prefer_with_other_preferences_still_submits(
    client: httpx.AsyncClient, uid: str
) -> None:
    resp = await client.post(
        "/v1/data/put",
        json={"key": f"job2.{uid}", "value": 1},
        headers={"Prefer": "return=minimal, respond-async; wait=5"},
    )
    assert resp.status_code == 202
    # RFC 7240 §2: preferences over several Prefer lines are one list.
    split = await client.post(
        "/v1/data/put",
        json={"key": f"job3.{uid}", "value": 1},
        headers=[("Prefer", "return=minimal"), ("Prefer", "respond-async")],
    )
    assert split.status_code == 202 and split.headers["location"].startswith("/v1/jobs/")


async def test_same_idempotency_key_is_the_same_job(client: httpx.AsyncClient, uid: str) -> None:
    headers = {**ASYNC, "Idempotency-Key": f"key-{uid}"}
    body = {"key": f"idem.{uid}", "value": 1}
    first = await client.post("/v1/data/put", json=body, headers=headers)
    second = await client.post("/v1/data/put", json=body, headers=headers)
    assert first.status_code == second.status_code == 202
    assert first.json()["job_id"] == second.json()["job_id"]
    assert first.headers["location"] == second.headers["location"]


async def test_one_idempotency_key_names_one_job_per_subject(
    shim: RunningShim, uid: str
) -> None:
    """Keys are the caller's, as on the synchronous path (per subject, op and key): before,
    a second subject sending the same key got the first one's job, status and result, and
    its own request never ran."""
    scopes = ("data:put", "data:get")
    alice = bearer(issue_test_token(scopes, subject=f"alice-{uid}"))
    bob = bearer(issue_test_token(scopes, subject=f"bob-{uid}"))
    keyed = {**ASYNC, "Idempotency-Key": "order-17"}  # a key anyone might pick
    async with httpx.AsyncClient(base_url=shim.url, timeout=10) as c:
        first = await c.post(
            "/v1/data/put", json={"key": f"a.{uid}", "value": 1}, headers={**alice, **keyed}
        )
        second = await c.post(
            "/v1/data/put", json={"key": f"b.{uid}", "value": 2}, headers={**bob, **keyed}
        )
        assert first.status_code == second.status_code == 202, (first.text, second.text)
        assert first.json()["job_id"] != second.json()["job_id"]

        async def finished() -> bool:
            doc = (await c.get(second.headers["location"], headers=bob)).json()
            return bool(doc["status"] in ("succeeded", "failed", "dead"))

        await poll_until(finished, 20)
        job = (await c.get(second.headers["location"], headers=bob)).json()
        assert job["status"] == "succeeded" and job["result"]["key"] == f"b.{uid}", job
        got = await c.post("/v1/data/get", json={"key": f"b.{uid}"}, headers=bob)
        assert got.status_code == 200 and got.json()["value"] == 2
        again = await c.post(  # the same subject and key: the same job
            "/v1/data/put", json={"key": f"a.{uid}", "value": 1}, headers={**alice, **keyed}
        )
        assert again.json()["job_id"] == first.json()["job_id"]


async def test_unknown_and_malformed_job_ids(client: httpx.AsyncClient) -> None:
    missing = await client.get(f"/v1/jobs/{uuid.uuid4().hex}")
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"
    for bad in ("not-a-job-id", uuid.uuid4().hex + "%0A"):  # a final newline passed `$`
        malformed = await client.get(f"/v1/jobs/{bad}")
        assert malformed.status_code == 400 and malformed.json()["code"] == "invalid_request"
    head = await client.head(f"/v1/jobs/{uuid.uuid4().hex}")
    assert head.status_code == 404 and head.content == b""  # what GET answers, without a body
    wrong_method = await client.post(f"/v1/jobs/{uuid.uuid4().hex}", json={})
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "GET, HEAD"


async def test_async_submission_is_still_validated_by_the_shim(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    too_big = b'{"v":"' + b"x" * (settings.limits.max_body_bytes + 1) + b'"}'
    resp = await client.post(
        "/v1/data/put", content=too_big, headers={**ASYNC, "Content-Type": "application/json"}
    )
    assert resp.status_code == 413
    reserved = await client.post("/v1/sys/x", json={}, headers=ASYNC)
    assert reserved.status_code == 404


def http_series(op_prefix: str) -> set[tuple[str, str]]:
    """The (op, action) label pairs of the shim's request durations whose op starts so."""
    return {
        (sample.labels["op"], sample.labels["action"])
        for family in REGISTRY.collect()
        if family.name == "nexus_request_duration_seconds"
        for sample in family.samples
        if sample.labels.get("transport") == "http"
        and sample.labels.get("op", "").startswith(op_prefix)
    }


async def test_jobs_for_invented_operations_do_not_become_metric_labels(
    client: httpx.AsyncClient, uid: str
) -> None:
    """Before: a submission counted as served, so every invented op.action a client submitted
    as a job (accepted: 202, waiting for a worker) became a label pair of the shim's metrics,
    until the table of 512 was full and every real pair not yet seen was `_other`."""
    for i in range(20):
        accepted = await client.post(f"/v1/made{uid}x{i}/run", json={}, headers=ASYNC)
        assert accepted.status_code == 202, accepted.text
    assert http_series(f"made{uid}") == set()
    accepted = await client.post(
        "/v1/data/put", json={"key": f"job.{uid}", "value": 1}, headers=ASYNC
    )
    assert accepted.status_code == 202, accepted.text
    assert ("data", "put") in http_series("data")  # a declared operation keeps its labels
