"""Creating Redis clients with request-path timeouts (single node or Redis Cluster).

redis-py's defaults wait seconds per command and retry three times, so one sick Redis
becomes a latency outage; every client nexus-bus opens uses the short timeouts from
`RedisSettings` and at most one retry. Callers add a breaker and fail open where they can.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from nexus_bus.config import RedisSettings
from nexus_bus.observability.tracing import TRACING

RedisClient = aioredis.Redis | RedisCluster


def redis_options(settings: RedisSettings) -> dict[str, Any]:
    """Keyword arguments shared by single-node and cluster clients."""
    opts: dict[str, Any] = {
        "socket_timeout": settings.socket_timeout_s,
        "socket_connect_timeout": settings.connect_timeout_s,
        "retry": Retry(NoBackoff(), 1),
    }
    if settings.password:
        opts["password"] = settings.password.get_secret_value()
    if settings.tls.enabled:
        # No `ssl=True` here: with from_url it reaches the connection class, which refuses
        # it; the `rediss://` scheme (see `redis_url`) is what selects TLS.
        if settings.tls.ca_file:
            opts["ssl_ca_certs"] = str(settings.tls.ca_file)
        if settings.tls.cert_file:
            opts["ssl_certfile"] = str(settings.tls.cert_file)
        if settings.tls.key_file:
            opts["ssl_keyfile"] = str(settings.tls.key_file)
        if not settings.tls.verify:
            opts["ssl_cert_reqs"] = "none"
    return opts


def redis_url(settings: RedisSettings) -> str:
    """The URL to connect to: `rediss://` whenever TLS material is configured."""
    if settings.tls.enabled and settings.url.startswith("redis://"):
        return "rediss://" + settings.url[len("redis://") :]
    return settings.url


def create_redis(settings: RedisSettings) -> RedisClient:
    """A Redis client for `settings.url`: a cluster client when `settings.cluster` is set.

    Connections are opened lazily, so this never blocks or fails; commands raise redis-py
    errors that the caller's adapter translates.
    """
    url = redis_url(settings)
    client: RedisClient
    if settings.cluster:
        client = RedisCluster.from_url(url, **redis_options(settings))
    else:
        client = aioredis.Redis.from_url(url, **redis_options(settings))
    if TRACING.enabled:
        # A span per command (arguments sanitized to `?`), on this client only: nothing
        # process-wide, so a user's own Redis clients stay untouched.
        from opentelemetry.instrumentation.redis import RedisInstrumentor

        RedisInstrumentor.instrument_client(client, tracer_provider=TRACING.provider)
    return client
