"""Auto-pipelining on a real Redis: the reads of one loop tick share one round trip."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from nexus_bus.cache import Entry
from nexus_bus.cache.keys import build_key
from nexus_bus.cache.redis_entries import RedisEntryStore


async def _connections_received(admin: aioredis.Redis) -> int:
    return int((await admin.info("stats"))["total_connections_received"])


async def test_concurrent_reads_go_out_as_one_pipeline_on_one_connection(
    redis_url: str, uid: str
) -> None:
    admin = aioredis.Redis.from_url(redis_url)
    client = aioredis.Redis.from_url(redis_url)
    store = RedisEntryStore(client, timeout_s=2.0)
    try:
        keys = [build_key("pipe", "data", f"{uid}.{n}") for n in range(40)]
        for n, key in enumerate(keys[:20]):
            await store.fill(key, Entry.of(b"v%d" % n, n + 1), ttl_ms=60_000)
        await admin.script_flush()  # the batch meets NOSCRIPT first and must recover
        before = await _connections_received(admin)
        lookups = await asyncio.gather(
            *(store.read(k, token=f"t{n}", lease_ms=1000, min_revision=0) for n, k in
              enumerate(keys))
        )
        opened = await _connections_received(admin) - before
        assert [lk.entry.value if lk.entry else None for lk in lookups] == [
            *(b"v%d" % n for n in range(20)), *([None] * 20)
        ]
        assert all(lk.lease for lk in lookups[20:])  # each miss got its own load lease
        # One connection carried all 40 reads (and the script reloads), not one each.
        assert opened <= 2, opened
    finally:
        await client.aclose()
        await admin.aclose()
