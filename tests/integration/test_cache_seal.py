"""The seal's Lua scripts on a real Redis, rule for rule with the in-memory twin: a sealed
key grants no read lease until every sealing write has written through, or one hold has
passed after the longest lease the seal collected; a write's collection keeps the seals of
other writes still under way."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from nexus_bus.cache import Entry
from nexus_bus.cache.keys import CacheKey, build_key
from nexus_bus.cache.redis_entries import RedisEntryStore

HOLD_MS = 400


async def _held(store: RedisEntryStore, key: CacheKey, holder: str) -> bool:
    lookup = await store.read(
        key, token="t", lease_ms=1000, min_revision=0, holder=holder, hold_ms=HOLD_MS
    )
    assert lookup.entry is not None
    return lookup.held


async def test_seal_collects_holders_and_grants_no_lease_until_its_write_ends(
    redis_url: str, uid: str
) -> None:
    client = aioredis.Redis.from_url(redis_url)
    store = RedisEntryStore(client, timeout_s=2.0)
    key = build_key("seal", "data", uid)
    try:
        await store.fill(key, Entry.of(b"old", 1), ttl_ms=60_000)
        assert await _held(store, key, "w1")
        sealed = await store.seal(key, hold_ms=HOLD_MS)
        assert [h.origin for h in sealed.holders] == ["w1"]  # to be revoked before the write
        assert not await _held(store, key, "w2")  # the write is under way
        # A second write seals too; the first one's write-through ends only its own seal.
        await store.seal(key, hold_ms=HOLD_MS)
        first = await store.fill(
            key, Entry.of(b"mid", 2), ttl_ms=60_000, collect=True, hold_ms=HOLD_MS, unseal=True
        )
        assert first.holders == ()  # nobody was granted a lease while sealed
        assert not await _held(store, key, "w2")
        await store.fill(
            key, Entry.of(b"new", 3), ttl_ms=60_000, collect=True, hold_ms=HOLD_MS, unseal=True
        )
        assert await _held(store, key, "w2")  # both writes ended: leases again
        # A write that never ends (its worker died) holds the seal for one hold past the
        # longest lease it collected (w2's, nearly a whole hold), which its writer may have
        # waited out: the seal outlasts that wait.
        sealed = await store.seal(key, hold_ms=HOLD_MS)
        assert [h.origin for h in sealed.holders] == ["w2"]
        assert not await _held(store, key, "w3")
        await asyncio.sleep(HOLD_MS / 1000 + 0.1)
        assert not await _held(store, key, "w3")  # the writer just went on: still sealed
        await asyncio.sleep(HOLD_MS / 1000)
        assert await _held(store, key, "w3")
        # An eviction with `unseal` ends a delete's seal the same way.
        await store.seal(key, hold_ms=HOLD_MS)
        await store.evict(key, hold_ms=HOLD_MS, unseal=True)
        await store.fill(key, Entry.of(b"again", 4), ttl_ms=60_000)
        assert await _held(store, key, "w4")
    finally:
        await client.aclose()
