"""The cache in front of `data` over real Redis and NATS: each pattern, two workers, fences."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
from nats.js import JetStreamContext
from nats.js.kv import KeyValue
from prometheus_client import REGISTRY

from nexus_bus import Gateway, NotFound, Operations, RequestContext, Settings, Worker
from nexus_bus.bus.metadata import new_trace
from nexus_bus.cache import (
    Cache,
    CachedRecordStore,
    CachePolicy,
    CacheResult,
    Entry,
    Kind,
    Lookup,
    data_policy,
    read_through,
    write_through,
)
from nexus_bus.cache.entries import Written
from nexus_bus.cache.heads import Absent, Head, KeyValueHeads
from nexus_bus.cache.keys import CacheKey
from nexus_bus.cache.redis_entries import RedisEntryStore
from nexus_bus.embedded import free_port, redis_server
from nexus_bus.errors import InvalidRequest, Unavailable
from nexus_bus.jetstream import ensure_data_bucket
from nexus_bus.observability import logger
from nexus_bus.store import Deleted, KeyValueRecordStore
from tests.conftest import make_settings, open_services


@pytest.fixture
def patient_settings(nats_url: str, redis_url: str) -> Settings:
    """For tests that count loads: a Redis call that times out fails open into an extra load
    by design, so these use timeouts far above a busy machine's scheduling hiccups (a burst
    on a cold connection pool opens one connection per concurrent call)."""
    return make_settings(nats_url, redis_url, cache={"timeout_ms": 3000, "breaker_failures": 1000})


@pytest.fixture
async def raw_redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


def sample(result: str) -> float:
    return REGISTRY.get_sample_value(
        "nexus_cache_requests_total", {"cache": "data", "result": result}
    ) or 0.0


async def test_data_ops_read_and_write_through_the_cache(
    gateway: Gateway, worker: Worker, raw_redis: aioredis.Redis, uid: str
) -> None:
    assert worker.services is not None and worker.services.cache is not None
    entry = worker.services.cache.key("data", f"c.{uid}").entry
    put = await gateway.request("data", "put", {"key": f"c.{uid}", "value": {"a": [1, 2]}})
    stored = await raw_redis.hgetall(entry)
    assert stored[b"r"] == str(put["revision"]).encode() and stored[b"k"] == b"v"
    assert msgspec.json.decode(stored[b"v"]) == {"a": [1, 2]}
    hits = sample("hit")
    got = await gateway.request("data", "get", {"key": f"c.{uid}"})
    assert got == {"key": f"c.{uid}", "value": {"a": [1, 2]}, "revision": put["revision"]}
    assert sample("hit") == hits + 1  # written through: the first read is a hit
    ratio = REGISTRY.get_sample_value("nexus_cache_hit_ratio", {"cache": "data"})
    assert ratio is not None and 0 < ratio <= 1
    await gateway.request("data", "delete", {"key": f"c.{uid}"})
    tombstone = await raw_redis.hgetall(entry)
    assert tombstone[b"k"] == b"a" and int(tombstone[b"r"]) > put["revision"]
    assert 0 < await raw_redis.pttl(entry) <= 33_000  # the short negative TTL, jittered
    with pytest.raises(NotFound):
        await gateway.request("data", "get", {"key": f"c.{uid}"})
    assert sample("hit") == hits + 2  # the absence, too, came from the cache


async def test_a_put_on_one_worker_is_read_at_once_on_another(
    settings: Settings, uid: str
) -> None:
    key = f"two.{uid}"
    async with open_services(settings) as a, open_services(settings) as b:
        await a.records.put(key, b"1")
        assert (await b.records.get(key)).value == b"1"
        for n in range(2, 30):
            await a.records.put(key, str(n).encode())
            assert (await b.records.get(key)).value == str(n).encode()
            await b.records.delete(key)
            with pytest.raises(NotFound):
                await a.records.get(key)


async def test_a_writer_that_cannot_reach_redis_has_a_peer_fence_the_old_entry(
    nats_url: str, redis_url: str, uid: str
) -> None:
    key = f"fence.{uid}"
    # The writer is cut off from the reader's Redis: its URL leads nowhere, while the shared
    # scope says it is the same Redis (as for a worker behind a network partition).
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    scope = {"scope": f"partitioned-{uid}"}
    async with (
        open_services(make_settings(nats_url, redis_url, cache=scope)) as reader,
        open_services(make_settings(nats_url, dead_redis, cache=scope)) as writer,
    ):
        await reader.records.put(key, b'"old"')
        assert (await reader.records.get(key)).value == b'"old"'  # cached in Redis
        revision = await writer.records.put(key, b'"new"')  # its own write-through fails
        got = await reader.records.get(key)
        assert (got.value, got.revision) == (b'"new"', revision)
        assert writer.cache is not None and len(writer.cache.floors) == 0  # fenced, no floor
        await writer.records.delete(key)
        with pytest.raises(NotFound):
            await reader.records.get(key)


async def test_l1_entries_are_revoked_in_other_workers_before_a_write_returns(
    settings: Settings, uid: str
) -> None:
    policy = CachePolicy(ttl_s=600, local_ttl_s=2)  # an L1 under 2 s read leases
    async with open_services(settings) as a, open_services(settings) as b:
        assert a.cache is not None and b.cache is not None
        source = {"v": 1}
        loads: list[int] = []

        async def getter() -> dict[str, int]:
            loads.append(1)
            return dict(source)

        assert await a.cache.get_or_set(uid, getter, 600, policy=policy) == {"v": 1}
        for _ in range(3):  # a Redis hit with a read lease, then L1 hits
            assert await b.cache.get_or_set(uid, getter, 600, policy=policy) == {"v": 1}
        assert b.cache.stats.counts("default")[CacheResult.HIT] >= 3
        source["v"] = 2
        await a.cache.set(uid, {"v": 2}, 600, policy=policy)
        # Read-your-writes across workers: b's L1 copy was revoked before `set` returned.
        assert await b.cache.get_or_set(uid, getter, 600, policy=policy) == {"v": 2}
        assert loads == [1]


async def test_a_cache_aside_set_replaces_a_cached_not_found_on_real_redis(
    settings: Settings, uid: str
) -> None:
    """FILL_LUA keeps a cached absence against a fill of the same (unversioned) revision, but
    a `set` is a write: after it returns every worker reads the value."""
    policy = CachePolicy(ttl_s=600, negative_ttl_s=30)
    source: dict[str, int] = {}

    async def getter() -> int:
        if uid not in source:
            raise NotFound(uid)
        return source[uid]

    async with open_services(settings) as a, open_services(settings) as b:
        assert a.cache is not None and b.cache is not None
        with pytest.raises(NotFound):
            await a.cache.get_or_set(uid, getter, 600, policy=policy)  # the absence is cached
        source[uid] = 7
        await a.cache.set(uid, 7, 600, policy=policy)
        source[uid] = 8  # the cache must answer from the set, not the getter
        assert await b.cache.get_or_set(uid, getter, 600, policy=policy) == 7


async def test_get_or_set_runs_one_getter_across_workers(
    patient_settings: Settings, uid: str
) -> None:
    settings = patient_settings
    calls: list[int] = []

    async def getter() -> list[str]:
        calls.append(1)
        await asyncio.sleep(0.05)
        return ["computed", uid]

    async with open_services(settings) as a, open_services(settings) as b:
        assert a.cache is not None and b.cache is not None
        caches = [a.cache, b.cache] * 15
        results = await asyncio.gather(*(c.get_or_set(f"gos.{uid}", getter, 60) for c in caches))
        assert results == [["computed", uid]] * 30
        assert len(calls) == 1
        await b.cache.delete(f"gos.{uid}")
        assert await a.cache.get_or_set(f"gos.{uid}", getter, 60) == ["computed", uid]
        assert len(calls) == 2


class CountingHeads:
    """The real KV head reader, counting loads per key and taking a little longer."""

    def __init__(self, inner: KeyValueHeads, delay_s: float) -> None:
        self.inner = inner
        self.delay_s = delay_s
        self.loads: dict[str, int] = {}

    async def head(self, key: str) -> Head:
        self.loads[key] = self.loads.get(key, 0) + 1
        await asyncio.sleep(self.delay_s)
        return await self.inner.head(key)


class PausingHeads:
    """The real KV head reader, holding its answer for one key until released: a worker
    stalled between reading a head and writing the cache."""

    def __init__(self, inner: KeyValueHeads, key: str) -> None:
        self.inner = inner
        self.key = key
        self.read = asyncio.Event()
        self.release = asyncio.Event()

    async def head(self, key: str) -> Head:
        head = await self.inner.head(key)
        if key == self.key:
            self.read.set()
            await self.release.wait()
        return head


class PausingDeletes(KeyValueRecordStore):
    """The real KV record store, holding a delete's answer until released: a worker stalled
    between the KV delete and the cache write."""

    def __init__(self, kv: KeyValue, js: JetStreamContext) -> None:
        super().__init__(kv, js)
        self.deleted = asyncio.Event()
        self.release = asyncio.Event()

    async def delete_versioned(self, key: str) -> Deleted:
        deleted = await super().delete_versioned(key)
        self.deleted.set()
        await self.release.wait()
        return deleted


async def test_a_delete_that_found_nothing_leaves_the_entry_of_a_put_racing_it(
    patient_settings: Settings, raw_redis: aioredis.Redis, uid: str
) -> None:
    """The KV says "nothing to delete" (never written, no revision); a put lands and writes
    through before the delete writes the cache. The delete must not evict the put's entry:
    the cache would fall short of the KV (a miss where the latest write should be; found by
    `test_cache_race` under load)."""
    key = f"nothing.{uid}"
    async with open_services(patient_settings) as a, open_services(patient_settings) as b:
        assert a.cache is not None and b.cache is not None
        kv = await ensure_data_bucket(a.js, patient_settings.jetstream)
        policy = data_policy(patient_settings.cache)
        pausing = PausingDeletes(kv, a.js)
        deleter = CachedRecordStore(pausing, KeyValueHeads(a.js), a.cache, policy)
        writer = CachedRecordStore(
            KeyValueRecordStore(kv, b.js), KeyValueHeads(b.js), b.cache, policy
        )
        deleting = asyncio.create_task(deleter.delete(key))
        await asyncio.wait_for(pausing.deleted.wait(), 10)  # the KV said: never written
        revision = await writer.put(key, b'"new"')
        pausing.release.set()
        assert await deleting is False
        stored = await raw_redis.hgetall(a.cache.key("data", key).entry)
        assert stored, "the delete evicted the entry of the put that raced it"
        assert (int(stored[b"r"]), stored[b"k"], stored[b"v"]) == (revision, b"v", b'"new"')
        assert (await deleter.get(key)).revision == revision


class UnreadableHeads:
    """A KV head reader that always fails, as JetStream does for a moment under load."""

    async def head(self, key: str) -> Head:
        raise Unavailable(f"get {key}: JetStream did not answer")


async def test_a_delete_tombstones_its_own_revision_with_no_read_after_it(
    patient_settings: Settings, raw_redis: aioredis.Redis, uid: str
) -> None:
    """The KV delete returns its marker's revision, so the tombstone needs no head read after
    the delete: that read could fail, and the eviction left then let a fill of the deleted
    value, loaded before the delete, bring it back after the delete had returned."""
    key = f"undelete.{uid}"
    settings = patient_settings
    async with open_services(settings) as a, open_services(settings) as b:
        assert a.cache is not None and b.cache is not None
        kv = await ensure_data_bucket(a.js, settings.jetstream)
        policy = data_policy(settings.cache)
        deleter = CachedRecordStore(
            KeyValueRecordStore(kv, a.js), UnreadableHeads(), a.cache, policy
        )
        reader_heads = PausingHeads(KeyValueHeads(b.js), key)
        reader = CachedRecordStore(KeyValueRecordStore(kv, b.js), reader_heads, b.cache, policy)
        await deleter.put(key, b'"secret"')
        entry = a.cache.key("data", key).entry
        await raw_redis.delete(entry)  # the entry expired: the next read loads the KV
        reading = asyncio.create_task(reader.get(key))
        await asyncio.wait_for(reader_heads.read.wait(), 10)  # read "secret", not filled yet
        assert await deleter.delete(key) is True
        reader_heads.release.set()
        assert (await reading).value == b'"secret"'  # concurrent with the delete: allowed
        reader_heads.key = ""
        marker = await KeyValueHeads(a.js).head(key)
        assert isinstance(marker, Absent)
        stored = await raw_redis.hgetall(entry)
        assert (stored[b"k"], int(stored[b"r"])) == (b"a", marker.revision)
        with pytest.raises(NotFound):
            await reader.get(key)  # begins after the delete returned


async def test_the_kv_delete_says_the_revision_of_its_marker(settings: Settings, uid: str) -> None:
    async with open_services(settings) as services:
        kv = await ensure_data_bucket(services.js, settings.jetstream)
        store = KeyValueRecordStore(kv, services.js)
        heads = KeyValueHeads(services.js)
        key = f"marker.{uid}"
        assert await store.delete_versioned(key) == Deleted(existed=False, revision=0)
        put = await store.put(key, b"1")
        deleted = await store.delete_versioned(key)
        assert deleted.existed and deleted.revision > put
        assert await heads.head(key) == Absent(key, deleted.revision)
        again = await store.delete_versioned(key)  # no new marker: the one there
        assert again == Deleted(existed=False, revision=deleted.revision)
        assert await store.delete(key) is False
        with pytest.raises(InvalidRequest):
            await store.delete_versioned("a..b")


class StalledFills:
    """An entry store whose read-through fills are held on their way to Redis: a worker
    stalled (SIGSTOP, a long pause) after its load."""

    def __init__(self, inner: RedisEntryStore, stall_s: float) -> None:
        self.inner = inner
        self.stall_s = stall_s

    async def read(self, key: CacheKey, **kwargs: Any) -> Lookup:
        return await self.inner.read(key, **kwargs)

    async def fill(self, key: CacheKey, entry: Entry, **kwargs: Any) -> Written:
        if not kwargs.get("collect"):  # a fill, not a write
            await asyncio.sleep(self.stall_s)
        return await self.inner.fill(key, entry, **kwargs)

    async def evict(self, key: CacheKey, **kwargs: Any) -> Written:
        return await self.inner.evict(key, **kwargs)

    async def seal(self, key: CacheKey, **kwargs: Any) -> Written:
        return await self.inner.seal(key, **kwargs)

    async def release(self, key: CacheKey, token: str) -> None:
        await self.inner.release(key, token)


async def test_a_fill_that_reaches_redis_after_max_fill_age_is_refused(
    raw_redis: aioredis.Redis, uid: str
) -> None:
    """FILL_LUA refuses a fill later than `max_fill_age_s` after the read that missed, on
    Redis's clock: the tombstone it raced with expired while its worker stalled."""
    store = RedisEntryStore(raw_redis, timeout_s=3.0)
    policy = CachePolicy(ttl_s=60, negative_ttl_s=0.5, jitter=0)
    writer = Cache(store, max_fill_age_s=0.3)
    reader = Cache(StalledFills(store, stall_s=0.8), max_fill_age_s=0.3)

    async def head_then_deleted() -> Entry:
        await writer.write("data", uid, Entry.absent(2), policy)  # the delete lands
        return Entry.of(b"doomed", 1)  # read before it

    await reader.fetch("data", uid, head_then_deleted, policy)  # quick load, stalled fill

    async def absent() -> Entry:
        return Entry.absent(2)

    assert (await writer.fetch("data", uid, absent, policy)).kind is Kind.ABSENT


async def test_a_policy_shorter_than_max_fill_age_bounds_its_own_fills(
    raw_redis: aioredis.Redis, uid: str
) -> None:
    """A handler's own policy (`read_through(..., revision=..., policy=...)`) is not checked
    against the cache settings' `max_fill_age_s`: with a tombstone living 0.3 s and fills
    accepted for 2 s, a fill stalled 0.8 s landed after the tombstone expired, and the
    deleted value was served again for `ttl_s`. Its fills are bounded by its own shortest
    entry life too."""
    store = RedisEntryStore(raw_redis, timeout_s=3.0)
    policy = CachePolicy(ttl_s=60, negative_ttl_s=0.3, jitter=0)
    writer = Cache(store, max_fill_age_s=2.0)
    reader = Cache(StalledFills(store, stall_s=0.8), max_fill_age_s=2.0)

    async def head_then_deleted() -> Entry:
        await writer.write("profiles", uid, Entry.absent(2), policy)  # the delete lands
        return Entry.of(b"doomed", 1)  # read before it

    await reader.fetch("profiles", uid, head_then_deleted, policy)  # quick load, stalled fill

    async def absent() -> Entry:
        return Entry.absent(2)

    assert (await writer.fetch("profiles", uid, absent, policy)).kind is Kind.ABSENT


async def test_stampede_on_cold_keys_loads_each_key_once(
    patient_settings: Settings, uid: str
) -> None:
    settings = patient_settings
    keys = [f"hot.{uid}.{i}" for i in range(5)]
    async with open_services(settings) as a, open_services(settings) as b:
        kv = await ensure_data_bucket(a.js, settings.jetstream)
        for key in keys:
            await KeyValueRecordStore(kv, a.js).put(key, key.encode())  # in the KV, not the cache
        stores: list[CachedRecordStore] = []
        counters: list[CountingHeads] = []
        for services in (a, b):
            assert services.cache is not None
            heads = CountingHeads(KeyValueHeads(services.js), delay_s=0.03)
            counters.append(heads)
            policy = data_policy(settings.cache).with_(wait_s=5.0)
            stores.append(
                CachedRecordStore(KeyValueRecordStore(kv, a.js), heads, services.cache, policy)
            )
        reads: list[Any] = [stores[i % 2].get(key) for key in keys for i in range(40)]
        records = await asyncio.gather(*reads)
        assert all(r.value == r.key.encode() for r in records)
        for key in keys:
            assert sum(c.loads.get(key, 0) for c in counters) == 1, key
        assert a.cache is not None
        counts = a.cache.stats.counts("data")
        assert counts.get(CacheResult.COALESCED, 0) + counts.get(CacheResult.HIT, 0) > 0


class Item(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    version: int


class ItemRequest(msgspec.Struct, frozen=True, kw_only=True):
    id: str


async def test_declared_read_through_and_write_through_on_real_redis(
    settings: Settings, uid: str
) -> None:
    ops = Operations(f"items{uid}")
    source = {"a": Item(id="a", version=1)}
    loads: list[str] = []
    policy = CachePolicy(ttl_s=60, negative_ttl_s=5)

    @ops.action("get")
    @read_through(f"items{uid}", key=lambda r: r.id, policy=policy, revision=lambda i: i.version)
    async def get(req: ItemRequest, ctx: RequestContext) -> Item:
        loads.append(req.id)
        if req.id not in source:
            raise NotFound(req.id)
        return source[req.id]

    @ops.action("bump")
    @write_through(
        f"items{uid}", key=lambda r: r.id, value=lambda r, reply: reply,
        revision=lambda i: i.version, policy=policy,
    )
    async def bump(req: ItemRequest, ctx: RequestContext) -> Item:
        source[req.id] = Item(id=req.id, version=source[req.id].version + 1)
        return source[req.id]

    async with open_services(settings) as a, open_services(settings) as b:
        ctx_a, ctx_b = (
            RequestContext(
                op=ops.op, action="get", request_id="r", trace=new_trace(), deadline_ms=0,
                services=s,
            )
            for s in (a, b)
        )
        assert await get(ItemRequest(id="a"), ctx_a) == Item(id="a", version=1)
        assert await get(ItemRequest(id="a"), ctx_b) == Item(id="a", version=1)  # other worker
        await bump(ItemRequest(id="a"), ctx_b)
        assert await get(ItemRequest(id="a"), ctx_a) == Item(id="a", version=2)
        for ctx in (ctx_a, ctx_b):
            with pytest.raises(NotFound):
                await get(ItemRequest(id="missing"), ctx)
        assert loads == ["a", "missing"]  # one load each; the rest hit Redis


async def test_a_worker_warns_at_start_when_redis_evicts(
    nats_url: str, redis_url: str, tmp_path: Path
) -> None:
    """Evicted tombstones, fences or read leases break the cache's guarantee: the operator
    learns of such a Redis at start, and of no other."""
    evicting = redis_server(
        tmp_path, extra_args=["--maxmemory", "64mb", "--maxmemory-policy", "volatile-lru"]
    ).start()
    warnings: list[str] = []
    sink = logger.add(lambda m: warnings.append(m.record["message"]), level="WARNING")
    try:
        for url in (redis_url, evicting.url):
            async with open_services(make_settings(nats_url, url)):
                pass
    finally:
        logger.remove(sink)
        evicting.kill()
    evictions = [w for w in warnings if "evicts keys" in w]
    assert len(evictions) == 1
    assert "maxmemory 67108864 bytes, maxmemory-policy volatile-lru" in evictions[0]
