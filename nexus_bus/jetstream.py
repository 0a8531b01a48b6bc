"""Creating the streams and buckets nexus-bus needs, idempotently, at start."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable
from typing import Final

import nats.js.errors as jserr
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType, StreamConfig
from nats.js.kv import KeyValue

from nexus_bus.config import JetStreamSettings
from nexus_bus.constants import (
    AUTH_REVOKED_BUCKET,
    DATA_BUCKET,
    EVENTS_PREFIX,
    EVENTS_STREAM,
    OPS_BUCKET,
)
from nexus_bus.errors import Unavailable
from nexus_bus.store import translate_nats_errors

_STREAM_NAME_IN_USE = 10058  # exists with a different configuration
# Processes lengthening a bucket's max age at once (each re-reads after its update) settle
# in a round or two; past this many, the bucket's max age is changing under us.
_MAX_AGE_ROUNDS: Final = 5


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
    """`NEXUS_EVENTS`: `nexus.events.>`, limits retention, dedup window from settings.

    The dedup window is at most the events' max age: JetStream refuses a longer one, and
    events kept a shorter time than `dedup_window_s` would otherwise stop every start.
    """
    await ensure_stream(
        js,
        StreamConfig(
            name=EVENTS_STREAM,
            subjects=[f"{EVENTS_PREFIX}.>"],
            storage=storage_type(settings),
            num_replicas=settings.replicas,
            max_age=settings.events_max_age_s,
            duplicate_window=min(settings.dedup_window_s, settings.events_max_age_s),
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


async def renew_data_bucket(
    js: JetStreamContext,
    template: StreamConfig,
    *,
    created: Callable[[], Awaitable[None]] | None = None,
) -> KeyValue:
    """The `nexus_data` bucket; when it is gone (while a worker runs), created again as
    `template` (its stream's configuration when the worker started), its revisions starting
    at the current time in epoch microseconds.

    Revisions order the cache's entries (docs/cache.md): a bucket created again from 1 would
    rank every entry the Redis cache still holds from the old one above the new writes, and
    a key written anew would read back its old value until the entry expired. The old bucket
    reached a higher revision only with more than a write per microsecond on average since
    it began; and it stays far below 2^53, past which the cache cannot compare revisions. Two
    processes creating it at once: the first one's stands (the other's is refused). `created`
    is awaited when this call created it: the cache must stop serving entries of the old one
    (`Cache.distrust`).

    Raises:
        Unavailable: JetStream cannot be reached.
    """
    async with translate_nats_errors(f"bucket {DATA_BUCKET}"):
        try:
            return await js.key_value(DATA_BUCKET)
        except jserr.BucketNotFoundError:
            pass
        first_seq = int(time.time() * 1_000_000)
        try:
            await js.add_stream(dataclasses.replace(template, first_seq=first_seq))
        except jserr.BadRequestError as exc:
            if exc.err_code != _STREAM_NAME_IN_USE:  # in use: another process was first
                raise
        else:
            if created is not None:
                await created()
        return await js.key_value(DATA_BUCKET)


def renewed_at(config: StreamConfig) -> float | None:
    """When the data bucket with this stream configuration was created again while workers
    ran (epoch seconds: its first revision, `renew_data_bucket`); None for one created as
    usual, whose revisions start at 1."""
    first = config.first_seq or 0
    return first / 1_000_000 if first > 1 else None


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


async def ensure_revocations_bucket(
    js: JetStreamContext, settings: JetStreamSettings, *, max_age_s: float
) -> KeyValue:
    """The `nexus_auth_revoked` KV bucket of revoked token ids (docs/auth.md).

    Its max age is how long a revocation must last (`auth.max_ttl_s + auth.leeway_s`): a
    record goes only once no token carrying its id can still be valid. An existing bucket
    whose max age is shorter is lengthened, or its records would expire while the tokens they
    refuse are still accepted. A longer one is left as it is: processes with different
    settings (a rolling change, a CLI with defaults) each ask for their own, and the longest
    must win; were each to set its own, the shorter one would delete records the other still
    relies on. Shortening it is an operator's decision (docs/auth.md).

    Raises:
        Unavailable: JetStream cannot be reached, or the max age keeps changing under us.
    """
    kv = await ensure_bucket(
        js,
        KeyValueConfig(
            bucket=AUTH_REVOKED_BUCKET,
            history=1,
            ttl=max_age_s,
            storage=storage_type(settings),
            replicas=settings.replicas,
        ),
    )
    async with translate_nats_errors(f"bucket {AUTH_REVOKED_BUCKET}"):
        # Stream updates have no compare-and-set: after ours, read again, so a process that
        # wrote a shorter age over ours at the same moment is overruled in the next round.
        for _ in range(_MAX_AGE_ROUNDS):
            config = (await kv.status()).stream_info.config
            if not config.max_age or config.max_age >= max_age_s:  # 0 or None: no limit
                return kv
            await js.update_stream(dataclasses.replace(config, max_age=max_age_s))
    raise Unavailable(f"bucket {AUTH_REVOKED_BUCKET}: its max age keeps changing")
