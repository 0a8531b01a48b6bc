"""The system of record for `data`: a JetStream KV bucket behind the `RecordStore` seam.

nats exceptions are translated here, once; handlers only see NexusErrors.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final, Protocol, TypeVar

import msgspec
import nats.errors
import nats.js.errors as jserr
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.kv import KeyValue

from nexus_bus.bus.assets import again_if_missing
from nexus_bus.bus.metadata import check_publish_size
from nexus_bus.bus.nats_errors import INVALID_SUBJECT, map_nats_error
from nexus_bus.constants import DATA_BUCKET, H_KV_OPERATION, KV_STREAM_PREFIX, KV_SUBJECT_PREFIX
from nexus_bus.errors import (
    Conflict,
    InternalError,
    InvalidRequest,
    NotFound,
)
from nexus_bus.observability.tracing import TRACING, SpanKind
from nexus_bus.schemas.common import KEY_PATTERN, LIST_PREFIX_PATTERN

T = TypeVar("T")

# What can begin a KV key: whole tokens, each followed by one dot, then maybe part of one.
_KEY_PREFIX: Final = re.compile(LIST_PREFIX_PATTERN)
_KEY: Final = re.compile(KEY_PATTERN)
_DELETE_OPERATIONS: Final = frozenset({"DEL", "PURGE"})
# A listing's consumer is deleted when it ends; this bounds it only when that delete is lost.
_LIST_INACTIVE_S: Final = 5.0
# nats-server names at most this many subjects in one stream info answer (JSMaxSubjectDetails).
_MAX_SUBJECT_DETAILS: Final = 100_000
# Subjects per listing consumer read by name, and the fewest read at once.
_MAX_FILTERS: Final = 256
_MIN_BATCH: Final = 16
_MAX_FILTER_BYTES: Final = 16 * 1024


@dataclass(frozen=True, slots=True)
class Record:
    """A stored value (encoded JSON bytes) at a revision.

    Read it typed with `decode(Type)` (a msgspec Struct, `int`, `list[str]`...) or as plain
    JSON types with `json()`; `value` stays the raw bytes.
    """

    key: str
    value: bytes
    revision: int

    def decode(self, type_: type[T]) -> T:
        """The value decoded and validated as `type_`.

        Raises:
            InternalError: the stored value is not JSON or does not match `type_`: the
                data was written by something else, not by this caller's request.
        """
        try:
            value: T = msgspec.json.decode(self.value, type=type_)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            name = getattr(type_, "__name__", str(type_))
            raise InternalError(f"record {self.key} does not decode as {name}: {exc}") from None
        return value

    def json(self) -> Any:
        """The value as plain JSON types (dict, list, str, int, float, bool or None).

        Raises:
            InternalError: the stored value is not JSON.
        """
        return self.decode(Any)


class RecordStore(Protocol):
    """Key/value records with revisions and compare-and-set."""

    async def get(self, key: str) -> Record:
        """The current record. Raises NotFound."""
        ...

    async def put(self, key: str, value: bytes, *, expected_revision: int | None = None) -> int:
        """Write; with `expected_revision` only if current (0: only if absent). Raises Conflict."""
        ...

    async def delete(self, key: str) -> bool:
        """Delete; whether a live value existed."""
        ...

    async def keys(self, prefix: str = "", limit: int = 100) -> list[str]:
        """Live keys starting with `prefix`, sorted, at most `limit`."""
        ...


@dataclass(frozen=True, slots=True)
class Deleted:
    """What a delete did.

    Attributes:
        existed: whether the key had a live value.
        revision: the revision the key is deleted at: its delete marker's, the one this
            delete wrote or the one already there; 0 when the key was never written.
    """

    existed: bool
    revision: int


class VersionedRecordStore(RecordStore, Protocol):
    """A `RecordStore` whose deletes say their revision, as the JetStream KV's do.

    A cache in front of it leaves a tombstone at that revision, which outranks every fill
    of the value it deleted; reading the revision back after the delete would be a second
    step that can fail, after the delete has happened (docs/cache.md).
    """

    async def delete_versioned(self, key: str) -> Deleted:
        """Delete; whether a live value existed, and the delete's revision."""
        ...


@asynccontextmanager
async def translate_nats_errors(
    what: str, *, input_errors: Collection[int] = ()
) -> AsyncIterator[None]:
    """Map nats-py / JetStream exceptions to NexusErrors (the adapter's one boundary),
    in a client span named by the call's verb when tracing is on (never by its key).

    `input_errors`: JetStream err_codes that mean the caller's input was malformed on this
    call (400, see `map_nats_error`)."""
    verb = what.split(" ", 1)[0]
    with TRACING.step(f"jetstream {verb}", kind=SpanKind.CLIENT, attributes=_JETSTREAM_SPAN):
        async with _translated(what, input_errors):
            yield


_JETSTREAM_SPAN: Final = {"db.system.name": "nats_jetstream"}


@asynccontextmanager
async def _translated(what: str, input_errors: Collection[int]) -> AsyncIterator[None]:
    try:
        yield
    except (nats.errors.Error, OSError, TimeoutError) as exc:  # the NATS adapter's mapping
        raise map_nats_error(exc, what, jetstream=True, input_errors=input_errors) from exc


class KeyValueRecordStore:
    """`VersionedRecordStore` on a JetStream KV bucket."""

    def __init__(
        self,
        kv: KeyValue,
        js: JetStreamContext,
        *,
        nc: Client | None = None,
        bucket: str = DATA_BUCKET,
    ) -> None:
        """Args:
        js: the context `kv` came from (for the stream's subjects, see `keys`).
        nc: the connection under `js`, whose max_payload bounds a compare-and-set write with
            its header (`check_publish_size`); None leaves only nats-py's check of the value.
        bucket: the name of `kv` (deletes address its stream and subjects themselves).
        """
        self._kv = kv
        self._js = js
        self._nc = nc
        self._stream = f"{KV_STREAM_PREFIX}{bucket}"
        self._prefix = f"{KV_SUBJECT_PREFIX}.{bucket}."

    async def get(self, key: str) -> Record:
        """The current record of `key`.

        Raises:
            NotFound: no live value.
            Unavailable: JetStream cannot be reached.
        """
        async with translate_nats_errors(f"get {key}"):
            entry = await self._kv.get(key)
        if entry.value is None or entry.revision is None:
            raise NotFound(f"get {key}: not found")
        return Record(key, entry.value, entry.revision)

    async def put(self, key: str, value: bytes, *, expected_revision: int | None = None) -> int:
        """Write `value`; compare-and-set when `expected_revision` is given.

        Raises:
            Conflict: the key is not at `expected_revision` (or exists, for 0).
            PayloadTooLarge: the value exceeds the server's max_payload (with the header a
                compare-and-set adds).
            Unavailable: JetStream cannot be reached.
        """
        if expected_revision is not None and self._nc is not None:
            # nats-py adds the expected revision as a header; a plain put sends none, and then
            # nats-py's own check of the value is the server's.
            check_publish_size(f"put {key}", value, None, self._nc.max_payload, jetstream=True)
        # A bucket gone since start (bus/assets.py) is created again, and the write retried.
        return await again_if_missing(self._nc, lambda: self._put(key, value, expected_revision))

    async def _put(self, key: str, value: bytes, expected_revision: int | None) -> int:
        async with translate_nats_errors(f"put {key}"):
            if expected_revision is None:
                return await self._kv.put(key, value)
            if expected_revision == 0:
                try:
                    return await self._kv.create(key, value)
                except jserr.KeyWrongLastSequenceError as exc:
                    raise Conflict(f"put {key}: key already exists") from exc
            return await self._kv.update(key, value, last=expected_revision)

    async def delete(self, key: str) -> bool:
        """Delete `key`; whether it had a live value.

        Raises:
            InvalidRequest: an invalid key.
            Unavailable: JetStream cannot be reached.
        """
        return (await self.delete_versioned(key)).existed

    async def delete_versioned(self, key: str) -> Deleted:
        """Delete `key`: whether it had a live value, and the revision of its delete marker.

        The marker is published here as the KV's own delete does (a message on the key's
        subject with `KV-Operation: DEL`), so its sequence comes back in the PubAck, which
        `KeyValue.delete` drops. The key's head is read from the stream leader (not a direct
        get): a lagging follower could call a live key deleted, and the delete would skip it.
        A key that is not live gets no new marker; its revision is the marker already there.

        Raises:
            InvalidRequest: an invalid key.
            Unavailable: JetStream cannot be reached.
        """
        if len(key) > 256 or _KEY.fullmatch(key) is None:
            raise InvalidRequest(f"invalid key {key[:64]!r}")
        subject = self._prefix + key
        async with translate_nats_errors(f"delete {key}"):
            try:
                head = await self._js.get_msg(self._stream, subject=subject)
            except jserr.NotFoundError:
                return Deleted(existed=False, revision=0)
            if head.headers and head.headers.get(H_KV_OPERATION) in _DELETE_OPERATIONS:
                return Deleted(existed=False, revision=head.seq or 0)
            ack = await self._js.publish(subject, headers={H_KV_OPERATION: "DEL"})
        return Deleted(existed=True, revision=ack.seq)

    async def keys(self, prefix: str = "", limit: int = 100) -> list[str]:
        """Live keys starting with `prefix`, in lexical order.

        The stream names the subjects under the prefix's whole tokens (`users.4` under
        `users.>`), live keys and tombstones alike; those starting with the prefix are the
        candidates. When there are many more of those subjects than `limit`, the first
        candidates are read by subject, in batches, until `limit` of them are live: a listing
        of 100 keys costs about 100 reads, not one per key in the bucket. Otherwise (or past
        the 100,000 subjects the server names at once) every entry under the tokens is read.
        Either way an ordered consumer delivers each key's last entry (headers only),
        tombstones included, and the snapshot ends at the entry nothing is pending after.
        When the consumer reports nothing pending at the start, the server may already have
        sent every entry (still on their way): it is empty only if it delivered nothing.

        The consumer is deleted when the listing ends: left to its inactivity threshold,
        every listing would hold one on the server for that long, and a client listing a
        few times a second would fill the stream's consumer limit.

        A prefix no key can start with (an empty token, a character keys cannot hold) lists
        nothing without asking: as a filter it would be a malformed subject (`a..>`), or a
        wildcard. Should the server still refuse a filter as a subject, that is the prefix's
        fault: 400, not 503.
        """
        if not _KEY_PREFIX.fullmatch(prefix):
            return []
        return await again_if_missing(self._nc, lambda: self._keys(prefix, limit))

    async def _keys(self, prefix: str, limit: int) -> list[str]:
        pattern = f"{prefix[: prefix.rfind('.') + 1]}>"  # its whole tokens, then any
        async with translate_nats_errors("list keys", input_errors=(INVALID_SUBJECT,)):
            subjects = await self._subjects(pattern)
            if subjects is not None:  # None: more than the server names at once
                start = len(self._prefix)
                candidates = sorted(k for s in subjects if (k := s[start:]).startswith(prefix))
                if not candidates:
                    return []
                # Unless reading every entry under the tokens costs about what reading the
                # first `limit` candidates one by one would.
                if 2 * min(limit, len(candidates)) < len(subjects):
                    return await self._first_live(candidates, limit)
            return sorted(await self._read([self._prefix + pattern], prefix))[:limit]

    async def _subjects(self, pattern: str) -> list[str] | None:
        """The subjects holding an entry (live or tombstone) for a key `pattern`, as the
        stream names them; None when there are more than one answer of the server names."""
        info = await self._js.stream_info(self._stream, subjects_filter=self._prefix + pattern)
        subjects = info.state.subjects or {}
        return None if len(subjects) >= _MAX_SUBJECT_DETAILS else list(subjects)

    async def _first_live(self, candidates: list[str], limit: int) -> list[str]:
        """The first `limit` live keys of `candidates` (sorted keys that hold an entry), read
        in batches by their subjects: a batch the size of what is still missing, more when
        tombstones take its place."""
        found: list[str] = []
        at = 0
        while len(found) < limit and at < len(candidates):
            size = min(_MAX_FILTERS, max(limit - len(found), _MIN_BATCH))
            batch: list[str] = []
            room = _MAX_FILTER_BYTES  # the consumer's request must fit the server's max_payload
            for key in candidates[at : at + size]:
                room -= len(self._prefix) + len(key) + 3  # quoted, and a comma
                if batch and room < 0:
                    break
                batch.append(key)
            at += len(batch)
            live = set(await self._read([self._prefix + key for key in batch], ""))
            found.extend(key for key in batch if key in live)
        return found[:limit]

    async def _read(self, filters: list[str], prefix: str) -> list[str]:
        """The live keys starting with `prefix` among the last entries of `filters`
        (subjects or a wildcard), read with an ordered consumer that is deleted after."""
        config = ConsumerConfig(filter_subjects=filters) if len(filters) > 1 else None
        sub = await self._js.subscribe(
            filters[0],
            stream=self._stream,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
            headers_only=True,
            inactive_threshold=_LIST_INACTIVE_S,  # only if the delete below is lost
            config=config,
        )
        consumer: str | None = None
        try:
            info = await sub.consumer_info()
            consumer = info.name
            # Nothing pending may mean that the server has sent every entry already (still
            # on their way here), or that there is none: then it has delivered nothing.
            delivered = info.delivered.consumer_seq if info.delivered else 0
            if not info.num_pending and not delivered and not sub.pending_msgs:
                return []
            return await self._snapshot(sub, prefix)
        finally:
            await self._remove(sub, consumer)

    async def _snapshot(self, sub: JetStreamContext.PushSubscription, prefix: str) -> list[str]:
        """The live keys starting with `prefix` among the entries `sub` delivers, up to the
        one nothing is pending after."""
        found: list[str] = []
        start = len(self._prefix)
        while True:
            msg = await sub.next_msg(timeout=None)
            operation = msg.headers.get(H_KV_OPERATION) if msg.headers else None
            key = msg.subject[start:]
            if operation not in _DELETE_OPERATIONS and key.startswith(prefix):
                found.append(key)
            if msg.metadata.num_pending == 0:  # the snapshot's last entry
                return found

    async def _remove(self, sub: JetStreamContext.PushSubscription, consumer: str | None) -> None:
        """Unsubscribe and delete the listing's consumer. Should the ordered consumer have
        been reset meanwhile, its new one is left to the inactivity threshold."""
        with contextlib.suppress(nats.errors.Error, OSError, TimeoutError):
            await sub.unsubscribe()
            if consumer is not None:
                await self._js.delete_consumer(self._stream, consumer)
