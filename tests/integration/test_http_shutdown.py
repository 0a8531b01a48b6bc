"""Graceful shutdown of a real `nexus-bus shim` process: not ready first, finish, exit 0."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from nexus_bus import Settings, Worker
from nexus_bus.embedded import free_port
from tests.integration.http_shim import PROBE_OP, bearer, poll_until, probe_worker

DRAIN_DELAY_S = 1.0


@pytest.fixture(scope="module")
async def probes(settings: Settings, worker: Worker) -> AsyncIterator[Worker]:
    async with probe_worker(settings) as w:
        yield w


def start_shim(settings: Settings, port: int, *, grace_s: float) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "NEXUS_NATS__URL": settings.nats.url,
        "NEXUS_REDIS__URL": settings.redis.url,
        "NEXUS_AUTH__KEYS_DIR": str(settings.auth.keys_dir),  # the shim verifies tokens too
        "NEXUS_HTTP__DRAIN_DELAY_S": str(DRAIN_DELAY_S),
        "NEXUS_HTTP__GRACE_S": str(grace_s),
        "NEXUS_LOG__LEVEL": "WARNING",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "nexus_bus", "shim", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


ShimProcess = tuple[str, subprocess.Popen[bytes]]


@pytest.fixture
def shim_process(settings: Settings, request: pytest.FixtureRequest) -> Iterator[ShimProcess]:
    port = free_port()
    proc = start_shim(settings, port, grace_s=getattr(request, "param", 5.0))
    try:
        yield f"http://127.0.0.1:{port}", proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stderr:
            proc.stderr.close()


async def wait_ready(client: httpx.AsyncClient) -> None:
    async with asyncio.timeout(20):
        while True:
            try:
                if (await client.get("/readyz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)


async def wait_exit(proc: subprocess.Popen[bytes], timeout_s: float) -> int:
    async def exited() -> bool:
        return proc.poll() is not None

    await poll_until(exited, timeout_s)
    return proc.returncode


async def test_sigterm_drops_readiness_finishes_in_flight_and_exits_0(
    probes: Worker, shim_process: ShimProcess, admin_token: str | None
) -> None:
    url, proc = shim_process
    async with httpx.AsyncClient(base_url=url, headers=bearer(admin_token), timeout=15) as client:
        await wait_ready(client)
        slow = asyncio.create_task(client.post(f"/v1/{PROBE_OP}/sleep", json={"ms": 1500}))
        await asyncio.sleep(0.3)  # in flight at the worker
        loop = asyncio.get_running_loop()
        signalled = loop.time()
        proc.send_signal(signal.SIGTERM)
        # Readiness drops first while the listener still answers (the drain delay).
        async with asyncio.timeout(DRAIN_DELAY_S):
            while True:
                ready = await client.get("/readyz", headers={"Connection": "close"})
                if ready.status_code == 503:
                    break
                await asyncio.sleep(0.02)
        assert ready.json()["checks"]["draining"] is True
        assert ready.headers["connection"] == "close"
        answered = await slow
        assert answered.status_code == 200 and answered.json() == {"slept_ms": 1500}
        assert await wait_exit(proc, 15) == 0
        assert loop.time() - signalled >= DRAIN_DELAY_S * 0.9
    # After the exit nobody listens any more.
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient(base_url=url) as late:
            await late.get("/healthz")


@pytest.mark.parametrize("shim_process", [0.5], indirect=True)
async def test_requests_beyond_the_grace_period_get_503_and_exit_is_still_0(
    probes: Worker, shim_process: ShimProcess, admin_token: str | None
) -> None:
    url, proc = shim_process
    async with httpx.AsyncClient(base_url=url, headers=bearer(admin_token), timeout=30) as client:
        await wait_ready(client)
        stuck = asyncio.create_task(client.post(f"/v1/{PROBE_OP}/sleep", json={"ms": 20_000}))
        await asyncio.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        answered = await stuck
        assert answered.status_code == 503 and answered.json()["code"] == "unavailable"
        assert await wait_exit(proc, DRAIN_DELAY_S + 0.5 + 10) == 0
