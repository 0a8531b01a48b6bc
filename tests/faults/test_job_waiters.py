"""A job's waiter hears it finish soon after nats-server restarted under the watch."""

from __future__ import annotations

import asyncio
import time

import pytest

from nexus_bus import Gateway, Worker
from nexus_bus.embedded import ServerProcess
from nexus_bus.errors import NexusError
from nexus_bus.jobs.client import get_job, wait_job
from tests.conftest import make_settings
from tests.integration.test_jobs_app import ops

HOLD_S = 3.0  # the job runs this long: the restart happens under its waiter's watch


@pytest.mark.timeout(90)
async def test_a_waiter_hears_the_finish_within_seconds_of_a_broker_restart(
    local_nats: ServerProcess, redis_url: str, admin_token: str | None, uid: str
) -> None:
    settings = make_settings(local_nats.url, redis_url, jobs={"heartbeat_s": 1})
    settings = settings.model_copy(
        update={"nats": settings.nats.model_copy(update={"reconnect_wait_s": 0.2})}
    )
    worker = Worker(settings, [ops])
    await worker.start()
    gateway = await Gateway.connect(settings, token=admin_token)
    try:
        accepted = await gateway.submit(
            "ledger", "apply", {"ledger": uid, "item": 1, "hold_ms": int(HOLD_S * 1000)}
        )
        waiting = asyncio.create_task(
            wait_job(gateway.nc, settings, accepted.job_id, timeout_s=60)
        )
        await asyncio.sleep(0.5)  # the waiter watches, the job runs
        await asyncio.to_thread(local_nats.kill)
        await asyncio.sleep(0.3)
        await asyncio.to_thread(local_nats.restart)  # file storage: the job's status is kept
        # When the status says finished, as anyone reading it sees it.
        while True:
            try:
                if (await get_job(gateway.nc, settings, accepted.job_id)).status in (
                    "succeeded", "failed", "dead",
                ):
                    break
            except NexusError:  # reconnecting: read again
                pass
            await asyncio.sleep(0.1)
        finished_at = time.monotonic()
        job = await waiting
        heard_after_s = time.monotonic() - finished_at
        assert job.status == "succeeded"
        # Before: the watch's consumer was made again only after nats-py missed two of its
        # heartbeats, and the waiter heard the finish 10 to 20 s late.
        assert heard_after_s < 3, f"the waiter heard the finish {heard_after_s:.1f} s late"
    finally:
        await gateway.close()
        await worker.drain(1)
