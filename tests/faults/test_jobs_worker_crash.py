"""A job worker process killed (SIGKILL) or stopped (SIGTERM) in the middle of a job.

The job's first attempt writes its effect, then holds: the worker dies between the effect and
the ack. The job must be delivered again, finish, and its effect stay applied once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nexus_bus import Gateway, NotFound, Settings, Worker
from nexus_bus.embedded import ServerProcess
from nexus_bus.handlers import builtin_groups
from nexus_bus.jobs.client import wait_job
from nexus_bus.schemas.jobs import JobStatus
from tests.conftest import make_settings
from tests.integration.test_jobs_app import Apply, Ledger, counter_key, ops, record_store

ROOT = Path(__file__).resolve().parents[2]
ACK_WAIT_S = 2.0


@pytest.fixture
def crash_settings(local_nats: ServerProcess, redis_url: str) -> Settings:
    return make_settings(
        local_nats.url, redis_url, jobs={"ack_wait_s": ACK_WAIT_S, "heartbeat_s": 0.5}
    )


def worker_process(settings: Settings, **env: str) -> subprocess.Popen[bytes]:
    """`nexus-bus worker` serving the ledger ops, as its own process."""
    environ = {
        **os.environ,
        "NEXUS_NATS__URL": settings.nats.url,
        "NEXUS_REDIS__URL": settings.redis.url,
        "NEXUS_JOBS__ACK_WAIT_S": str(settings.jobs.ack_wait_s),
        "NEXUS_JOBS__HEARTBEAT_S": str(settings.jobs.heartbeat_s),
        "NEXUS_LOG__LEVEL": "WARNING",
        **env,
    }
    if settings.auth.keys_dir is not None:  # the same signing keys as the test's tokens
        environ["NEXUS_AUTH__KEYS_DIR"] = str(settings.auth.keys_dir)
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nexus_bus",
            "worker",
            "--app",
            "tests.integration.test_jobs_app:ops",
        ],
        cwd=ROOT,
        env=environ,
        start_new_session=True,
    )


@pytest.fixture
async def gateway_local(
    crash_settings: Settings, admin_token: str | None
) -> AsyncIterator[Gateway]:
    gw = await Gateway.connect(crash_settings, token=admin_token)
    yield gw
    await gw.close()


async def wait_for_effect(gateway: Gateway, key: str) -> None:
    """Until the first attempt's write is in the system of record."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            await gateway.request("data", "get", {"key": key}, timeout=1)
            return
        except (NotFound, TimeoutError):
            await asyncio.sleep(0.05)
    raise AssertionError(f"the first attempt never wrote {key}")


async def run_ledger_worker(settings: Settings) -> Worker:
    worker = Worker(settings, [ops])
    await worker.start()
    return worker


async def test_killed_worker_job_is_redelivered_and_applied_once(
    crash_settings: Settings,
    gateway_local: Gateway,
    processes: list[subprocess.Popen[bytes]],
    uid: str,
) -> None:
    ledger = Ledger(uid)
    await ledger.listen(gateway_local.nc)
    reader = Worker(crash_settings, builtin_groups(["data"]))  # serves data.get for the checks
    await reader.start()
    doomed = worker_process(crash_settings)
    processes.append(doomed)
    survivor: Worker | None = None
    try:
        accepted = await gateway_local.submit(
            ops.op, "apply", Apply(ledger=uid, item=1, hold_ms=60_000), idempotency_key=uid
        )
        ledger.acknowledged.add(1)
        await wait_for_effect(gateway_local, counter_key(uid, 1))
        doomed.send_signal(signal.SIGKILL)  # between the effect and the ack
        doomed.wait(10)
        killed_at = time.monotonic()

        survivor = await run_ledger_worker(crash_settings)
        job = await wait_job(gateway_local.nc, crash_settings, accepted.job_id, timeout_s=20)
        waited = time.monotonic() - killed_at
        await ledger.read_applied(await record_store(gateway_local.nc), [1])
    finally:
        if survivor is not None:
            await survivor.drain(1)
        await reader.drain(1)
    print(ledger.report())
    assert job.status is JobStatus.SUCCEEDED and job.attempts == 2
    assert waited <= ACK_WAIT_S + 5  # redelivered after the ack wait, not the job timeout
    assert ledger.applied == {1: 1} and not ledger.duplicates() and not ledger.lost()
    assert sorted(ledger.attempted) == [(1, 1), (1, 2)]


async def test_sigterm_hands_a_running_job_back_at_once(
    local_nats: ServerProcess,
    redis_url: str,
    admin_token: str | None,
    processes: list[subprocess.Popen[bytes]],
    uid: str,
) -> None:
    # An ack wait far longer than the test: only the drain's nak can explain a quick retry.
    settings = make_settings(local_nats.url, redis_url, jobs={"ack_wait_s": 60, "heartbeat_s": 5})
    gateway = await Gateway.connect(settings, token=admin_token)
    reader = Worker(settings, builtin_groups(["data"]))
    await reader.start()
    stopping = worker_process(settings, NEXUS_WORKER__DRAIN_GRACE_S="0.5")
    processes.append(stopping)
    survivor: Worker | None = None
    try:
        accepted = await gateway.submit(
            ops.op, "apply", Apply(ledger=uid, item=1, hold_ms=60_000), idempotency_key=uid
        )
        await wait_for_effect(gateway, counter_key(uid, 1))
        survivor = await run_ledger_worker(settings)
        stopping.send_signal(signal.SIGTERM)
        assert stopping.wait(15) == 0
        # Well inside the 60 s ack wait: only the nak sent while draining explains it.
        job = await wait_job(gateway.nc, settings, accepted.job_id, timeout_s=30)
        got = await gateway.request("data", "get", {"key": counter_key(uid, 1)})
    finally:
        if survivor is not None:
            await survivor.drain(1)
        await reader.drain(1)
        await gateway.close()
    assert job.status is JobStatus.SUCCEEDED and job.attempts == 2
    assert got["value"] == 1
