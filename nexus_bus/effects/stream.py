"""Where effect records live, and the services whose record store journals into them.

Effect records share the data bucket's stream with the writes they cover: an atomic batch
spans one stream only. `ensure_effect_records` adds their subject tree and turns on atomic
batches and per-message TTLs there; `journaled_services` then hands out the worker's services
with a `JournaledRecordStore` in place of the record store. The job runner uses it with
`jobs.effect_ttl_s`, the core request path with `resilience.idempotency_retention_s`.
"""

from __future__ import annotations

import dataclasses

from nats.js import JetStreamContext

from nexus_bus.bus.assets import assets_of
from nexus_bus.cache import data_policy
from nexus_bus.constants import DATA_BUCKET, EFFECTS_PREFIX, KV_STREAM_PREFIX
from nexus_bus.effects.cache_sync import CacheWriteThrough
from nexus_bus.effects.journal import JournaledRecordStore
from nexus_bus.services import Services
from nexus_bus.store import translate_nats_errors


def data_stream_name(bucket: str = DATA_BUCKET) -> str:
    """The stream behind a KV bucket."""
    return f"{KV_STREAM_PREFIX}{bucket}"


async def ensure_effect_records(js: JetStreamContext, bucket: str = DATA_BUCKET) -> str:
    """Let the data bucket's stream hold effect records; returns the stream's name.

    Adds the `nexus.sys.effects.>` subject tree and turns on atomic batches and per-message
    TTLs. Both flags only widen what the stream accepts; the KV API is unaffected because it
    only ever addresses `$KV.<bucket>.>`.

    Raises:
        Unavailable: JetStream cannot be reached, or the server is older than 2.12.
    """
    name = data_stream_name(bucket)
    records_subject = f"{EFFECTS_PREFIX}.>"
    async with translate_nats_errors(f"stream {name}"):
        config = (await js.stream_info(name)).config
        subjects = list(config.subjects or [])
        if records_subject in subjects and config.allow_atomic and config.allow_msg_ttl:
            return name
        if records_subject not in subjects:
            subjects.append(records_subject)
        await js.update_stream(
            dataclasses.replace(config, subjects=subjects, allow_atomic=True, allow_msg_ttl=True)
        )
    return name


async def journaled_services(services: Services, *, record_ttl_s: float) -> Services:
    """`services` with a record store that journals writes made inside an `effect_scope`.

    The journal wraps the worker's own (cached) record store and writes its commits through
    to the same cache; everything else is shared with `services`.

    Args:
        record_ttl_s: how long effect records are kept (how late a rerun may come).

    Raises:
        Unavailable: JetStream cannot be reached, or the server is older than 2.12.
    """
    stream = await ensure_effect_records(services.js)
    # A data bucket created again while the worker runs needs the records' settings again.
    assets_of(services.nc).track(stream, "effect records", ensure_effect_records)
    cache = services.cache
    journal = JournaledRecordStore(
        services.records,
        services.nc,
        stream=stream,
        record_ttl_s=record_ttl_s,
        write_through=(
            CacheWriteThrough(cache, data_policy(services.settings.cache)) if cache else None
        ),
    )
    return dataclasses.replace(services, records=journal)
