"""A 3-node NATS cluster on loopback with R3 streams: one node killed during a burst of jobs.

The node killed is the leader of `NEXUS_JOBS`, so the stream, its consumer and likely the
KV buckets all fail over while submissions and job runs are in flight. Nothing acknowledged
may be lost and nothing applied twice.
"""

from __future__ import annotations

import asyncio
import time

from nexus_bus import Gateway, NexusError, Settings, Worker
from nexus_bus.constants import JOBS_STREAM
from nexus_bus.embedded import ServerProcess
from nexus_bus.schemas.jobs import JobStatus
from tests.conftest import make_settings
from tests.faults.conftest import wait_for_jetstream
from tests.integration.test_jobs_app import Ledger, final_statuses, ops, submit_all, wait_applied

JOBS = 1_000


async def start_worker(settings: Settings, timeout_s: float = 30) -> Worker:
    """A ledger worker; R3 streams can only be created once the cluster has settled."""
    deadline = time.monotonic() + timeout_s
    while True:
        worker = Worker(settings, [ops])
        try:
            await worker.start()
            return worker
        except NexusError:
            await worker.drain(0)
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def test_losing_a_node_during_a_burst_loses_nothing_acknowledged(
    nats_nodes: list[ServerProcess], redis_url: str, admin_token: str | None, uid: str
) -> None:
    urls = [node.url for node in nats_nodes]
    await wait_for_jetstream(urls)
    settings = make_settings(
        ",".join(urls),
        redis_url,
        jetstream={"replicas": 3},
        jobs={"ack_wait_s": 4, "heartbeat_s": 1, "concurrency": 32, "backoff_base_s": 0.2},
    )
    settings = settings.model_copy(
        update={"nats": settings.nats.model_copy(update={"reconnect_wait_s": 0.2})}
    )
    worker = await start_worker(settings)
    gateway = await Gateway.connect(settings, token=admin_token)
    ledger = Ledger(uid)
    await ledger.listen(gateway.nc)
    retries: list[int] = []
    await gateway.submit(ops.op, "apply", {"ledger": f"{uid}w", "item": 0})  # streams exist
    info = await gateway.nc.jetstream().stream_info(JOBS_STREAM)
    assert info.config.num_replicas == 3 and info.cluster is not None
    leader = info.cluster.leader
    [victim] = [node for node in nats_nodes if f"-{node.port}" in str(leader)]

    async def kill_leader_midway() -> None:
        await ledger.reached(JOBS // 3)
        await asyncio.to_thread(victim.kill)

    try:
        await asyncio.gather(
            kill_leader_midway(), submit_all(gateway, ledger, range(JOBS), retries=retries)
        )
        await wait_applied(ledger, gateway.nc, range(JOBS), timeout_s=90)
        after = await gateway.nc.jetstream().stream_info(JOBS_STREAM)
        statuses = await final_statuses(gateway, settings, ledger, range(JOBS))
    finally:
        await gateway.close()
        await worker.drain(1)
    print(f"{ledger.report()} submit_retries={len(retries)} killed={leader}")
    assert not victim.running
    assert after.cluster is not None and after.cluster.leader != leader
    assert ledger.acknowledged == set(range(JOBS))
    assert not ledger.lost(), sorted(ledger.lost())[:20]
    assert not ledger.duplicates(), ledger.duplicates()
    assert statuses == {JobStatus.SUCCEEDED.value: JOBS}
