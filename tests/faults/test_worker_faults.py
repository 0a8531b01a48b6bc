"""The worker runtime when NATS dies and comes back."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import nats
import pytest

from nexus_bus import Gateway, Settings, Worker
from nexus_bus.embedded import ServerProcess
from nexus_bus.errors import NexusError
from nexus_bus.handlers import builtin_groups
from tests.conftest import make_settings

ROOT = Path(__file__).resolve().parents[2]


async def test_worker_and_gateway_recover_after_a_nats_restart(
    local_nats: ServerProcess, redis_url: str, admin_token: str | None, uid: str
) -> None:
    settings = make_settings(local_nats.url, redis_url)
    worker = Worker(settings, builtin_groups(["data"]))
    await worker.start()
    gw = await Gateway.connect(settings, token=admin_token)
    try:
        await gw.request("data", "put", {"key": f"r.{uid}", "value": 1})
        local_nats.restart()  # same port and JetStream directory
        value = None
        for _ in range(100):  # both clients reconnect on their own
            try:
                value = (await gw.request("data", "get", {"key": f"r.{uid}"}, timeout=1))["value"]
                break
            except NexusError:
                await asyncio.sleep(0.1)
        assert value == 1
    finally:
        await gw.close()
        await worker.drain(1)


def test_sigterm_with_nats_down_still_exits_cleanly(
    local_nats: ServerProcess, redis_url: str, tmp_path: Path
) -> None:
    settings: Settings = make_settings(local_nats.url, redis_url)
    env = {
        **os.environ,
        "NEXUS_NATS__URL": local_nats.url,
        "NEXUS_REDIS__URL": redis_url,
        "NEXUS_AUTH__KEYS_DIR": str(settings.auth.keys_dir),
        "NEXUS_LOG__LEVEL": "ERROR",
        "PYTHONPATH": str(ROOT),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "nexus_bus", "worker", "--ops", "data"], env=env, cwd=tmp_path
    )
    try:

        async def wait_ready() -> None:
            nc = await nats.connect(local_nats.url)
            try:
                for _ in range(100):
                    try:
                        await nc.request("nexus.data.get", b"{}", timeout=0.5)
                        return
                    except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                        await asyncio.sleep(0.1)
                pytest.fail("worker did not come up")
            finally:
                await nc.close()

        asyncio.run(wait_ready())
        local_nats.kill()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
