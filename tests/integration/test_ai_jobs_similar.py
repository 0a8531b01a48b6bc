"""`ai.complete` as a job (retried on upstream 429/5xx, dead-lettered after max attempts) and
`ai.similar` over stored `data` values, against the provider DOUBLE and real NATS/Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from nexus_bus import Worker
from nexus_bus.errors import InvalidRequest
from nexus_bus.jobs.client import job_store, wait_job
from nexus_bus.jobs.dlq import DeadLetterQueue
from nexus_bus.schemas.jobs import JobStatus
from tests.integration.ai_serving import ai_settings, openai_backend, serving_ai
from tests.model_provider_double import ProviderDouble, provider_double

JOBS = {"backoff_base_s": 0.05, "backoff_max_s": 0.2, "max_deliver": 3}


@pytest.fixture
async def provider() -> AsyncIterator[ProviderDouble]:
    async with provider_double() as double:
        yield double


def section(provider: ProviderDouble) -> dict[str, object]:
    backend = openai_backend(provider.base_url, ["chat-1"], breaker_failures=100)
    return {"backends": {"double": backend}, "default_complete_model": "chat-1"}


async def test_a_completion_job_is_retried_on_429_and_500_then_succeeds(
    provider: ProviderDouble, nats_url: str, redis_url: str, uid: str
) -> None:
    settings = ai_settings(nats_url, redis_url, section(provider), jobs=JOBS)
    provider.fail(429, retry_after="0")
    provider.fail(500)
    async with serving_ai(settings, f"ai{uid}") as gw:
        accepted = await gw.submit(f"ai{uid}", "complete", {"prompt": f"long {uid}"})
        job = await wait_job(gw.nc, settings, accepted.job_id, timeout_s=15)
    assert job.status is JobStatus.SUCCEEDED and job.attempts == 3
    assert job.result is not None and job.result["text"] == f"echo: long {uid}"
    assert len(provider.calls("chat/completions")) == 3


async def test_a_completion_job_is_dead_lettered_after_max_attempts(
    provider: ProviderDouble, nats_url: str, redis_url: str, uid: str
) -> None:
    settings = ai_settings(nats_url, redis_url, section(provider), jobs=JOBS)
    provider.fail(503, times=10)
    async with serving_ai(settings, f"ai{uid}") as gw:
        accepted = await gw.submit(f"ai{uid}", "complete", {"prompt": "x"})
        job = await wait_job(gw.nc, settings, accepted.job_id, timeout_s=15)
        dlq = DeadLetterQueue(gw.nc.jetstream(), await job_store(gw.nc, settings))
        entries = await dlq.entries(op=f"ai{uid}")
    assert job.status is JobStatus.DEAD and job.attempts == 3
    assert job.error is not None and job.error["code"] == "unavailable"
    assert [e.job_id for e in entries] == [accepted.job_id]
    assert len(provider.calls("chat/completions")) == 3


async def test_similar_ranks_stored_values_within_the_scan_bound(
    worker: Worker, nats_url: str, redis_url: str, uid: str
) -> None:
    # The session's `worker` serves `data`; this test's worker serves the ai actions.
    settings = ai_settings(nats_url, redis_url, {})
    op, prefix = f"ai{uid}", f"docs.{uid}."
    async with serving_ai(settings, op) as gw:
        await gw.request("data", "put", {"key": f"{prefix}a", "value": "the cat sat on the mat"})
        await gw.request("data", "put", {"key": f"{prefix}b",
                                         "value": {"text": "stock markets fell today"}})
        await gw.request("data", "put", {"key": f"{prefix}c", "value": "a cat on a mat"})
        await gw.request("data", "put", {"key": f"other.{uid}", "value": "the cat sat"})
        body = {"text": "the cat sat on a mat", "prefix": prefix, "model": "hash-256"}
        ranked = await gw.request(op, "similar", {**body, "limit": 2})
        bounded = await gw.request(op, "similar", {**body, "max_scan": 2})
        with pytest.raises(InvalidRequest, match="DEFAULT_EMBED_MODEL"):
            await gw.request(op, "similar", {"text": "x", "prefix": prefix})
    assert ranked["model"] == "hash-256" and ranked["scanned"] == 3 and not ranked["truncated"]
    assert [m["key"] for m in ranked["matches"]] == [f"{prefix}a", f"{prefix}c"]
    assert ranked["matches"][0]["score"] > ranked["matches"][1]["score"] > 0
    assert bounded["scanned"] == 2 and bounded["truncated"]
    assert {m["key"] for m in bounded["matches"]} == {f"{prefix}a", f"{prefix}b"}
