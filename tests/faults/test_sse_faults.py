"""Event streams (`GET /v1/events/{topic}`) across a nats-server restart and slow clients."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from nexus_bus import Settings, Worker
from nexus_bus.embedded import ServerProcess
from nexus_bus.handlers import builtin_groups
from tests.conftest import make_settings
from tests.integration.http_shim import RunningShim, bearer, running_shim
from tests.integration.test_http_sse import EventReader, publish

HEARTBEAT_S = 0.3


@pytest.fixture
async def restartable(
    local_nats: ServerProcess, redis_url: str
) -> AsyncIterator[tuple[Settings, RunningShim]]:
    settings = make_settings(local_nats.url, redis_url)
    settings = settings.model_copy(
        update={"nats": settings.nats.model_copy(update={"reconnect_wait_s": 0.2})}
    )
    worker = Worker(settings, builtin_groups())
    await worker.start()
    try:
        async with running_shim(settings, sse_heartbeat_s=HEARTBEAT_S) as shim:
            yield settings, shim
    finally:
        await worker.drain(1)


@pytest.mark.parametrize("resume", [False, True])
async def test_a_stream_replays_no_event_it_was_past_after_a_broker_restart(
    resume: bool,
    restartable: tuple[Settings, RunningShim],
    local_nats: ServerProcess,
    admin_token: str | None,
    uid: str,
) -> None:
    _, shim = restartable
    topic = f"t{uid}"
    async with httpx.AsyncClient(base_url=shim.url, headers=bearer(admin_token), timeout=20) as c:
        old = [await publish(c, topic, {"old": i}) for i in range(3)]
        # Before: nats-py restarted the lost ordered consumer after the last event it had
        # delivered, none here, so at the stream's first: every old event came again.
        headers = {"Last-Event-ID": str(old[-1])} if resume else {}
        async with c.stream("GET", f"/v1/events/{topic}", headers=headers) as resp:
            reader = EventReader(resp)
            await reader.wait_comment()
            await asyncio.to_thread(local_nats.kill)
            await asyncio.sleep(0.5)
            await asyncio.to_thread(local_nats.restart)
            for _ in range(100):
                try:
                    new = await publish(c, topic, "new")
                    break
                except AssertionError:
                    await asyncio.sleep(0.2)
            seq, event = await reader.next_event(timeout_s=15)
            assert (seq, event) == (new, "new"), f"old events {old} replayed"
