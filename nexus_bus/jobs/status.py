"""Job status documents in the `nexus_jobs` KV bucket, one key per job id.

The bucket is also the status-change feed: every transition is a KV update on
`$KV.nexus_jobs.<job_id>`, so a client watches one job with `kv.watch(job_id)` (or
`nats kv watch nexus_jobs <job_id>`) and sees pending → running → succeeded/failed/dead as
they happen, including the last state when it starts watching late.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final, Protocol

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.js.kv import KeyValue

from nexus_bus.bus.assets import again_if_missing
from nexus_bus.bus.metadata import check_publish_size
from nexus_bus.errors import Conflict, NexusError, NotFound
from nexus_bus.schemas.jobs import Job, JobStatus
from nexus_bus.store import translate_nats_errors

# A job in one of these states is finished: a later delivery of its message is a duplicate.
_WATCH_CHECK_S: Final = 1.0  # how often a watch looks whether its connection reconnected
TERMINAL: Final = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.DEAD})


class JobRecord(Job, frozen=True, kw_only=True, omit_defaults=True):
    """A job's stored status: the public `Job` fields plus bookkeeping times (epoch seconds).

    `error` holds the last error's problem document (code, title, status, detail).
    """

    attempts: int = 0  # a default here only: the stored form may leave it out, `Job` may not
    created_at: float = 0.0
    updated_at: float = 0.0
    request_id: str | None = None

    def to_job(self) -> Job:
        """The public status document (`GET /v1/jobs/{id}`)."""
        return Job(
            id=self.id,
            op=self.op,
            action=self.action,
            status=self.status,
            attempts=self.attempts,
            result=self.result,
            error=self.error,
        )

    @property
    def finished(self) -> bool:
        """Whether the job reached a terminal state."""
        return self.status in TERMINAL


def advance(
    record: JobRecord,
    status: JobStatus,
    *,
    now: float,
    attempts: int | None = None,
    result: Any = None,
    error: Any = None,
) -> JobRecord:
    """The record after a transition; a success clears the last error, a failure keeps no result."""
    return msgspec.structs.replace(
        record,
        status=status,
        attempts=record.attempts if attempts is None else attempts,
        result=result if status is JobStatus.SUCCEEDED else None,
        error=None
        if status is JobStatus.SUCCEEDED
        else (error if error is not None else record.error),
        updated_at=now,
    )


_encoder: Final = msgspec.json.Encoder()
_decoder: Final = msgspec.json.Decoder(JobRecord)


def encode_record(record: JobRecord) -> bytes:
    """The stored bytes of a record."""
    return _encoder.encode(record)


def decode_record(data: bytes) -> JobRecord:
    """A stored record.

    Raises:
        NotFound: the bytes are not a job record (nothing we wrote).
    """
    try:
        return _decoder.decode(data)
    except msgspec.MsgspecError:
        raise NotFound("job status document is unreadable") from None


class JobStore:
    """Job records on the `nexus_jobs` bucket; nats errors become NexusErrors here."""

    def __init__(
        self, kv: KeyValue, *, nc: Client, clock: Callable[[], float] = time.time
    ) -> None:
        """Args:
        kv: the `nexus_jobs` bucket.
        nc: the connection under `kv`, whose max_payload bounds a document with the header a
            compare-and-set adds (`check_publish_size`).
        clock: epoch seconds, for the documents' times.
        """
        self._kv = kv
        self._nc = nc
        self.clock = clock

    async def create(self, record: JobRecord) -> JobRecord | None:
        """Store a new record; when the job exists already, return the existing one instead.

        Raises:
            PayloadTooLarge: the document exceeds the server's max_payload with its header.
            Unavailable / UpstreamTimeout: JetStream cannot be reached.
        """
        data = self._encode_fitting(record)

        async def create() -> None:
            async with translate_nats_errors(f"job {record.id}"):
                await self._kv.create(record.id, data)

        try:
            # A bucket gone since start is created again, and the write retried (bus/assets.py).
            await again_if_missing(self._nc, create)
        except Conflict:
            try:
                found, _ = await self.get(record.id)
            except NotFound:  # expired or deleted in between: ours to write again
                await self.put(record)
                return None
            return found
        return None

    async def get(self, job_id: str) -> tuple[JobRecord, int]:
        """The record of `job_id` and its KV revision.

        Raises:
            NotFound: no such job (never submitted, or its status expired).
            Unavailable / UpstreamTimeout: JetStream cannot be reached.
        """
        async with translate_nats_errors(f"job {job_id}"):
            entry = await self._kv.get(job_id)
        if entry.value is None or entry.revision is None:
            raise NotFound(f"job {job_id}: not found")
        return decode_record(entry.value), entry.revision

    async def put(self, record: JobRecord) -> int:
        """Write `record` unconditionally; its new revision.

        Raises:
            PayloadTooLarge: the document exceeds the server's max_payload (nats-py checks
                it: a plain put carries no header).
            Unavailable / UpstreamTimeout: JetStream cannot be reached.
        """
        async def put() -> int:
            async with translate_nats_errors(f"job {record.id}"):
                return await self._kv.put(record.id, encode_record(record))

        return await again_if_missing(self._nc, put)

    async def replace(self, record: JobRecord, revision: int) -> int | None:
        """Write `record` only if the stored one is still at `revision`; its new revision.

        Returns:
            The new revision, or None when the stored record moved on.

        Raises:
            PayloadTooLarge: the document exceeds the server's max_payload with its header.
            Unavailable / UpstreamTimeout: JetStream cannot be reached.
        """
        data = self._encode_fitting(record)

        async def update() -> int:
            async with translate_nats_errors(f"job {record.id}"):
                return await self._kv.update(record.id, data, last=revision)

        try:
            return await again_if_missing(self._nc, update)
        except Conflict:
            return None

    def _encode_fitting(self, record: JobRecord) -> bytes:
        """The stored bytes of `record` for a compare-and-set write (KV `create` / `update`).

        nats-py adds the expected revision as a header, and a document that fits max_payload
        alone but not with it would make the server close the connection (a job's result can
        come that close).

        Raises:
            PayloadTooLarge: the document and its header exceed the server's max_payload.
        """
        data = encode_record(record)
        check_publish_size(f"job {record.id}", data, None, self._nc.max_payload, jetstream=True)
        return data

    async def write_unless_finished(self, record: JobRecord, revision: int | None) -> int | None:
        """Write `record` unless the job finished meanwhile; its new revision, or None.

        Two deliveries of one job can run at once (an ack timeout while the first still runs).
        The first terminal status wins: a twin's later "running", "retry" or failure must not
        overwrite it. Compare-and-set from `revision` (the one this delivery last wrote or
        read), re-reading whenever another writer got in between.

        Raises:
            PayloadTooLarge: the document exceeds the server's max_payload (a result too
                large to store).
            Unavailable / UpstreamTimeout: JetStream cannot be reached.
        """
        if revision is not None:
            written = await self.replace(record, revision)
            if written is not None:
                return written
        while True:
            try:
                current, current_revision = await self.get(record.id)
            except NotFound:  # expired, or never written: nothing to protect
                return await self.put(record)
            if current.finished:
                return None
            written = await self.replace(record, current_revision)
            if written is not None:
                return written

    async def delete(self, job_id: str) -> None:
        """Remove a record (a submission that was never published).

        Raises:
            Unavailable / UpstreamTimeout: JetStream cannot be reached.
        """
        async with translate_nats_errors(f"job {job_id}"):
            await self._kv.delete(job_id)

    async def watch(self, job_id: str) -> AsyncIterator[JobRecord]:
        """Yield the current record, then every change, until the job finishes.

        nats-py makes a KV watch's consumer again only after it missed two of the consumer's
        heartbeats: after a reconnect (a restarted nats-server) a watch heard nothing for
        10 to 20 s, and a waiter learned late that its job had finished. So a watch looks
        every `_WATCH_CHECK_S` whether its connection reconnected since it was made, and if
        so makes it again (its snapshot first: nothing is missed, and nothing yielded twice).

        Raises:
            Unavailable / UpstreamTimeout: JetStream cannot be reached.
        """
        reconnects = self._nc.stats["reconnects"]
        watcher: Any = await self._watcher(job_id)
        seen = 0  # the revision of the last record yielded
        try:
            while True:
                if watcher is None:  # made again after a reconnect, when JetStream answers
                    try:
                        watcher = await self._watcher(job_id)
                    except NexusError:
                        await asyncio.sleep(_WATCH_CHECK_S)
                        continue
                try:
                    async with translate_nats_errors(f"watch job {job_id}"):
                        entry = await watcher.updates(timeout=_WATCH_CHECK_S)
                except NexusError as exc:
                    if not isinstance(exc, TimeoutError):
                        raise
                    if self._nc.stats["reconnects"] != reconnects:
                        reconnects = self._nc.stats["reconnects"]
                        await _stop(watcher)
                        watcher = None
                    continue
                # None: the end of the initial snapshot.
                if entry is None or entry.value is None or entry.revision <= seen:
                    continue
                seen = entry.revision
                record = decode_record(entry.value)
                yield record
                if record.finished:
                    return
        finally:
            if watcher is not None:
                await _stop(watcher)

    async def _watcher(self, job_id: str) -> Any:
        async with translate_nats_errors(f"watch job {job_id}"):
            return await self._kv.watch(job_id, ignore_deletes=True)


async def _stop(watcher: Any) -> None:
    # The connection may be gone already; the watcher goes with it.
    with contextlib.suppress(nats.errors.Error, OSError):
        await watcher.stop()


class OutcomeStore(Protocol):
    """The one method `write_outcome` needs (JobStore in production)."""

    async def write_unless_finished(self, record: JobRecord, revision: int | None) -> int | None:
        """See `JobStore.write_unless_finished`."""
        ...


async def write_outcome(
    store: OutcomeStore,
    record: JobRecord,
    revision: int | None,
    *,
    keepalive: Callable[[], Awaitable[None]],
    sleep: Callable[[float], Awaitable[None]],
    tries: int = 5,
    first_delay_s: float = 0.2,
) -> None:
    """Write a known outcome, retrying while JetStream is briefly unreachable.

    The handler has already run and its effects are committed: handing the message back
    would count the attempt again, and on the last attempt bury a job that succeeded. The
    write is idempotent (`write_unless_finished` re-reads on conflict), so retrying is safe.
    `keepalive` (the message's `in_progress`) stops the delivery timing out meanwhile.

    Raises:
        Unavailable / UpstreamTimeout: still unreachable after `tries` attempts.
    """
    delay = first_delay_s
    for _ in range(tries - 1):
        try:
            await store.write_unless_finished(record, revision)
            return
        except NexusError as exc:
            if not exc.retryable:
                raise
        with contextlib.suppress(nats.errors.Error, OSError):
            await keepalive()
        await sleep(delay)
        delay *= 2
    await store.write_unless_finished(record, revision)
