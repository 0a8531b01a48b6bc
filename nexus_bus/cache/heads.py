"""The head of a key in the JetStream KV system of record: its value, or its absence, with
the revision of either.

`RecordStore.get` says only "not found" for a deleted key; the cache needs the revision of
the delete marker too, so that a tombstone outranks every fill of the value it deleted.
Heads are read from the stream leader (`STREAM.MSG.GET`, not direct get): a follower or
mirror may still hold a value older than a write that already returned (docs/cache.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Protocol

import nats.js.errors as jserr
from nats.js import JetStreamContext

from nexus_bus.constants import DATA_BUCKET, H_KV_OPERATION, KV_STREAM_PREFIX, KV_SUBJECT_PREFIX
from nexus_bus.errors import InvalidRequest
from nexus_bus.schemas.common import KEY_PATTERN
from nexus_bus.store import Record, translate_nats_errors

_KEY: Final = re.compile(KEY_PATTERN)
_DELETE_OPERATIONS: Final = frozenset({"DEL", "PURGE"})


@dataclass(frozen=True, slots=True)
class Absent:
    """`key` has no live value; `revision` is its delete marker's (0: never written)."""

    key: str
    revision: int


Head = Record | Absent


class HeadReader(Protocol):
    """Reads the latest state of a key, live or deleted, with its revision."""

    async def head(self, key: str) -> Head:
        """The key's current record, or its absence. Raises InvalidRequest, Unavailable."""
        ...


def check_key(key: str) -> None:
    """Refuse keys the KV cannot hold before they reach a subject.

    Raises:
        InvalidRequest: the key does not match the KV key rules.
    """
    if len(key) > 256 or not _KEY.fullmatch(key):
        raise InvalidRequest(f"invalid key {key[:64]!r}")


class KeyValueHeads:
    """`HeadReader` on a KV bucket's stream.

    Args:
        js: the JetStream context.
        bucket: the KV bucket.
        direct: read with direct get (any replica); faster, but only safe with one replica.
    """

    def __init__(self, js: JetStreamContext, bucket: str = DATA_BUCKET, *, direct: bool = False):
        self._js = js
        self._stream = f"{KV_STREAM_PREFIX}{bucket}"
        self._prefix = f"{KV_SUBJECT_PREFIX}.{bucket}."
        self._direct = direct

    async def head(self, key: str) -> Head:
        """The current record of `key`, or `Absent` with the delete marker's revision.

        Raises:
            InvalidRequest: an invalid key.
            Unavailable: JetStream cannot be reached.
            UpstreamTimeout: JetStream did not answer in time.
        """
        check_key(key)
        async with translate_nats_errors(f"get {key}"):
            try:
                msg = await self._js.get_msg(
                    self._stream, subject=self._prefix + key, direct=self._direct
                )
            except jserr.NotFoundError:
                return Absent(key, 0)
        seq = msg.seq or 0
        if msg.headers and msg.headers.get(H_KV_OPERATION) in _DELETE_OPERATIONS:
            return Absent(key, seq)
        return Record(key, msg.data or b"", seq)
