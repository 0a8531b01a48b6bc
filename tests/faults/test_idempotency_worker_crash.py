"""A worker process killed between a keyed request's effect and its idempotency record.

The doomed worker (`idempotency_app.py`) runs the built-in `data.put` / `data.delete`, then
holds: the write is in the KV, the key's Redis record still says "running" (`s=p`) and no
reply was sent. The test SIGKILLs it there. The caller retries with the same
`Idempotency-Key` through a second worker, which waits for the dead worker's claim to expire
(`resilience.idempotency_lease_ms`, short here), runs the handler again and must find the
write journaled: the original result, and exactly one write in the KV.
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
from typing import Any

import msgspec
import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from nexus_bus import Settings, Worker
from nexus_bus.constants import (
    EFFECTS_IDEMPOTENCY_TOKEN,
    EFFECTS_PREFIX,
    H_IDEMPOTENT_REPLAYED,
    H_STATUS,
    IDEMPOTENCY_KEY_PREFIX,
)
from nexus_bus.effects import data_stream_name
from nexus_bus.embedded import ServerProcess
from nexus_bus.handlers import builtin_groups
from nexus_bus.jetstream import ensure_data_bucket
from nexus_bus.redis_client import create_redis
from nexus_bus.resilience.idempotency import scope_digest
from tests.conftest import make_settings

ROOT = Path(__file__).resolve().parents[2]
LEASE_MS = 1500
SUBJECT = "test-admin"  # the subject of `admin_token`


@pytest.fixture
def crash_settings(local_nats: ServerProcess, redis_url: str) -> Settings:
    return make_settings(
        local_nats.url, redis_url, resilience={"idempotency_lease_ms": LEASE_MS}
    )


@pytest.fixture
async def nc(crash_settings: Settings) -> AsyncIterator[Client]:
    conn = await nats.connect(crash_settings.nats.url)
    yield conn
    await conn.close()


def doomed_worker(settings: Settings) -> subprocess.Popen[bytes]:
    """`nexus-bus worker` serving the holding `data` group, as its own process."""
    environ = {
        **os.environ,
        "NEXUS_NATS__URL": settings.nats.url,
        "NEXUS_REDIS__URL": settings.redis.url,
        "NEXUS_RESILIENCE__IDEMPOTENCY_LEASE_MS": str(LEASE_MS),
        "NEXUS_JOBS__ENABLED": "false",
        "NEXUS_LOG__LEVEL": "WARNING",
    }
    if settings.auth.keys_dir is not None:  # the same signing keys as the test's tokens
        environ["NEXUS_AUTH__KEYS_DIR"] = str(settings.auth.keys_dir)
    return subprocess.Popen(
        [sys.executable, "-m", "nexus_bus", "worker", "--app", "tests.faults.idempotency_app:ops"],
        cwd=ROOT,
        env=environ,
        start_new_session=True,
    )


def request(
    nc: Client, token: str | None, action: str, body: dict[str, Any], key: str, timeout: float
) -> Any:
    headers = {"Authorization": f"Bearer {token}", "Idempotency-Key": key}
    return nc.request(f"nexus.data.{action}", msgspec.json.encode(body), timeout, headers=headers)


async def wait_serving(nc: Client, token: str | None) -> None:
    """Until a worker answers `data.get` (404 for a key nobody wrote)."""
    deadline = time.monotonic() + 30
    headers = {"Authorization": f"Bearer {token}"}
    while time.monotonic() < deadline:
        try:
            await nc.request("nexus.data.get", b'{"key": "nobody"}', 1, headers=headers)
            return
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            await asyncio.sleep(0.1)
    raise AssertionError("the doomed worker never came up")


async def last_seq(nc: Client, subject: str) -> int | None:
    try:
        msg = await nc.jetstream().get_last_msg(data_stream_name(), subject)
    except nats.js.errors.NotFoundError:
        return None
    return msg.seq


async def wait_for_write(nc: Client, subject: str, after: int | None) -> int:
    """Until the doomed worker's write is in the KV; its sequence (the key's revision)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        seq = await last_seq(nc, subject)
        if seq is not None and seq != after:
            return seq
        await asyncio.sleep(0.02)
    raise AssertionError(f"the first run never wrote {subject}")


@pytest.mark.parametrize("action", ["put", "delete"])
async def test_a_keyed_write_whose_worker_died_before_recording_is_applied_once(
    crash_settings: Settings,
    nc: Client,
    admin_token: str | None,
    processes: list[subprocess.Popen[bytes]],
    uid: str,
    action: str,
) -> None:
    target, key = f"crash.{uid}", f"crash-{uid}"
    subject = f"$KV.nexus_data.{target}"
    body: dict[str, Any] = {"key": target}
    if action == "put":
        body["value"] = {"n": 1}
    else:  # something to delete, written before anyone watches
        kv = await ensure_data_bucket(nc.jetstream(), crash_settings.jetstream)
        await kv.put(target, b'"old"')
    before = await last_seq(nc, subject)
    writes: list[Msg] = []

    async def count(msg: Msg) -> None:
        writes.append(msg)

    await nc.subscribe(subject, cb=count)  # every write published to the key, from now on
    doomed = doomed_worker(crash_settings)
    processes.append(doomed)
    await wait_serving(nc, admin_token)
    survivor: Worker | None = None
    redis = create_redis(crash_settings.redis)
    digest = scope_digest(SUBJECT, "data", action, key)
    try:
        first = asyncio.create_task(request(nc, admin_token, action, body, key, timeout=3))
        revision = await wait_for_write(nc, subject, before)
        # The deterministic point: the effect is applied, the reply neither recorded nor sent.
        assert await redis.hget(IDEMPOTENCY_KEY_PREFIX + digest, "s") == b"p"
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(10)
        killed_at = time.monotonic()
        with pytest.raises(nats.errors.TimeoutError):
            await first  # the caller never hears from the dead worker

        survivor = Worker(crash_settings, builtin_groups(["data"]))
        await survivor.start()
        retry = await request(nc, admin_token, action, body, key, timeout=15)
        waited = time.monotonic() - killed_at
        await nc.flush()
        await asyncio.sleep(0.2)  # a second write, had there been one, is delivered by now
        record = await redis.hget(IDEMPOTENCY_KEY_PREFIX + digest, "s")
        effect = await last_seq(
            nc, f"{EFFECTS_PREFIX}.{EFFECTS_IDEMPOTENCY_TOKEN}.{digest}.1"
        )
    finally:
        await redis.aclose()
        if survivor is not None:
            await survivor.drain(1)
    headers = retry.headers or {}
    answer = msgspec.json.decode(retry.data)
    assert headers[H_STATUS] == "200" and H_IDEMPOTENT_REPLAYED not in headers  # it ran again
    if action == "put":
        assert answer == {"key": target, "revision": revision}  # the original result
    else:
        assert answer == {"key": target, "deleted": True}  # a plain rerun would say False
    assert len(writes) == 1  # exactly one write published to the key...
    assert await last_seq(nc, subject) == revision  # ...and the KV still holds that one
    assert effect == revision + 1  # committed in one batch with its effect record
    assert record == b"d"  # the retry's reply is the key's record now
    assert waited < LEASE_MS / 1000 + 5  # it waited for the dead worker's claim, not longer
