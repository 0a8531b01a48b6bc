"""The revision race: randomized concurrent put/get/delete on two workers end with cache == KV.

Each round runs a random mix of operations on one key from two workers at once (each with
its own NATS connection, Redis client and cache), with random delays between a load's KV
read and its cache fill, so that fills of old revisions regularly land after newer writes.
Afterwards the Redis entry must mirror the KV head exactly, and every read must have seen
at least the revision of every put that had returned before the read started.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack

import pytest
import redis.asyncio as aioredis

from nexus_bus import NotFound, Settings
from nexus_bus.cache import CachedRecordStore, data_policy
from nexus_bus.cache.heads import Absent, Head, KeyValueHeads
from nexus_bus.jetstream import ensure_data_bucket
from nexus_bus.store import KeyValueRecordStore
from tests.conftest import make_settings, open_services

ROUNDS = 1000
PARALLEL_ROUNDS = 20


class SlowFillHeads:
    """The real KV head reader; the head is handed back after a random pause, as if the
    loading worker stalled between reading the KV and filling the cache."""

    def __init__(self, inner: KeyValueHeads, rng: random.Random) -> None:
        self.inner = inner
        self.rng = rng

    async def head(self, key: str) -> Head:
        head = await self.inner.head(key)
        await asyncio.sleep(self.rng.choice([0, 0, 0.0005, 0.002, 0.004]))
        return head



async def check_mirror(
    key: str, kv_heads: KeyValueHeads, redis: aioredis.Redis, entry_name: str
) -> None:
    head = await kv_heads.head(key)
    stored = await redis.hgetall(entry_name)
    if head == Absent(key, 0):
        return  # never written: deleting it only evicts, there is nothing to mirror
    assert stored, f"{key}: the last write left no entry"
    revision, kind = int(stored[b"r"]), stored[b"k"]
    assert revision == head.revision, f"{key}: cache at {revision}, KV at {head.revision}"
    if isinstance(head, Absent):
        assert kind in (b"a", b"f"), f"{key}: cache holds a value the KV deleted"
    else:
        assert kind == b"v" and stored[b"v"] == head.value, f"{key}: cache value differs"


class Race:
    """Two workers' cached stores over one KV, and what the rounds observed."""

    def __init__(
        self, stores: list[CachedRecordStore], kv_heads: KeyValueHeads, redis: aioredis.Redis,
        entry_name: Callable[[str], str], rng: random.Random,
    ) -> None:
        self.stores = stores
        self.kv_heads = kv_heads
        self.redis = redis
        self.entry_name = entry_name
        self.rng = rng
        self.stale_reads: list[str] = []

    async def op(self, key: str, label: str, returned_puts: list[int]) -> None:
        """One random operation from a random worker, after a random pause."""
        await asyncio.sleep(self.rng.random() * 0.003)
        store = self.rng.choice(self.stores)
        kind = self.rng.choice(["put", "get", "get", "get", "delete"])
        if kind == "put":
            returned_puts.append(await store.put(key, f'"{label}"'.encode()))
        elif kind == "delete":
            await store.delete(key)
        else:
            floor = max(returned_puts, default=0)
            try:
                record = await store.get(key)
            except NotFound:
                return
            if record.revision < floor:
                self.stale_reads.append(f"{key}: read {record.revision} after put {floor}")

    async def round(self, key: str) -> None:
        """Seed (maybe cached), race 3-8 operations plus one put, then compare with the KV."""
        if self.rng.random() < 0.5:
            await self.rng.choice(self.stores).put(key, b'"seed"')
            if self.rng.random() < 0.5:
                await self.rng.choice(self.stores).get(key)  # cached before the race starts
        returned_puts: list[int] = []
        ops: list[Awaitable[object]] = [
            self.op(key, f"{key}-{i}", returned_puts) for i in range(self.rng.randint(3, 8))
        ]
        ops.append(self.rng.choice(self.stores).put(key, b'"last"'))  # one write at least
        await asyncio.gather(*ops)
        await check_mirror(key, self.kv_heads, self.redis, self.entry_name(key))
        head = await self.kv_heads.head(key)
        for store in self.stores:
            if isinstance(head, Absent):
                with pytest.raises(NotFound):
                    await store.get(key)
            else:
                assert (await store.get(key)).revision == head.revision


@pytest.mark.slow
async def test_randomized_interleavings_end_with_cache_equal_to_kv(
    settings: Settings, redis_url: str, uid: str
) -> None:
    rng = random.Random(uid)
    # Timeouts far above a busy machine's hiccups: a write-through that times out leaves a
    # fence by design (a miss, not the value), which the mirror check would report.
    settings = make_settings(
        settings.nats.url, redis_url, cache={"timeout_ms": 3000, "breaker_failures": 1000}
    )
    async with AsyncExitStack() as stack:
        workers = [await stack.enter_async_context(open_services(settings)) for _ in range(2)]
        kv = await ensure_data_bucket(workers[0].js, settings.jetstream)
        stores = []
        for services in workers:
            assert services.cache is not None
            heads = SlowFillHeads(KeyValueHeads(services.js), rng)
            policy = data_policy(settings.cache)
            store = KeyValueRecordStore(kv, workers[0].js)
            stores.append(CachedRecordStore(store, heads, services.cache, policy))
        redis = aioredis.Redis.from_url(redis_url)
        stack.push_async_callback(redis.aclose)
        cache = workers[0].cache
        assert cache is not None
        race = Race(
            stores, KeyValueHeads(workers[0].js), redis,
            lambda key: cache.key("data", key).entry, rng,
        )
        for start in range(0, ROUNDS, PARALLEL_ROUNDS):
            keys = [f"race.{uid}.{n}" for n in range(start, start + PARALLEL_ROUNDS)]
            await asyncio.gather(*(race.round(key) for key in keys))
        assert race.stale_reads == []
