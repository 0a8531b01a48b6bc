"""Submitting jobs and reading their status: what the gateway and the HTTP shim call.

    accepted = await submit_job(nc, settings, "data", "put", body, headers)
    job = await wait_job(nc, settings, accepted.job_id, timeout_s=30)

A submission first creates the job's status document (`pending`) with a KV `create()`, then
publishes to `nexus.jobs.<op>.<action>` with `Nats-Msg-Id` set to the job id. The id is
derived from the `Idempotency-Key` when one is given (and the subject of the submission's
token: a key is its caller's), so a resubmission finds the document and returns the same job,
even after the stream's dedup window has passed.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import AsyncIterator, Mapping
from typing import Final

from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from nexus_bus.auth.authenticator import bearer_token
from nexus_bus.auth.tokens import unverified_subject
from nexus_bus.bus.assets import again_if_missing
from nexus_bus.bus.metadata import check_headers, check_publish_size, request_id_of
from nexus_bus.bus.subjects import check_operation, jobs_subject
from nexus_bus.config import Settings
from nexus_bus.constants import JOBS_BUCKET, JOBS_STREAM
from nexus_bus.errors import NexusError, PayloadTooLarge, UpstreamTimeout
from nexus_bus.jobs.envelope import (
    check_job_id,
    idempotency_key_of,
    job_headers,
    job_id_for,
)
from nexus_bus.jobs.status import JobRecord, JobStore
from nexus_bus.jobs.streams import ensure_tracked_job_streams
from nexus_bus.observability import logger
from nexus_bus.observability.tracing import TRACING, SpanKind
from nexus_bus.schemas.jobs import Job, JobAccepted, JobStatus
from nexus_bus.store import translate_nats_errors

# One status-bucket handle per connection: the streams are ensured once, not per submit.
# Two first submits racing both ensure them; that is idempotent, so no lock. The handle
# reaches its connection through a weak proxy: a value of a weak mapping that held its key
# would keep every connection that ever submitted a job alive.
_buckets: Final[weakref.WeakKeyDictionary[Client, KeyValue]] = weakref.WeakKeyDictionary()


async def job_store(nc: Client, settings: Settings) -> JobStore:
    """The job status store on `nc`, creating the job streams and bucket on first use.

    Raises:
        Unavailable: JetStream cannot be reached.
    """
    kv = _buckets.get(nc)
    if kv is None:
        await ensure_tracked_job_streams(nc, settings)
        async with translate_nats_errors(f"bucket {JOBS_BUCKET}"):
            kv = await JetStreamContext(weakref.proxy(nc)).key_value(JOBS_BUCKET)
        _buckets[nc] = kv
    return JobStore(kv, nc=nc)


async def submit_job(
    nc: Client, settings: Settings, op: str, action: str, body: bytes, headers: Mapping[str, str]
) -> JobAccepted:
    """Submit `op.action` with an encoded `body` to run asynchronously.

    Only the request headers a job needs are kept (see `envelope.FORWARDED_HEADERS`); caller
    deadlines are dropped. With an `Idempotency-Key`, submitting again returns the same job
    and its current status.

    Raises:
        InvalidRequest / UnknownOperation: a malformed or reserved op or action, or headers
            with characters that are not allowed.
        PayloadTooLarge / HeadersTooLarge: over the configured or server limits.
        Unavailable / UpstreamTimeout: JetStream did not acknowledge the submission; it may
            or may not have been stored, so retry with the same idempotency key.
    """
    check_operation(op, action)
    limits = settings.limits
    if len(body) > limits.max_body_bytes:
        raise PayloadTooLarge(f"body of {len(body)} bytes exceeds {limits.max_body_bytes}")
    key = idempotency_key_of(headers)
    job_id = job_id_for(op, action, key, submitter(headers, settings.auth.max_token_bytes))
    hdrs = job_headers(headers, job_id)
    check_headers(
        hdrs, max_value_bytes=limits.max_header_value_bytes, max_total_bytes=limits.max_header_bytes
    )
    what = f"submit {op}.{action}"
    # Before anything is written; checked again below once the trace headers are in.
    check_publish_size(what, body, hdrs, nc.max_payload, jetstream=True)

    store = await job_store(nc, settings)
    now = time.time()
    record = JobRecord(
        id=job_id,
        op=op,
        action=action,
        status=JobStatus.PENDING,
        created_at=now,
        updated_at=now,
        request_id=request_id_of(hdrs),
    )
    existing = await store.create(record)
    # A job that already ran, or is waiting for a retry, is not published again. One that
    # never started may be a submission whose publish failed: publish it again (the stream
    # drops the copy when the first one did get stored within the dedup window).
    if existing is not None and (existing.status is not JobStatus.PENDING or existing.attempts):
        return JobAccepted(job_id=job_id, status=existing.status)
    subject = jobs_subject(op, action)
    attributes = {
        "messaging.system": "nats",
        "messaging.operation.type": "send",
        "messaging.destination.name": subject,
        "nexus.op": op,
        "nexus.action": action,
        "nexus.job_id": job_id,
    }
    try:
        with TRACING.span(f"publish {subject}", kind=SpanKind.PRODUCER, attributes=attributes):
            TRACING.inject(hdrs)  # each delivery attempt's span is a child of this one
            # The `traceparent` (and `tracestate`) just added count toward max_payload too.
            check_publish_size(what, body, hdrs, nc.max_payload, jetstream=True)

            async def publish() -> None:
                async with translate_nats_errors(what):
                    await nc.jetstream().publish(subject, body, stream=JOBS_STREAM, headers=hdrs)

            # A stream gone since it was created here is created again, and the publish
            # retried (bus/assets.py): no stream took the first one.
            await again_if_missing(nc, publish)
    except NexusError as exc:
        # Without a key the caller cannot address this job again: forget its document, unless
        # the outcome is unknown (a timeout may hide a stored message that will still run). A
        # job too large to publish was never sent and never will be, key or not.
        forget = key is None and not isinstance(exc, UpstreamTimeout)
        if existing is None and (forget or isinstance(exc, PayloadTooLarge)):
            try:
                await store.delete(job_id)
            except NexusError as cleanup:
                logger.warning("could not remove job {} after a failed submit: {}", job_id, cleanup)
        raise
    return JobAccepted(job_id=job_id, status=JobStatus.PENDING)


def submitter(headers: Mapping[str, str], max_token_bytes: int) -> str | None:
    """The subject the submission's bearer token names, which scopes its idempotency key.

    Read without verifying the token: the HTTP shim has verified it just before (a job it
    authorized), and a client submitting on its own NATS connection writes the job bucket
    itself, so a false subject gains it nothing it could not write directly.
    """
    try:
        token = bearer_token(headers)
    except NexusError:
        return None
    return unverified_subject(token, max_token_bytes) if token else None


async def get_job(nc: Client, settings: Settings, job_id: str) -> Job:
    """The status document of a job.

    Raises:
        InvalidRequest: `job_id` is not shaped like a job id.
        NotFound: no such job (never submitted, or its status expired).
        Unavailable / UpstreamTimeout: JetStream cannot be reached.
    """
    check_job_id(job_id)
    store = await job_store(nc, settings)
    record, _ = await store.get(job_id)
    return record.to_job()


async def watch_job(nc: Client, settings: Settings, job_id: str) -> AsyncIterator[Job]:
    """Yield a job's status now and at every change, until it finishes.

    Raises:
        InvalidRequest: `job_id` is not shaped like a job id.
        Unavailable / UpstreamTimeout: JetStream cannot be reached.
    """
    check_job_id(job_id)
    store = await job_store(nc, settings)
    async for record in store.watch(job_id):
        yield record.to_job()


async def wait_job(nc: Client, settings: Settings, job_id: str, *, timeout_s: float) -> Job:
    """Wait until a job finishes (succeeded, failed or dead) and return its status.

    Raises:
        InvalidRequest: `job_id` is not shaped like a job id.
        NotFound: no such job.
        UpstreamTimeout: it did not finish within `timeout_s`.
        Unavailable: JetStream cannot be reached.
    """
    await get_job(nc, settings, job_id)  # NotFound before waiting on a job that does not exist
    try:
        async with asyncio.timeout(timeout_s):
            last: Job | None = None
            async for job in watch_job(nc, settings, job_id):
                last = job
            if last is not None:
                return last
    except TimeoutError as exc:
        if isinstance(exc, NexusError):
            raise
        raise UpstreamTimeout(f"job {job_id} did not finish within {timeout_s:g}s") from None
    return await get_job(nc, settings, job_id)
