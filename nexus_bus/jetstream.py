"""Creating the streams and buckets nexus-bus needs, idempotently, at start."""

from __future__ import annotations

import nats.js.errors as jserr
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType, StreamConfig
from nats.js.kv import KeyValue

from nexus_bus.config import JetStreamSettings
from nexus_bus.constants import DATA_BUCKET, EVENTS_PREFIX, EVENTS_STREAM, OPS_BUCKET
from nexus_bus.store import translate_nats_errors

_STREAM_NAME_IN_USE = 10058  # exists with a different configuration


def storage_type(settings: JetStreamSettings) -> StorageType:
    """The nats-py storage enum for the configured storage."""
    return StorageType.MEMORY if settings.storage == "memory" else StorageType.FILE


async def ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    """Create a stream, or update it to `config` when it already exists.

    Raises:
        Unavailable: JetStream cannot be reached or refuses the configuration.
    """
    async with translate_nats_errors(f"stream {config.name}"):
        try:
            await js.add_stream(config)
        except jserr.BadRequestError as exc:
            if exc.err_code != _STREAM_NAME_IN_USE:
                raise
            await js.update_stream(config)


async def ensure_events_stream(js: JetStreamContext, settings: JetStreamSettings) -> None:
    """`NEXUS_EVENTS`: `nexus.events.>`, limits retention, dedup window from settings."""
    await ensure_stream(
        js,
        StreamConfig(
            name=EVENTS_STREAM,
            subjects=[f"{EVENTS_PREFIX}.>"],
            storage=storage_type(settings),
            num_replicas=settings.replicas,
            max_age=settings.events_max_age_s,
            duplicate_window=settings.dedup_window_s,
        ),
    )


async def ensure_bucket(js: JetStreamContext, config: KeyValueConfig) -> KeyValue:
    """A KV bucket, created with `config` when absent (an existing one is used as it is).

    Raises:
        Unavailable: JetStream cannot be reached.
    """
    async with translate_nats_errors(f"bucket {config.bucket}"):
        try:
            return await js.key_value(config.bucket)
        except jserr.BucketNotFoundError:
            return await js.create_key_value(config)


async def ensure_data_bucket(js: JetStreamContext, settings: JetStreamSettings) -> KeyValue:
    """The `nexus_data` KV bucket (the system of record), created when absent.

    Raises:
        Unavailable: JetStream cannot be reached.
    """
    return await ensure_bucket(
        js,
        KeyValueConfig(
            bucket=DATA_BUCKET,
            history=1,
            storage=storage_type(settings),
            replicas=settings.replicas,
        ),
    )


async def ensure_ops_bucket(
    js: JetStreamContext, settings: JetStreamSettings, *, forget_after_s: float
) -> KeyValue:
    """The `nexus_ops` KV bucket of the operation registry (docs/registry.md).

    Its max age is `registry.forget_after_s`: an entry no worker refreshed for that long is
    gone, and with it (once every instance's entry is) the op's declaration.

    Raises:
        Unavailable: JetStream cannot be reached.
    """
    return await ensure_bucket(
        js,
        KeyValueConfig(
            bucket=OPS_BUCKET,
            history=1,
            ttl=forget_after_s,
            storage=storage_type(settings),
            replicas=settings.replicas,
        ),
    )
