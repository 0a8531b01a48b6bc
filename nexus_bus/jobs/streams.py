"""The streams and buckets jobs need, created (or brought up to date) idempotently.

- `NEXUS_JOBS` on `nexus.jobs.*.*` (op and action, nothing more: no consumer takes a longer
  subject, and acknowledged it would stay for good): work-queue retention, so an acknowledged
  job is gone and each op's subjects have exactly one durable consumer; `Nats-Msg-Id` dedup
  window from settings.
- `NEXUS_DLQ` on `nexus.dlq.>`: limits retention, kept `jobs.dlq_max_age_s`.
- `nexus_jobs` KV: one status document per job, expiring after `jobs.status_ttl_s`.

Replicas and storage of all of them come from `settings.jetstream`.
"""

from __future__ import annotations

from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, RetentionPolicy, StreamConfig
from nats.js.kv import KeyValue

from nexus_bus.bus.assets import assets_of
from nexus_bus.config import Settings
from nexus_bus.constants import (
    DLQ_PREFIX,
    DLQ_STREAM,
    JOBS_BUCKET,
    JOBS_PREFIX,
    JOBS_STREAM,
    KV_STREAM_PREFIX,
)
from nexus_bus.jetstream import ensure_bucket, ensure_stream, storage_type


def jobs_stream_config(settings: Settings) -> StreamConfig:
    """The configuration of `NEXUS_JOBS`."""
    js = settings.jetstream
    return StreamConfig(
        name=JOBS_STREAM,
        subjects=[f"{JOBS_PREFIX}.*.*"],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=storage_type(js),
        num_replicas=js.replicas,
        duplicate_window=js.dedup_window_s,
    )


def dlq_stream_config(settings: Settings) -> StreamConfig:
    """The configuration of `NEXUS_DLQ`."""
    js = settings.jetstream
    return StreamConfig(
        name=DLQ_STREAM,
        subjects=[f"{DLQ_PREFIX}.>"],
        retention=RetentionPolicy.LIMITS,
        storage=storage_type(js),
        num_replicas=js.replicas,
        max_age=settings.jobs.dlq_max_age_s,
        duplicate_window=js.dedup_window_s,
    )


async def ensure_jobs_bucket(js: JetStreamContext, settings: Settings) -> KeyValue:
    """The `nexus_jobs` status bucket, created when absent.

    Raises:
        Unavailable: JetStream cannot be reached.
    """
    return await ensure_bucket(
        js,
        KeyValueConfig(
            bucket=JOBS_BUCKET,
            history=1,
            ttl=settings.jobs.status_ttl_s,
            storage=storage_type(settings.jetstream),
            replicas=settings.jetstream.replicas,
        ),
    )


async def ensure_job_streams(js: JetStreamContext, settings: Settings) -> KeyValue:
    """`NEXUS_JOBS`, `NEXUS_DLQ` and the status bucket; returns the bucket.

    Raises:
        Unavailable: JetStream cannot be reached or refuses a configuration.
    """
    await ensure_stream(js, jobs_stream_config(settings))
    await ensure_stream(js, dlq_stream_config(settings))
    return await ensure_jobs_bucket(js, settings)


async def ensure_tracked_job_streams(nc: Client, settings: Settings) -> KeyValue:
    """`ensure_job_streams` on `nc`, each stream and the bucket also tracked on it
    (`bus/assets.py`): one gone while the process runs is created again by the next call
    that finds it missing.

    Raises:
        Unavailable: JetStream cannot be reached or refuses a configuration.
    """
    kv = await ensure_job_streams(nc.jetstream(), settings)
    assets = assets_of(nc)
    jobs, dlq = jobs_stream_config(settings), dlq_stream_config(settings)
    assets.track(JOBS_STREAM, "stream", lambda js: ensure_stream(js, jobs))
    assets.track(DLQ_STREAM, "stream", lambda js: ensure_stream(js, dlq))
    bucket = f"{KV_STREAM_PREFIX}{JOBS_BUCKET}"
    assets.track(bucket, "bucket", lambda js: ensure_jobs_bucket(js, settings))
    return kv
