"""The dead-letter queue: `NEXUS_DLQ` on `nexus.dlq.<op>.<action>`.

A dead-lettered job is stored as the original message: its body byte for byte and its
headers, plus `Nexus-Dlq-*` headers with the last error (code, status, detail), the attempt
count, the original subject and sequence, and when it was enqueued and when it failed.
Any NATS tool can read it (`nats stream view NEXUS_DLQ`); `nexus-bus dlq list|replay|purge`
manages it. A replay republishes the original message (without the annotations) as the same
job, resets its status to pending, then deletes the entry: since a job's writes are journaled
(`nexus_bus/effects/`), a replay never repeats a write the job already made.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

import nats.js.errors as jserr
from nats.js import JetStreamContext

from nexus_bus.bus.metadata import headers_size, is_ascii_digits
from nexus_bus.bus.subjects import dlq_subject, jobs_subject
from nexus_bus.constants import (
    DLQ_HEADER_PREFIX,
    DLQ_PREFIX,
    DLQ_STREAM,
    H_AUTHORIZATION,
    H_DLQ_ATTEMPTS,
    H_DLQ_BODY_DROPPED,
    H_DLQ_ENQUEUED_AT,
    H_DLQ_ERROR,
    H_DLQ_ERROR_CODE,
    H_DLQ_ERROR_STATUS,
    H_DLQ_FAILED_AT,
    H_DLQ_STREAM_SEQ,
    H_DLQ_SUBJECT,
    H_JOB_ID,
    H_NATS_MSG_ID,
    JOBS_STREAM,
    NATS_HEADER_PREFIX,
)
from nexus_bus.errors import NexusError, NotFound
from nexus_bus.jobs.envelope import parse_job_subject
from nexus_bus.jobs.status import JobStore, advance
from nexus_bus.schemas.jobs import JobStatus
from nexus_bus.store import translate_nats_errors

_MAX_DETAIL: Final = 512


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One entry of the DLQ."""

    seq: int  # its sequence in NEXUS_DLQ: the id `replay` and `list` use
    job_id: str
    op: str
    action: str
    error_code: str
    error_status: int
    error_detail: str
    attempts: int
    enqueued_at: float
    failed_at: float
    data: bytes
    headers: dict[str, str]

    def original_headers(self) -> dict[str, str]:
        """The job's own headers, without the dead-letter annotations."""
        return {k: v for k, v in self.headers.items() if not k.startswith(DLQ_HEADER_PREFIX)}


@dataclass(frozen=True, slots=True)
class Stored:
    """Where `dead_letter` left a message: its entry's sequence in NEXUS_DLQ, and whether
    another delivery of the same message had stored it first.

    The entry's msg id is `dlq-<seq>` of the message in NEXUS_JOBS, so a second publish for
    it inside the dedup window stores nothing: JetStream answers with the first one's sequence
    and `duplicate`. That entry is not the caller's to delete.
    """

    seq: int
    duplicate: bool


def _header_safe(text: str) -> str:
    return "".join(c if c.isprintable() and c.isascii() else " " for c in text)[:_MAX_DETAIL]


def dead_letter_headers(
    headers: Mapping[str, str],
    *,
    error: NexusError,
    attempts: int,
    subject: str,
    stream_seq: int,
    enqueued_at: float,
    failed_at: float,
) -> dict[str, str]:
    """The headers of a DLQ entry: the original ones (minus JetStream's) and the annotations."""
    kept = {
        k: v
        for k, v in headers.items()
        if not k.startswith((NATS_HEADER_PREFIX, DLQ_HEADER_PREFIX))
    }
    kept.update(
        {
            H_DLQ_ERROR_CODE: error.code,
            H_DLQ_ERROR_STATUS: str(error.http_status),
            H_DLQ_ERROR: _header_safe(error.detail),
            H_DLQ_ATTEMPTS: str(attempts),
            H_DLQ_SUBJECT: subject,
            H_DLQ_STREAM_SEQ: str(stream_seq),
            H_DLQ_ENQUEUED_AT: f"{enqueued_at:.6f}",
            H_DLQ_FAILED_AT: f"{failed_at:.6f}",
            # One DLQ entry per delivered message, however often dead-lettering is retried.
            H_NATS_MSG_ID: f"dlq-{stream_seq}",
        }
    )
    return kept


async def dead_letter(
    js: JetStreamContext,
    *,
    op: str,
    action: str,
    data: bytes,
    headers: dict[str, str],
    max_payload: int,
) -> Stored:
    """Store a DLQ entry; its sequence, and whether it was there already (see `Stored`).

    An entry that would not fit `max_payload` (the original body plus the original and the
    dead-letter headers) is stored without its body, marked `Nexus-Dlq-Body-Dropped: <bytes>`:
    the server answers an oversized publish by closing the connection, and the job would then
    come back to kill the next worker too.

    Raises:
        Unavailable / UpstreamTimeout: JetStream did not confirm; the job stays undelivered
            and is retried, and the dedup id stops a second entry.
    """
    dropped_header = len(H_DLQ_BODY_DROPPED) + 4 + 20
    size = len(data) + headers_size(headers)
    if size + dropped_header > max_payload:
        headers = {**headers, H_DLQ_BODY_DROPPED: str(len(data))}
        data = b""
    async with translate_nats_errors(f"dead-letter {op}.{action}"):
        ack = await js.publish(dlq_subject(op, action), data, stream=DLQ_STREAM, headers=headers)
    return Stored(int(ack.seq), bool(ack.duplicate))


def _float(value: str | None) -> float:
    try:
        return float(value or 0)
    except ValueError:
        return 0.0


def _int(value: str | None) -> int:
    return int(value) if value and is_ascii_digits(value) else 0


def entry_of(seq: int, subject: str, data: bytes, headers: Mapping[str, str]) -> DeadLetter:
    """A DLQ entry from a stored message."""
    op, action = parse_job_subject(subject, DLQ_PREFIX)
    return DeadLetter(
        seq=seq,
        job_id=headers.get(H_JOB_ID, ""),
        op=op,
        action=action,
        error_code=headers.get(H_DLQ_ERROR_CODE, ""),
        error_status=_int(headers.get(H_DLQ_ERROR_STATUS)),
        error_detail=headers.get(H_DLQ_ERROR, ""),
        attempts=_int(headers.get(H_DLQ_ATTEMPTS)),
        enqueued_at=_float(headers.get(H_DLQ_ENQUEUED_AT)),
        failed_at=_float(headers.get(H_DLQ_FAILED_AT)),
        data=data,
        headers=dict(headers),
    )


class DeadLetterQueue:
    """Reading, replaying and purging `NEXUS_DLQ`."""

    def __init__(self, js: JetStreamContext, store: JobStore) -> None:
        self._js = js
        self._store = store

    async def entries(
        self, *, op: str | None = None, limit: int = 100, after_seq: int = 0
    ) -> list[DeadLetter]:
        """Entries oldest first, optionally for one op only.

        Raises:
            InvalidRequest: a malformed op.
            Unavailable: JetStream cannot be reached.
        """
        subject = f"{DLQ_PREFIX}.{op}.*" if op else f"{DLQ_PREFIX}.>"
        if op:
            dlq_subject(op, "x")  # validates the op token
        found: list[DeadLetter] = []
        seq = after_seq + 1
        async with translate_nats_errors("list dead letters"):
            while len(found) < limit:
                try:
                    msg = await self._js.get_msg(DLQ_STREAM, seq=seq, subject=subject, next=True)
                except jserr.NotFoundError:
                    break
                if msg.seq is None or msg.subject is None:
                    break
                found.append(entry_of(msg.seq, msg.subject, msg.data or b"", msg.headers or {}))
                seq = msg.seq + 1
        return found

    async def get(self, seq: int) -> DeadLetter:
        """The entry at `seq`.

        Raises:
            NotFound: no such entry (replayed, purged or expired).
            Unavailable: JetStream cannot be reached.
        """
        async with translate_nats_errors(f"dead letter {seq}"):
            msg = await self._js.get_msg(DLQ_STREAM, seq=seq)
        if msg.subject is None or not msg.subject.startswith(DLQ_PREFIX + "."):
            raise NotFound(f"dead letter {seq}: not found")
        return entry_of(seq, msg.subject, msg.data or b"", msg.headers or {})

    async def replay(self, seq: int, *, token: str | None = None) -> str:
        """Run a dead-lettered job again; its job id.

        The job is republished first and the entry deleted after, so a crash in between leaves
        a duplicate (harmless: a finished job's later deliveries are acked unrun), never a loss.
        `token` replaces the job's bearer token (the original may have expired meanwhile).

        Raises:
            NotFound: no such entry.
            Unavailable / UpstreamTimeout: JetStream cannot be reached.
        """
        entry = await self.get(seq)
        headers = entry.original_headers()
        # A new msg id: the original is still inside the dedup window when the job failed fast.
        headers[H_NATS_MSG_ID] = f"{entry.job_id}-replay-{seq}"
        if token:
            headers[H_AUTHORIZATION] = f"Bearer {token}"
        if entry.job_id:
            try:
                record, _ = await self._store.get(entry.job_id)
                await self._store.put(
                    advance(record, JobStatus.PENDING, now=time.time(), attempts=0)
                )
            except NotFound:
                pass  # its status expired; the runner writes a new one
        async with translate_nats_errors(f"replay {entry.op}.{entry.action}"):
            await self._js.publish(
                jobs_subject(entry.op, entry.action),
                entry.data,
                stream=JOBS_STREAM,
                headers=headers,
            )
            await self._js.delete_msg(DLQ_STREAM, seq)
        return entry.job_id

    async def replay_all(self, *, op: str | None = None, token: str | None = None) -> list[str]:
        """Replay every entry (of one op); the job ids, in order.

        Raises:
            Unavailable / UpstreamTimeout: JetStream cannot be reached.
        """
        replayed: list[str] = []
        after = 0
        while batch := await self.entries(op=op, limit=100, after_seq=after):
            for entry in batch:
                replayed.append(await self.replay(entry.seq, token=token))
            after = batch[-1].seq
        return replayed

    async def purge(self, *, op: str | None = None) -> int:
        """Delete every entry (of one op); how many were deleted.

        Raises:
            InvalidRequest: a malformed op.
            Unavailable: JetStream cannot be reached.
        """
        subject = f"{DLQ_PREFIX}.{op}.*" if op else None
        if op:
            dlq_subject(op, "x")
        async with translate_nats_errors("purge dead letters"):
            before = (await self._js.stream_info(DLQ_STREAM)).state.messages
            await self._js.purge_stream(DLQ_STREAM, subject=subject)
            after = (await self._js.stream_info(DLQ_STREAM)).state.messages
        return max(0, before - after)


def utc(ts: float) -> str:
    """An epoch time as ISO 8601 UTC, for listings."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds") if ts else "-"
