"""nats-server killed (SIGKILL) and restarted in the middle of a burst of 2,000 jobs.

The submitter retries every failed submission with the same idempotency key, as a client
should. Afterwards the ledger must show every acknowledged submission applied exactly once.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from nexus_bus import Gateway, Worker
from nexus_bus.embedded import ServerProcess
from nexus_bus.schemas.jobs import JobStatus
from tests.conftest import make_settings
from tests.integration.test_jobs_app import Ledger, final_statuses, ops, submit_all, wait_applied

JOBS = 2_000


# 2,000 jobs through a broker restart take 25-70 s on a loaded 2-core machine, and the wait
# for them alone may take 60 (its own bound): the suite's 60 s per test is not enough.
@pytest.mark.timeout(180)
async def test_broker_restart_during_a_burst_loses_nothing_and_repeats_nothing(
    local_nats: ServerProcess, redis_url: str, admin_token: str | None, uid: str
) -> None:
    settings = make_settings(
        local_nats.url,
        redis_url,
        jobs={"ack_wait_s": 3, "heartbeat_s": 1, "concurrency": 64, "backoff_base_s": 0.2},
    )
    settings = settings.model_copy(
        update={"nats": settings.nats.model_copy(update={"reconnect_wait_s": 0.2})}
    )
    worker = Worker(settings, [ops])
    await worker.start()
    gateway = await Gateway.connect(settings, token=admin_token)
    ledger = Ledger(uid)
    await ledger.listen(gateway.nc)
    retries: list[int] = []

    acknowledged_at_kill = 0

    async def crash_midway() -> float:
        nonlocal acknowledged_at_kill
        await ledger.reached(JOBS // 4)
        acknowledged_at_kill = len(ledger.acknowledged)
        killed = time.monotonic()
        await asyncio.to_thread(local_nats.kill)
        await asyncio.sleep(0.5)
        await asyncio.to_thread(local_nats.restart)
        return time.monotonic() - killed

    started = time.monotonic()
    try:
        outage, _ = await asyncio.gather(
            crash_midway(), submit_all(gateway, ledger, range(JOBS), retries=retries)
        )
        await wait_applied(ledger, gateway.nc, range(JOBS), timeout_s=60)
        statuses = await final_statuses(gateway, settings, ledger, range(JOBS))
    finally:
        await gateway.close()
        await worker.drain(1)
    print(
        f"{ledger.report()} submit_retries={len(retries)} killed_at={acknowledged_at_kill} "
        f"outage_s={outage:.2f} "
        f"total_s={time.monotonic() - started:.1f}"
    )
    assert acknowledged_at_kill < JOBS, "the broker died after the burst: nothing was tested"
    assert ledger.acknowledged == set(range(JOBS))
    assert not ledger.lost(), sorted(ledger.lost())[:20]
    assert not ledger.duplicates(), ledger.duplicates()
    assert statuses == {JobStatus.SUCCEEDED.value: JOBS}
