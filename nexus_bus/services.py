"""The resources handlers reach through `ctx.services`, built once per worker process."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client
from nats.js import JetStreamContext

from nexus_bus.bus.assets import assets_of
from nexus_bus.cache import Cache, cached_records, data_policy, start_cache
from nexus_bus.cache.service import distrust_a_renewed_bucket
from nexus_bus.config import Settings
from nexus_bus.constants import CACHE_DATA_NAMESPACE, DATA_BUCKET, EVENTS_STREAM, KV_STREAM_PREFIX
from nexus_bus.events import EventLog, JetStreamEventLog
from nexus_bus.jetstream import ensure_data_bucket, ensure_events_stream, renew_data_bucket
from nexus_bus.redis_client import RedisClient, create_redis
from nexus_bus.store import KeyValueRecordStore, RecordStore, translate_nats_errors


@dataclass
class Services:
    """Shared, long-lived resources of a worker: connections and adapters behind seams."""

    settings: Settings
    # Never `nc.flush(timeout=...)`: a nats-py flush that times out (or is cancelled) leaves
    # the connection deaf (docs/runtime.md); `nexus_bus.bus.connection.round_trip` does not.
    nc: Client
    js: JetStreamContext
    records: RecordStore
    events: EventLog
    redis: RedisClient
    extras: dict[str, Any] = field(default_factory=dict)
    cache: Cache | None = None  # None when `cache.enabled` is off
    # Closed by `close_services`, last added first (e.g. the ai backends' HTTP pools).
    on_close: list[Callable[[], Awaitable[None]]] = field(default_factory=list)


async def create_services(nc: Client, settings: Settings) -> Services:
    """Create streams and buckets idempotently and wire the adapters.

    Both are tracked on `nc` (`bus/assets.py`): should they go missing while the worker
    runs, the first call that finds one gone creates them again.

    Raises:
        Unavailable: JetStream cannot be reached.
    """
    js = nc.jetstream()
    await ensure_events_stream(js, settings.jetstream)
    kv = await ensure_data_bucket(js, settings.jetstream)
    assets = assets_of(nc)
    assets.track(EVENTS_STREAM, "stream", lambda js: ensure_events_stream(js, settings.jetstream))
    data_stream = f"{KV_STREAM_PREFIX}{DATA_BUCKET}"
    async with translate_nats_errors(f"stream {data_stream}"):
        template = (await js.stream_info(data_stream)).config
    redis = create_redis(settings.redis)
    kv_records = KeyValueRecordStore(kv, js, nc=nc)
    records: RecordStore = kv_records
    cache = await start_cache(nc, redis, settings) if settings.cache.enabled else None

    async def renewed() -> None:  # every cache stops serving what it holds of the old one
        if cache is not None:
            await cache.distrust(CACHE_DATA_NAMESPACE, data_policy(settings.cache).lifetime_s)

    # Created again as it is now, its revisions above the old one's (the cache's ordering).
    assets.track(
        data_stream, "bucket", lambda js: renew_data_bucket(js, template, created=renewed)
    )
    if cache is not None:
        await distrust_a_renewed_bucket(cache, template, settings.cache)
        # The cache wraps everything that writes records (docs/cache.md): a wrapper outside
        # it that wrote to the KV directly would leave stale entries behind.
        records = cached_records(kv_records, js, cache, settings.cache)
    return Services(
        settings=settings,
        nc=nc,
        js=js,
        records=records,
        events=JetStreamEventLog(js, nc=nc),
        redis=redis,
        cache=cache,
    )


async def close_services(services: Services) -> None:
    """Release what `create_services` opened (the NATS connection belongs to the caller)."""
    while services.on_close:
        await services.on_close.pop()()
    if services.cache is not None:
        await services.cache.close()
    await services.redis.aclose()
