"""A claim on an idempotency key that nobody runs must not hold its repeats off for the lease.

On a real Redis. The claim script runs, but its answer comes back after the call's timeout (a
worker whose event loop stalled), or the request is cancelled at its deadline, once and then
again on every tick as the worker's reaper does, while its handler runs. Each used to leave
the key claimed by nobody for `idempotency_lease_ms` (30 s), and a repeat waited out its
deadline: `504 upstream_timeout`, "the first request with this Idempotency-Key is running"
(found by `tests/e2e/test_nginx.py`'s shim-kill test under CPU load).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from nexus_bus import Settings
from nexus_bus.bus.replies import Reply
from nexus_bus.constants import H_IDEMPOTENT_REPLAYED, H_STATUS
from nexus_bus.errors import Unavailable
from nexus_bus.policies import idempotency
from nexus_bus.policies.idempotency import IdempotencyStore
from nexus_bus.redis_client import RedisClient, create_redis

LEASE_MS = 30_000  # the default: what a lost claim used to cost every repeat


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[RedisClient]:
    client = create_redis(settings.redis)
    try:
        yield client
    finally:
        await client.aclose()


class Runs:
    """A handler that counts its runs."""

    def __init__(self) -> None:
        self.count = 0

    async def __call__(self) -> Reply:
        self.count += 1
        return Reply(200, {H_STATUS: "200"}, b'{"ok":true}')


def run(
    store: IdempotencyStore, key: str, produce: Callable[[], Awaitable[Reply]], within_s: float
) -> Awaitable[Reply]:
    return store.run(
        subject="alice", op="data", action="put", key=key, content_type=None, body=b"{}",
        request_id="r1", deadline_ms=int((time.time() + within_s) * 1000), produce=produce,
    )


async def test_a_claim_whose_answer_came_too_late_is_dropped_and_the_retry_runs(
    redis: RedisClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = IdempotencyStore(redis, retention_s=60, lease_ms=LEASE_MS)
    begin = store._begin
    monkeypatch.setattr(idempotency, "_CALL_TIMEOUT_S", 0.2)

    def answered_late(**kwargs: Any) -> Awaitable[Any]:
        async def late() -> Any:
            answer = await begin(**kwargs)  # the script ran: the key is claimed
            await asyncio.sleep(1)  # but its answer comes after the call gave up
            return answer

        return late()

    key = f"late-{uuid.uuid4().hex}"
    first = Runs()
    monkeypatch.setattr(store, "_begin", answered_late)
    with pytest.raises(Unavailable):  # the caller is told 503, retryable: nothing ran
        await run(store, key, first, within_s=5)
    monkeypatch.setattr(store, "_begin", begin)

    retry = Runs()
    reply = await run(store, key, retry, within_s=2)
    assert reply.status == 200
    assert (first.count, retry.count) == (0, 1)


async def test_a_request_cancelled_on_every_tick_still_drops_its_claim(
    redis: RedisClient,
) -> None:
    store = IdempotencyStore(redis, retention_s=60, lease_ms=LEASE_MS)
    key = f"cancelled-{uuid.uuid4().hex}"
    running = asyncio.Event()

    async def slow() -> Reply:
        running.set()
        await asyncio.sleep(60)
        raise AssertionError("not cancelled")

    first = asyncio.create_task(run(store, key, slow, within_s=60))
    await asyncio.wait_for(running.wait(), 5)
    while not first.done():  # the worker's reaper: cancel, and cancel again while it ends
        first.cancel()
        await asyncio.sleep(0)
    with pytest.raises(asyncio.CancelledError):
        await first

    retry = Runs()
    reply = await run(store, key, retry, within_s=2)
    assert reply.status == 200 and retry.count == 1


async def test_a_record_whose_answer_came_too_late_is_written_again_and_replayed(
    redis: RedisClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = IdempotencyStore(redis, retention_s=60, lease_ms=LEASE_MS)
    complete = store._complete
    monkeypatch.setattr(idempotency, "_CALL_TIMEOUT_S", 0.2)
    lost: list[bool] = []

    def lost_once(**kwargs: Any) -> Awaitable[Any]:
        async def late() -> Any:
            await asyncio.sleep(1)  # the record's first write never answers in time
            return await complete(**kwargs)

        if lost:
            return complete(**kwargs)
        lost.append(True)
        return late()

    key = f"record-{uuid.uuid4().hex}"
    first = Runs()
    monkeypatch.setattr(store, "_complete", lost_once)
    assert (await run(store, key, first, within_s=5)).status == 200  # the effect happened

    retry = Runs()
    reply = await run(store, key, retry, within_s=3)  # replayed, not run, not a 504
    assert reply.status == 200 and reply.headers.get(H_IDEMPOTENT_REPLAYED) == "true"
    assert (first.count, retry.count) == (1, 0)
