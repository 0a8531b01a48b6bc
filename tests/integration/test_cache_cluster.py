"""The cache on a real 3-master Redis Cluster on loopback (selected by a `redis+cluster://` URL)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from nexus_bus import NotFound, Settings
from nexus_bus.cache import CachedRecordStore, data_policy
from nexus_bus.cache.heads import Absent, Head, KeyValueHeads
from nexus_bus.cache.service import eviction_warning
from nexus_bus.embedded import RedisClusterProcesses, redis_cluster
from nexus_bus.jetstream import ensure_data_bucket
from nexus_bus.redis_client import create_redis
from nexus_bus.store import KeyValueRecordStore
from tests.conftest import make_settings, open_services


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcesses]:
    nodes = redis_cluster(tmp_path_factory.mktemp("redis-cluster"), masters=3).start()
    try:
        yield nodes
    finally:
        nodes.kill()


@pytest.fixture
def cluster_settings(nats_url: str, cluster: RedisClusterProcesses) -> Settings:
    # Generous Redis timeouts: these tests count loads, and a timed-out call fails open into
    # an extra load by design (see test_cache_data.patient_settings).
    url = cluster.url.replace("redis://", "redis+cluster://", 1)
    settings = make_settings(nats_url, url, cache={"timeout_ms": 3000, "breaker_failures": 1000})
    assert settings.redis.cluster and settings.redis.url == cluster.url
    return settings



class CountingHeads:
    def __init__(self, inner: KeyValueHeads) -> None:
        self.inner = inner
        self.loads: dict[str, int] = {}

    async def head(self, key: str) -> Head:
        self.loads[key] = self.loads.get(key, 0) + 1
        await asyncio.sleep(0.03)
        return await self.inner.head(key)


async def test_records_on_a_cluster_spread_over_every_master(
    cluster_settings: Settings, cluster: RedisClusterProcesses, uid: str
) -> None:
    keys = [f"cl.{uid}.{i}" for i in range(30)]
    async with open_services(cluster_settings) as a, open_services(cluster_settings) as b:
        assert isinstance(a.redis, RedisCluster)
        for key in keys:
            await a.records.put(key, key.encode())
        for key in keys:
            assert (await b.records.get(key)).value == key.encode()
        await b.records.delete(keys[0])
        with pytest.raises(NotFound):
            await a.records.get(keys[0])
        per_node = []
        for node in cluster.nodes:
            client = aioredis.Redis.from_url(node.url)
            try:
                found = [k async for k in client.scan_iter(match=f"nexus:cache:data:{{cl.{uid}.*")]
            finally:
                await client.aclose()
            per_node.append(len(found))
        assert sum(per_node) == len(keys) and all(n > 0 for n in per_node), per_node


async def test_cluster_stampede_races_and_cache_aside(cluster_settings: Settings, uid: str) -> None:
    async with open_services(cluster_settings) as a, open_services(cluster_settings) as b:
        assert a.cache is not None and b.cache is not None
        kv = await ensure_data_bucket(a.js, cluster_settings.jetstream)
        heads = CountingHeads(KeyValueHeads(a.js))
        policy = data_policy(cluster_settings.cache).with_(wait_s=5.0)
        stores = [
            CachedRecordStore(KeyValueRecordStore(kv, a.js), heads, cache, policy)
            for cache in (a.cache, b.cache)
        ]
        cold = [f"clhot.{uid}.{i}" for i in range(4)]
        for key in cold:
            await KeyValueRecordStore(kv, a.js).put(key, b"1")
        await asyncio.gather(*(stores[i % 2].get(key) for key in cold for i in range(20)))
        assert all(heads.loads[key] == 1 for key in cold), heads.loads

        race = [f"clrace.{uid}.{i}" for i in range(40)]

        async def churn(key: str, n: int) -> None:
            store = stores[n % 2]
            if n % 5 == 0:
                await store.delete(key)
            elif n % 3 == 0:
                await store.put(key, str(n).encode())
            else:
                with contextlib.suppress(NotFound):
                    await store.get(key)

        await asyncio.gather(*(churn(key, n) for key in race for n in range(8)))
        kv_heads = KeyValueHeads(a.js)
        for key in race:
            head = await kv_heads.head(key)
            try:
                got = await stores[1].get(key)
            except NotFound:
                assert isinstance(head, Absent), key
            else:
                assert not isinstance(head, Absent) and got.revision == head.revision, key

        calls: list[int] = []

        async def getter() -> dict[str, str]:
            calls.append(1)
            return {"uid": uid}

        for cache in (a.cache, b.cache, a.cache):
            assert await cache.get_or_set(f"gos.{uid}", getter, 60) == {"uid": uid}
        assert len(calls) == 1


async def test_the_eviction_check_reads_every_node_of_a_cluster(
    cluster_settings: Settings,
) -> None:
    redis = create_redis(cluster_settings.redis)
    every = RedisCluster.ALL_NODES
    try:
        assert await eviction_warning(redis) is None  # the nodes keep Redis's default
        await redis.config_set("maxmemory", "64mb", target_nodes=every)
        await redis.config_set("maxmemory-policy", "allkeys-lru", target_nodes=every)
        assert "maxmemory-policy allkeys-lru" in (await eviction_warning(redis) or "")
    finally:
        await redis.config_set("maxmemory", "0", target_nodes=every)
        await redis.config_set("maxmemory-policy", "noeviction", target_nodes=every)
        await redis.aclose()
