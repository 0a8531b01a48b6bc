"""Exactly-once effects: writes commit atomically with their effect records.

Two paths run a handler again after it may already have written to the system of record:

- a job: JetStream delivers it at least once; a worker dying after the handler wrote but
  before the ack gets it delivered again (`Nats-Msg-Id` dedup only covers the submission, and
  late acks are accepted: nats-server#4786);
- a request with `Idempotency-Key`: a worker dying after the handler wrote but before the
  reply was recorded leaves the key's claim to expire, and the retry runs again
  (`policies/idempotency.py`).

So inside an `effect_scope` — the job id, or the idempotency scope (subject, op, action, key)
— the handler's `ctx.services.records` is a `JournaledRecordStore`: the n-th write of scope S
is published as one JetStream *atomic batch* of two messages on the data bucket's stream,

    1. the write itself on `$KV.<bucket>.<key>` (with its compare-and-set condition), and
    2. an effect record on `nexus.sys.effects.S.n` with `Nats-Expected-Last-Subject-Sequence: 0`
       (a KV-style `create()`: it can exist only once),

so either both are stored or neither. A run that comes again finds record n when it reaches
its n-th write, skips the write and returns the first outcome (the write's revision is the
record's sequence minus one: a batch is stored contiguously). Two runs racing (an ack
timeout, or a claim that expired while the first still runs) cannot both commit: the second
batch fails on the record.

The handler must make its writes in the same order on every run; each record keeps the key
it covers, and a different key at the same position is refused rather than guessed. A scope
may carry the request's fingerprint: a record written for a different request under the same
scope (an idempotency key reused with another body after its claim expired) is
`422 idempotency_mismatch`, never a silent replay of someone else's outcome. Reads are not
journaled: a rerun reads the state its first run left behind.

The journal wraps the worker's record store, cache included: reads go through it unchanged,
and since journaled writes reach the KV around the cache, each one is then written through to
the cache (`WriteThrough`) with its revision. Before its batch is sent, a write seals its key
(`WriteThrough.seal`), as the cached store's own writes do: every L1 copy of the key is taken
back, so no read sees the old value after any read saw the new one, and the write-through (or
the resync after a failure) ends the seal. After a write skipped on a rerun, or one whose
batch may or may not have landed, the key's current head is written through (never the
rerun's own value), which also repairs a cache the first run could not update before it died;
when the head cannot be read, the key is fenced instead. A commit and its write-through (or a
resync) run to their end even when the handler is cancelled meanwhile (`WriteThrough.finish`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Final, Protocol, TypeVar

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from nexus_bus.bus.assets import again_if_missing
from nexus_bus.bus.metadata import check_publish_size
from nexus_bus.constants import (
    DATA_BUCKET,
    EFFECTS_PREFIX,
    H_KV_OPERATION,
    H_NATS_BATCH_COMMIT,
    H_NATS_BATCH_ID,
    H_NATS_BATCH_SEQUENCE,
    H_NATS_EXPECTED_LAST_SUBJECT_SEQ,
    H_NATS_TTL,
    KV_SUBJECT_PREFIX,
)
from nexus_bus.errors import (
    Conflict,
    IdempotencyMismatch,
    InternalError,
    InvalidRequest,
    NexusError,
    Unavailable,
)
from nexus_bus.schemas.common import KEY_PATTERN
from nexus_bus.store import Record, RecordStore, translate_nats_errors

_KEY: Final = re.compile(KEY_PATTERN)
_SCOPE: Final = re.compile(r"[A-Za-z0-9_-]{1,128}(\.[A-Za-z0-9_-]{1,128})?")
_WRONG_LAST_SEQUENCE: Final = 10071
_DELETED: Final = frozenset({"DEL", "PURGE"})
T = TypeVar("T")


class EffectRecord(msgspec.Struct, frozen=True, kw_only=True):
    """What one journaled write did, stored next to it."""

    kind: str  # "put" or "delete"
    key: str
    existed: bool = True  # for a delete: whether the key had a live value
    request: str = ""  # the fingerprint of the request that wrote it ("": not checked)


_encoder: Final = msgspec.json.Encoder()
_decoder: Final = msgspec.json.Decoder(EffectRecord)


class WriteThrough(Protocol):
    """Keeps a cache in front of the records coherent with writes made around it."""

    async def seal(self, key: str) -> bool:
        """Before a write of `key` is sent: take back every in-process copy of it and hand out
        none until the write-through (`sealed=True`) or one lease. Whether it sealed (pass it
        on). Never raises."""
        ...

    async def unseal(self, key: str) -> None:
        """End the seal of a write that did not happen (the entry is as good as it was).
        Never raises."""
        ...

    async def written(
        self, key: str, value: bytes | None, revision: int, *, sealed: bool = False
    ) -> None:
        """`key` holds `value` (None: deleted) as of `revision` (`sealed`: ends this write's
        seal). Never raises."""
        ...

    async def finish(self, work: Coroutine[Any, Any, T]) -> T:
        """Run `work`, a write and its write-through, to its end even when the caller is
        cancelled: cancelling only stops the caller waiting for it.

        Raises:
            Whatever `work` raises.
        """
        ...

    async def fenced(self, key: str, revision: int, *, sealed: bool = False) -> None:
        """`key` was written at `revision` (0: at one nobody can tell), and what it holds now
        cannot be read: nothing older may be served or filled back (`sealed`: as for
        `written`). Never raises."""
        ...


@dataclass(slots=True)
class _Scope:
    scope_id: str
    request: str
    writes: int = 0


# Each job attempt and each request runs in its own asyncio task, so a context variable scopes
# the journal to that run without threading a parameter through the dispatcher and handler.
_scope: ContextVar[_Scope | None] = ContextVar("nexus_effect_scope", default=None)


@contextmanager
def effect_scope(scope_id: str, *, request: str = "") -> Iterator[None]:
    """Journal every write made through a `JournaledRecordStore` in this block under `scope_id`.

    Args:
        scope_id: what makes two runs the same: a job id, or `idem.<digest>` for an
            idempotency key; one or two subject tokens.
        request: the fingerprint of the request; a record of another request under the same
            scope is refused (`IdempotencyMismatch`). Empty: not checked.

    Raises:
        ValueError: a scope id that is not one or two subject tokens.
    """
    if _SCOPE.fullmatch(scope_id) is None:
        raise ValueError(f"invalid effect scope {scope_id[:80]!r}")
    token = _scope.set(_Scope(scope_id, request))
    try:
        yield
    finally:
        _scope.reset(token)


def effect_subject(scope_id: str, ordinal: int) -> str:
    """The subject of the effect record of a scope's `ordinal`-th write."""
    return f"{EFFECTS_PREFIX}.{scope_id}.{ordinal}"


class JournaledRecordStore:
    """A `RecordStore` whose writes inside `effect_scope()` are applied once per scope.

    Outside a scope every call goes to the wrapped store unchanged.

    Args:
        inner: the worker's record store (the cached one: reads go through it).
        nc: the connection the batches are published on.
        stream: the data bucket's stream (`ensure_effect_records`).
        bucket: the data bucket.
        record_ttl_s: how long effect records are kept: as long as a rerun may come.
        timeout_s: how long a batch's confirmation is awaited.
        write_through: keeps the cache in front of the records coherent.
    """

    def __init__(
        self,
        inner: RecordStore,
        nc: Client,
        *,
        stream: str,
        bucket: str = DATA_BUCKET,
        record_ttl_s: float,
        timeout_s: float = 5.0,
        write_through: WriteThrough | None = None,
    ) -> None:
        self._inner = inner
        self._write_through = write_through
        self._nc = nc
        self._js: JetStreamContext = nc.jetstream(timeout=timeout_s)
        self._stream = stream
        self._bucket = bucket
        self._ttl = f"{max(1, int(record_ttl_s))}s"
        self._timeout = timeout_s

    async def get(self, key: str) -> Record:
        """The current record of `key` (not journaled).

        Raises:
            NotFound: no live value.
            Unavailable: the store cannot be reached.
        """
        return await self._inner.get(key)

    async def keys(self, prefix: str = "", limit: int = 100) -> list[str]:
        """Live keys starting with `prefix` (not journaled).

        Raises:
            Unavailable: the store cannot be reached.
        """
        return await self._inner.keys(prefix, limit)

    async def put(self, key: str, value: bytes, *, expected_revision: int | None = None) -> int:
        """Write `value`; inside a scope, once per scope however often it runs.

        Raises:
            Conflict: the key is not at `expected_revision` (or exists, for 0).
            InternalError: a rerun wrote a different key at this position.
            IdempotencyMismatch: another request wrote at this position under this scope.
            PayloadTooLarge: the value exceeds the server's max_payload with its headers.
            Unavailable / UpstreamTimeout: JetStream cannot be reached.
        """
        scope = _scope.get()
        if scope is None:
            return await self._inner.put(key, value, expected_revision=expected_revision)
        subject = self._key_subject(key)
        record_subject = self._next_record(scope)
        done = await self._recorded(record_subject, "put", key, scope.request)
        sealed = False
        if done is None:
            record = EffectRecord(kind="put", key=key, request=scope.request)
            sealed = await self._seal(key)
            try:
                headers: dict[str, str] = {}
                if expected_revision is not None:
                    last = await self._expected_for(subject, key, expected_revision)
                    headers[H_NATS_EXPECTED_LAST_SUBJECT_SEQ] = str(last)
                return await self._finish(
                    self._commit_through(subject, value, headers, record_subject, record, sealed)
                )
            except Conflict:
                # An earlier run's batch may have landed late (its confirmation was lost):
                # then the key moved because of this very write, and it is done.
                done = await self._recorded(record_subject, "put", key, scope.request)
                if done is None:
                    await self._unseal(key, sealed)
                    raise
        await self._finish(self._resync(key, done[1] - 1, sealed=sealed))
        return done[1] - 1

    async def delete(self, key: str) -> bool:
        """Delete `key`; inside a scope, once per scope. Whether it had a live value.

        Raises:
            InternalError: a rerun wrote a different key at this position.
            IdempotencyMismatch: another request wrote at this position under this scope.
            Unavailable / UpstreamTimeout: JetStream cannot be reached.
        """
        scope = _scope.get()
        if scope is None:
            return await self._inner.delete(key)
        subject = self._key_subject(key)
        record_subject = self._next_record(scope)
        done = await self._recorded(record_subject, "delete", key, scope.request)
        sealed = False
        if done is None:
            existed = (await self._last(subject)) is not None
            record = EffectRecord(kind="delete", key=key, existed=existed, request=scope.request)
            headers = {H_KV_OPERATION: "DEL"}
            sealed = await self._seal(key)
            try:
                await self._finish(
                    self._commit_through(subject, None, headers, record_subject, record, sealed)
                )
                return existed
            except Conflict:  # without a CAS, only the record can refuse: a twin committed first
                done = await self._recorded(record_subject, "delete", key, scope.request)
                if done is None:
                    await self._unseal(key, sealed)
                    raise
        await self._finish(self._resync(key, done[1] - 1, sealed=sealed))
        return done[0].existed

    async def _finish(self, work: Coroutine[Any, Any, T]) -> T:
        """Run `work`, a commit or a resync and its write-through, to its end even when the
        caller is cancelled (`Cache.finish`, which the cache's `close` waits for).

        Handlers are cancelled (the worker's deadline reaper, a dispatch timeout, a drain);
        one cancelled after its batch was stored, but before the write-through, left Redis
        serving the value the write replaced for a whole TTL, and a request that is never
        retried has no rerun to repair it.
        """
        if self._write_through is None:
            return await work  # no cache to keep coherent: the next run reads the record
        return await self._write_through.finish(work)

    async def _seal(self, key: str) -> bool:
        return self._write_through is not None and await self._write_through.seal(key)

    async def _unseal(self, key: str, sealed: bool) -> None:
        if sealed and self._write_through is not None:
            await self._write_through.unseal(key)

    async def _commit_through(
        self,
        subject: str,
        value: bytes | None,
        headers: dict[str, str],
        record_subject: str,
        record: EffectRecord,
        sealed: bool,
    ) -> int:
        """Commit the write (`value` None: a delete) and write it through; its revision.

        Raises:
            As `_commit`.
        """
        seq = await self._commit(subject, value or b"", headers, record_subject, record, sealed)
        if self._write_through is not None:
            await self._write_through.written(record.key, value, seq - 1, sealed=sealed)
        return seq - 1

    async def _resync(self, key: str, revision: int, *, sealed: bool = False) -> None:
        """After a skipped write (or an unconfirmed one), write the key's current head through.

        The first run may have died before its own write-through. Its write may also be
        gone already (a later write replaced it in a one-revision bucket), so the head is
        what the cache must hold: the skipped write's value or something newer. When the
        head cannot be read, the key is fenced at the write's `revision` (0: unknown, which
        fences above every revision): neither the entry the write replaced nor a fill of it
        in flight may be served after the write, and evicting would allow the fill.

        Raises:
            Unavailable / UpstreamTimeout: the head cannot be read (the key is fenced).
        """
        if self._write_through is None:
            return
        subject = self._key_subject(key)
        try:
            async with translate_nats_errors(f"read {key}"):
                msg = await self._js.get_last_msg(self._stream, subject)
        except LookupError:
            await self._write_through.written(key, None, revision, sealed=sealed)
            return
        except NexusError:
            await self._write_through.fenced(key, revision, sealed=sealed)
            raise
        deleted = (msg.headers or {}).get(H_KV_OPERATION) in _DELETED
        value = None if deleted else (msg.data or b"")
        await self._write_through.written(key, value, msg.seq or revision, sealed=sealed)

    def _key_subject(self, key: str) -> str:
        if len(key) > 256 or _KEY.fullmatch(key) is None:
            raise InvalidRequest(f"invalid key {key[:80]!r}")
        return f"{KV_SUBJECT_PREFIX}.{self._bucket}.{key}"

    @staticmethod
    def _next_record(scope: _Scope) -> str:
        scope.writes += 1
        return effect_subject(scope.scope_id, scope.writes)

    async def _last(self, subject: str) -> int | None:
        """The sequence of the live value on `subject`, or None when absent or deleted."""
        try:
            async with translate_nats_errors(f"read {subject}"):
                msg = await self._js.get_last_msg(self._stream, subject)
        except LookupError:
            return None
        if (msg.headers or {}).get(H_KV_OPERATION) in _DELETED:
            return None
        return msg.seq

    async def _expected_for(self, subject: str, key: str, expected_revision: int) -> int:
        """The last-subject-sequence condition for a compare-and-set write.

        Like KV `create()`, revision 0 also accepts a key whose last entry is a delete.
        """
        if expected_revision != 0:
            return expected_revision
        try:
            async with translate_nats_errors(f"read {subject}"):
                msg = await self._js.get_last_msg(self._stream, subject)
        except LookupError:
            return 0
        if (msg.headers or {}).get(H_KV_OPERATION) in _DELETED and msg.seq is not None:
            return msg.seq
        raise Conflict(f"put {key}: key already exists")

    async def _recorded(
        self, record_subject: str, kind: str, key: str, request: str
    ) -> tuple[EffectRecord, int] | None:
        """The effect record at `record_subject` and its sequence, when that write happened.

        Read from the stream leader (not a direct get), so a follower lagging behind cannot
        hide a committed record.

        Raises:
            IdempotencyMismatch: the record was written for another request (`request`).
            InternalError: unreadable, or for another write (the handler is not deterministic).
        """
        try:
            async with translate_nats_errors(f"read {record_subject}"):
                msg = await self._js.get_last_msg(self._stream, record_subject)
        except LookupError:
            return None
        try:
            record = _decoder.decode(msg.data or b"")
        except msgspec.MsgspecError:
            raise InternalError(f"unreadable effect record {record_subject}") from None
        if request and record.request and record.request != request:
            raise IdempotencyMismatch("this Idempotency-Key was used with a different request")
        if record.kind != kind or record.key != key or msg.seq is None:
            raise InternalError(
                f"handler is not deterministic: write {record_subject.rsplit('.', 1)[-1]} was "
                f"{record.kind} {record.key!r} before, {kind} {key!r} now"
            )
        return record, msg.seq

    async def _commit(
        self,
        subject: str,
        value: bytes,
        headers: dict[str, str],
        record_subject: str,
        record: EffectRecord,
        sealed: bool = False,
    ) -> int:
        """Publish the write and its effect record as one atomic batch; the record's sequence.
        A write that may have landed is resynced (ending its seal, `sealed`).

        Raises:
            Conflict: the write's compare-and-set failed, or the record exists already.
            PayloadTooLarge: the value exceeds the server's max_payload with the batch
                headers; nothing was sent.
            Unavailable / UpstreamTimeout: JetStream did not confirm; the batch may or may not
                be stored, which the next attempt finds out from the record.
        """
        write_headers = {**headers, H_NATS_BATCH_ID: "0" * 32, H_NATS_BATCH_SEQUENCE: "1"}
        # A core publish: nats-py adds no header of its own, but checks the value alone.
        check_publish_size(f"write {record.key}", value, write_headers, self._nc.max_payload)

        async def send() -> Msg:
            batch_id = os.urandom(16).hex()  # one per batch sent
            record_headers = {
                H_NATS_BATCH_ID: batch_id,
                H_NATS_BATCH_SEQUENCE: "2",
                H_NATS_BATCH_COMMIT: "1",
                H_NATS_EXPECTED_LAST_SUBJECT_SEQ: "0",
                H_NATS_TTL: self._ttl,
            }
            async with translate_nats_errors(f"write {record.key}"):
                await self._nc.publish(
                    subject, value, headers={**write_headers, H_NATS_BATCH_ID: batch_id}
                )
                return await self._nc.request(
                    record_subject,
                    _encoder.encode(record),
                    timeout=self._timeout,
                    headers=record_headers,
                )

        try:
            # No stream took the batch (the data bucket is gone since start, bus/assets.py):
            # nothing was stored, so it is sent once more after the bucket is back.
            reply = await again_if_missing(self._nc, send)
        except NexusError:
            # The batch may have landed all the same: the cache must not keep serving the
            # value it replaced (a rerun repairs it too, but there may be none).
            with contextlib.suppress(NexusError):
                await self._resync(record.key, 0, sealed=sealed)
            raise
        doc: dict[str, Any] = json.loads(reply.data or b"{}")
        error = doc.get("error")
        if not error:
            return int(doc["seq"])
        if error.get("err_code") == _WRONG_LAST_SEQUENCE:
            # The record exists (a twin attempt committed first) or the write's CAS failed;
            # the caller tells them apart.
            raise Conflict(f"put {record.key}: revision mismatch")
        raise Unavailable(
            f"write {record.key}: JetStream refused the batch: {error.get('description')}"
        )
