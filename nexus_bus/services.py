"""The resources handlers reach through `ctx.services`, built once per worker process."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client
from nats.js import JetStreamContext

from nexus_bus.config import Settings
from nexus_bus.events import EventLog, JetStreamEventLog
from nexus_bus.jetstream import ensure_data_bucket, ensure_events_stream
from nexus_bus.redis_client import RedisClient, create_redis
from nexus_bus.store import KeyValueRecordStore, RecordStore


@dataclass
class Services:
    """Shared, long-lived resources of a worker: connections and adapters behind seams."""

    settings: Settings
    nc: Client
    js: JetStreamContext
    records: RecordStore
    events: EventLog
    redis: RedisClient
    extras: dict[str, Any] = field(default_factory=dict)


async def create_services(nc: Client, settings: Settings) -> Services:
    """Create streams and buckets idempotently and wire the adapters.

    Raises:
        Unavailable: JetStream cannot be reached.
    """
    js = nc.jetstream()
    await ensure_events_stream(js, settings.jetstream)
    kv = await ensure_data_bucket(js, settings.jetstream)
    return Services(
        settings=settings,
        nc=nc,
        js=js,
        records=KeyValueRecordStore(kv),
        events=JetStreamEventLog(js),
        redis=create_redis(settings.redis),
    )


async def close_services(services: Services) -> None:
    """Release what `create_services` opened (the NATS connection belongs to the caller)."""
    await services.redis.aclose()
