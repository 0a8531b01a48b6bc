"""Building the cache of a worker from settings: Redis store, breaker, peers, `data` records."""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import urlsplit

from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import StreamConfig

from nexus_bus.cache.core import Cache
from nexus_bus.cache.entries import CacheUnavailable, EntryStore
from nexus_bus.cache.floors import Floors
from nexus_bus.cache.heads import KeyValueHeads
from nexus_bus.cache.invalidation import CacheBus
from nexus_bus.cache.local import LocalCache
from nexus_bus.cache.policy import CachePolicy
from nexus_bus.cache.records import CachedRecordStore
from nexus_bus.cache.redis_entries import RedisEntryStore
from nexus_bus.config import CacheSettings, RedisSettings, Settings
from nexus_bus.constants import (
    CACHE_BREAKER,
    CACHE_DATA_NAMESPACE,
    CACHE_EPOCH_SUFFIX,
    DATA_BUCKET,
    KV_STREAM_PREFIX,
)
from nexus_bus.errors import NexusError
from nexus_bus.jetstream import renewed_at
from nexus_bus.observability import METRICS, logger
from nexus_bus.redis_client import RedisClient
from nexus_bus.resilience import BreakerState, CircuitBreaker, ExponentialBackoff, Jitter
from nexus_bus.store import VersionedRecordStore, translate_nats_errors

_DATA_STREAM = f"{KV_STREAM_PREFIX}{DATA_BUCKET}"
_WARM_UP_S = 2.0  # at start only: learning a cluster's slots may take a while


def data_policy(settings: CacheSettings) -> CachePolicy:
    """The policy of `data` records: with an L1 under read leases of `local_ttl_s`."""
    return CachePolicy(
        local_ttl_s=settings.local_ttl_s,
        ttl_s=settings.ttl_s,
        negative_ttl_s=settings.negative_ttl_s,
        stale_s=settings.stale_s,
        jitter=settings.jitter,
        lease_s=settings.lease_s,
        wait_s=settings.wait_s,
        fence_ttl_s=settings.fence_ttl_s,
    )


def _report_breaker(state: BreakerState) -> None:
    METRICS.circuit_state.labels(CACHE_BREAKER).set(state.level)
    if state is BreakerState.OPEN:
        logger.warning("redis cache breaker opened: reads and writes go to the record only")
    else:
        logger.info("redis cache breaker {}", state.value)


def redis_scope(settings: RedisSettings) -> str:
    """The identity of the Redis a cache uses, as carried in notices: host, port and database
    of its URL (never its credentials), marked for clusters."""
    url = urlsplit(settings.url)
    scope = f"{url.hostname or ''}:{url.port or ''}{url.path or ''}"
    return f"{scope}+cluster" if settings.cluster else scope


def create_cache(store: EntryStore, settings: CacheSettings, *, local: bool = True) -> Cache:
    """A cache on `store` with the breaker, L1 bound and floors from `settings` (no peers yet);
    without an L1 when `local` is off (the store cannot record read leases)."""
    breaker = CircuitBreaker(
        failure_threshold=settings.breaker_failures,
        reset=ExponentialBackoff(
            base_s=settings.breaker_reset_s, cap_s=settings.breaker_reset_max_s, jitter=Jitter.EQUAL
        ),
        on_change=_report_breaker,
    )
    METRICS.circuit_state.labels(CACHE_BREAKER).set(BreakerState.CLOSED.level)
    return Cache(
        store,
        prefix=settings.key_prefix,
        breaker=breaker,
        local=(
            LocalCache(settings.local_max_entries, max_bytes=settings.local_max_bytes)
            if local
            else None
        ),
        floors=Floors(max_keys=settings.max_floors),
        max_fill_age_s=settings.max_fill_age_s,
    )


async def start_cache(nc: Client, redis: RedisClient, settings: Settings) -> Cache:
    """A cache whose peers are the other workers on `nc` (subscribed before it returns).

    Raises:
        Unavailable: NATS refused the subscriptions.
    """
    store = RedisEntryStore(
        redis,
        timeout_s=settings.cache.timeout_ms / 1000,
        epoch_key=settings.cache.key_prefix + CACHE_EPOCH_SUFFIX,
    )
    try:
        await store.warm_up(_WARM_UP_S)
    except CacheUnavailable as exc:
        logger.warning("redis cache is not reachable at start ({}); failing open until it is", exc)
    if warning := await eviction_warning(redis):
        logger.warning(warning)
    if not store.holds and settings.cache.local_ttl_s > 0:
        logger.info("redis cluster: no L1 (read leases need one epoch per Redis; docs/cache.md)")
    cache = create_cache(store, settings.cache, local=store.holds)
    bus = CacheBus(
        nc,
        cache,
        fence_timeout_s=settings.cache.fence_timeout_ms / 1000,
        inbox_prefix=settings.nats.inbox_prefix,
        scope=settings.cache.scope or redis_scope(settings.redis),
    )
    await bus.start()
    return cache


async def distrust_a_renewed_bucket(
    cache: Cache, config: StreamConfig, settings: CacheSettings
) -> None:
    """At start: when the data bucket (whose stream has `config`) was created again less than
    an entry lifetime ago, entries of the old one may still be in Redis. Serve none from
    `data` until they have all expired; the processes running then heard it at once
    (`Cache.distrust`, announced by the worker that created it)."""
    renewed = renewed_at(config)
    if renewed is None:
        return
    left = renewed + data_policy(settings).lifetime_s - time.time()
    if left > 0:
        await cache.distrust(CACHE_DATA_NAMESPACE, left, announce=False)


async def recheck_a_renewed_bucket(
    cache: Cache, js: JetStreamContext, settings: CacheSettings
) -> None:
    """`distrust_a_renewed_bucket` with the data stream's configuration as it is now: at a
    shim's start, and after any reconnect, during which the announcement may have been
    missed (never raises: without an answer, the next reconnect asks again)."""
    try:
        async with translate_nats_errors(f"stream {_DATA_STREAM}"):
            info = await js.stream_info(_DATA_STREAM)
    except NexusError:
        return  # no bucket yet (none created again either), or JetStream not answering
    await distrust_a_renewed_bucket(cache, info.config, settings)


async def eviction_warning(redis: RedisClient) -> str | None:
    """What to tell the operator of a Redis that evicts keys under memory pressure, or None.

    The cache's tombstones, fences and read leases must last their time (docs/cache.md): an
    evicted one can let a read return a value older than a write that completed. Checked
    once at start from `INFO memory`; a Redis that refuses `INFO` (ACLs, some managed
    services) is not second-guessed.
    """
    try:
        async with asyncio.timeout(_WARM_UP_S):
            info: dict[str, Any] = await redis.info("memory")
    except Exception:
        return None
    # A cluster client answers per node: {node: {field: value}}.
    nodes = [info] if "maxmemory_policy" in info else list(info.values())
    for node in nodes:
        if not isinstance(node, dict):
            continue
        policy, limit = node.get("maxmemory_policy", "noeviction"), node.get("maxmemory", 0)
        if policy != "noeviction" and int(limit or 0) > 0:
            return (
                f"redis evicts keys under memory pressure (maxmemory {limit} bytes, "
                f"maxmemory-policy {policy}): the cache's tombstones, fences and read leases "
                "may go early and a read return a value older than a completed write; "
                "run it with maxmemory-policy noeviction (docs/cache.md)"
            )
    return None


def cached_records(
    inner: VersionedRecordStore, js: JetStreamContext, cache: Cache, settings: CacheSettings
) -> CachedRecordStore:
    """`inner` (the KV record store, or a wrapper of it that says its deletes' revisions)
    behind the cache."""
    return CachedRecordStore(inner, KeyValueHeads(js), cache, data_policy(settings))
