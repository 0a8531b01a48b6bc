"""Redis dies, restarts empty, or freezes while the cache is under load: no request fails,
no read returns an old value, and the cache comes back by itself."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import time

import pytest
import redis.asyncio as aioredis

from nexus_bus import Gateway, NotFound, Worker
from nexus_bus.cache import CacheResult
from nexus_bus.cache.heads import Absent, KeyValueHeads
from nexus_bus.embedded import ServerProcess
from nexus_bus.handlers import builtin_groups
from nexus_bus.resilience import BreakerState
from nexus_bus.services import Services
from tests.conftest import make_settings, open_services
from tests.helpers import pause

# Quick breaker probes so that recovery is observed within a second or two.
FAST_RECOVERY = {"breaker_reset_s": 0.1, "breaker_reset_max_s": 0.3}



async def wait_until_cached(services: Services, key: str, timeout_s: float = 10.0) -> None:
    """Read `key` until a read is answered by the cache again (the breaker closed)."""
    assert services.cache is not None
    stats = services.cache.stats
    deadline = time.monotonic() + timeout_s
    while True:
        before = stats.counts("data").get(CacheResult.HIT, 0)
        with contextlib.suppress(NotFound):
            await services.records.get(key)
        if stats.counts("data").get(CacheResult.HIT, 0) > before:
            return
        assert time.monotonic() < deadline, "the cache did not come back"
        await asyncio.sleep(0.05)


@pytest.mark.slow
async def test_redis_killed_mid_load_fails_no_request_and_recovers(
    local_nats: ServerProcess, local_redis: ServerProcess, admin_token: str | None, uid: str
) -> None:
    settings = make_settings(
        local_nats.url, local_redis.url + "/0", cache=FAST_RECOVERY, auth={"cache_ttl_s": 60}
    )
    worker = Worker(settings, builtin_groups())
    await worker.start()
    gateway = await Gateway.connect(settings, token=admin_token)
    keys = [f"load.{uid}.{i}" for i in range(8)]
    failures: list[str] = []
    served = 0
    stop = asyncio.Event()
    try:
        for key in keys:
            await gateway.request("data", "put", {"key": key, "value": 0})

        async def client(n: int) -> None:
            nonlocal served
            rng = random.Random(n)
            while not stop.is_set():
                key = rng.choice(keys)
                try:
                    if rng.random() < 0.2:
                        await gateway.request("data", "put", {"key": key, "value": n})
                    else:
                        await gateway.request("data", "get", {"key": key})
                    served += 1
                except Exception as exc:  # every failure is what this test counts
                    failures.append(repr(exc))

        clients = [asyncio.create_task(client(n)) for n in range(8)]
        await asyncio.sleep(0.8)
        await asyncio.to_thread(local_redis.kill)
        down_at = served
        await asyncio.sleep(1.2)
        assert served > down_at  # requests kept being answered while Redis was dead
        await asyncio.to_thread(local_redis.start)  # empty: no persistence
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*clients)

        assert failures == []
        assert worker.services is not None and worker.services.cache is not None
        cache = worker.services.cache
        assert cache.stats.counts("data").get(CacheResult.BYPASS, 0) > 0
        await wait_until_cached(worker.services, keys[0])
        assert cache.breaker.state is BreakerState.CLOSED
        heads = KeyValueHeads(worker.services.js)
        for key in keys:  # values read through the recovered cache equal the KV's
            head = await heads.head(key)
            assert not isinstance(head, Absent)
            got = await gateway.request("data", "get", {"key": key})
            assert got["revision"] == head.revision
        redis = aioredis.Redis.from_url(local_redis.url)
        try:
            assert await redis.exists(cache.key("data", keys[0]).entry)  # refilled
        finally:
            await redis.aclose()
    finally:
        stop.set()
        await gateway.close()
        await worker.drain(1)


async def test_redis_restarted_empty_serves_correct_values(
    nats_url: str, local_redis: ServerProcess, uid: str
) -> None:
    settings = make_settings(nats_url, local_redis.url + "/0", cache=FAST_RECOVERY)
    keys = [f"empty.{uid}.{i}" for i in range(6)]
    async with open_services(settings) as services:
        for key in keys:
            await services.records.put(key, b'"v1"')
            assert (await services.records.get(key)).value == b'"v1"'
        local_redis.kill()
        for key in keys[:3]:  # written while Redis is dead: nobody can write them through
            await services.records.put(key, b'"v2"')
        await services.records.delete(keys[3])
        expected = {k: b'"v2"' for k in keys[:3]} | {keys[4]: b'"v1"', keys[5]: b'"v1"'}
        for key, value in expected.items():
            assert (await services.records.get(key)).value == value  # from the KV
        local_redis.start()
        await wait_until_cached(services, keys[4])
        for _ in range(2):  # the first read refills, the second is a hit
            for key, value in expected.items():
                assert (await services.records.get(key)).value == value
            with pytest.raises(NotFound):
                await services.records.get(keys[3])
        assert services.cache is not None
        deadline = time.monotonic() + 10
        while len(services.cache.floors):  # the repair loop caught up
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)


async def test_frozen_redis_that_comes_back_with_old_entries_never_serves_them(
    nats_url: str, local_redis: ServerProcess, uid: str
) -> None:
    # SIGSTOP keeps Redis's memory: the old entries are still there when it resumes, as after
    # a network partition. Writes made meanwhile could not be written through, and no peer
    # could fence them; revision floors must hide the old entries until repaired.
    settings = make_settings(nats_url, local_redis.url + "/0", cache=FAST_RECOVERY)
    keys = [f"frozen.{uid}.{i}" for i in range(4)]
    async with open_services(settings) as services:
        assert services.cache is not None
        for key in keys:
            await services.records.put(key, b'"old"')
            await services.records.get(key)
        assert local_redis.proc is not None
        pause(local_redis.proc)
        try:
            new_revisions = {k: await services.records.put(k, b'"new"') for k in keys[:2]}
            await services.records.delete(keys[2])
            assert len(services.cache.floors) == 3
            assert (await services.records.get(keys[0])).value == b'"new"'
        finally:
            local_redis.proc.send_signal(signal.SIGCONT)
        await wait_until_cached(services, keys[3])
        for key, revision in new_revisions.items():
            got = await services.records.get(key)
            assert (got.value, got.revision) == (b'"new"', revision)
        with pytest.raises(NotFound):
            await services.records.get(keys[2])
        assert (await services.records.get(keys[3])).value == b'"old"'  # untouched, still right
        redis = aioredis.Redis.from_url(local_redis.url)
        try:
            stored = await redis.hget(services.cache.key("data", keys[0]).entry, "r")
            assert stored is not None and int(stored) >= new_revisions[keys[0]]
        finally:
            await redis.aclose()
