"""`data.*` records through the cache: a `RecordStore` in front of the JetStream KV store.

- `get` is read-through: one loader per key across workers, misses read the KV head (value
  or delete marker, with its revision), not-found is cached for the short negative TTL.
- `put` is write-through: after the KV accepted the write, its revision is written to Redis
  with the revision compare-and-set, so no older fill can replace it.
- `delete` writes a tombstone carrying the delete marker's revision, which the KV's delete
  itself returns, so a fill of the value it deleted that was already in flight cannot bring
  it back.

Before either reaches the KV, the key is sealed (`Cache.seal`): every L1 copy is taken back
and none is handed out for a lease, so no read sees the old value after any read saw the new.
The KV write and its write-through then run as one task their caller cannot cancel
(`Cache.finish`).
After `put` or `delete` returns, every `get` in any worker sees that write or a newer one:
either the entry was written through, or a peer fenced it, or every worker holds a floor for
it (see `core.py`). This store must be the outermost wrapper of the records: a wrapper that
writes to the KV around it would leave the cache behind.
"""

from __future__ import annotations

from nexus_bus.cache.core import Cache
from nexus_bus.cache.entries import FIRST_REVISION, UNKNOWN_REVISION, UNVERSIONED, Entry, Kind
from nexus_bus.cache.heads import Absent, Head, HeadReader, check_key
from nexus_bus.cache.policy import CachePolicy
from nexus_bus.constants import CACHE_DATA_NAMESPACE
from nexus_bus.errors import Conflict, NotFound
from nexus_bus.store import Record, VersionedRecordStore


def entry_of(head: Head) -> Entry:
    """The cache entry mirroring a KV head."""
    if isinstance(head, Absent):
        return Entry.absent(head.revision)
    return Entry.of(head.value, head.revision)


class CachedRecordStore:
    """`RecordStore` with read-through gets and write-through puts and deletes.

    Args:
        inner: the system of record's store (writes and listing go there); its deletes say
            their revision.
        heads: reads the KV head of a key (loads on a miss, revisions after deletes).
        cache: the cache.
        policy: TTLs and stampede behaviour for `data` entries.
        namespace: the cache namespace (and `cache` metric label).
    """

    def __init__(
        self,
        inner: VersionedRecordStore,
        heads: HeadReader,
        cache: Cache,
        policy: CachePolicy,
        *,
        namespace: str = CACHE_DATA_NAMESPACE,
    ) -> None:
        self._inner = inner
        self._heads = heads
        self._cache = cache
        self._policy = policy
        self._namespace = namespace

    async def get(self, key: str) -> Record:
        """The current record of `key`, from the cache when it holds it.

        Raises:
            NotFound: no live value.
            InvalidRequest: an invalid key.
            Unavailable: the KV cannot be reached (a cache failure never raises).
        """
        check_key(key)

        async def load() -> Entry:
            return entry_of(await self._heads.head(key))

        entry = await self._cache.fetch(self._namespace, key, load, self._policy)
        if entry.kind is not Kind.VALUE:
            raise NotFound(f"get {key}: not found")
        return Record(key, entry.value, entry.revision)

    async def put(self, key: str, value: bytes, *, expected_revision: int | None = None) -> int:
        """Write `value` to the KV, then through to the cache.

        Raises:
            Conflict: `expected_revision` does not match.
            InvalidRequest: an invalid key.
            Unavailable / UpstreamTimeout: the KV cannot be reached.
        """
        check_key(key)
        sealed = await self._cache.seal(self._namespace, key, self._policy)  # L1s let go
        # From here on, cancelling the caller does not stop the write: a KV write left
        # without its write-through would leave the old value served for a whole TTL.
        return await self._cache.finish(self._put(key, value, expected_revision, sealed))

    async def _put(
        self, key: str, value: bytes, expected_revision: int | None, sealed: bool
    ) -> int:
        try:
            revision = await self._inner.put(key, value, expected_revision=expected_revision)
        except Conflict:
            if sealed:  # nothing was written: end the seal with the entry as it is
                await self._write_head(key, sealed=True, written=False)
            raise
        except Exception:
            # The write may have landed anyway (a timeout after the KV stored it): make sure
            # the cache does not keep serving the value it replaced.
            await self._write_head(key, sealed=sealed)
            raise
        entry = Entry.of(value, revision)
        await self._cache.write(self._namespace, key, entry, self._policy, sealed=sealed)
        return revision

    async def delete(self, key: str) -> bool:
        """Delete `key` in the KV, then leave a tombstone with the delete marker's revision.

        Raises:
            InvalidRequest: an invalid key.
            Unavailable / UpstreamTimeout: the KV cannot be reached.
        """
        check_key(key)
        sealed = await self._cache.seal(self._namespace, key, self._policy)
        return await self._cache.finish(self._delete(key, sealed))  # as `put`

    async def _delete(self, key: str, sealed: bool) -> bool:
        try:
            deleted = await self._inner.delete_versioned(key)
        except Exception:
            # The delete may have landed anyway: as for `put`.
            await self._write_head(key, sealed=sealed)
            raise
        # The delete's own revision, with no second read that could fail after the delete
        # happened (an eviction then let a racing fill bring the value back).
        entry = self._absent(Absent(key, deleted.revision))
        await self._cache.write(self._namespace, key, entry, self._policy, sealed=sealed)
        return deleted.existed

    async def keys(self, prefix: str = "", limit: int = 100) -> list[str]:
        """Live keys starting with `prefix`, straight from the KV (listings are not cached).

        Raises:
            Unavailable: the KV cannot be reached.
        """
        return await self._inner.keys(prefix, limit)

    async def _write_head(self, key: str, *, sealed: bool = False, written: bool = True) -> None:
        """After a write that failed: write the KV head through. `written`: the write may
        have landed all the same."""
        try:
            head = await self._heads.head(key)
        except Exception:
            if not written:  # the entry is as good as it was: only the seal must end
                await self._cache.invalidate(self._namespace, key, self._policy, sealed=sealed)
                return
            # The KV cannot be read either (the caller's own error says why): the write's
            # revision is unknown. An eviction would let a fill of the old value in flight
            # bring it back after the write. A fence above every revision hides the entry
            # and refuses every fill (and write) for `fence_ttl_s`, longer than any fill may
            # take (`max_fill_age_s`); reads of the key go to the KV meanwhile. Its failure
            # is handled inside the cache.
            entry = Entry.fence(UNKNOWN_REVISION)
        else:
            entry = self._absent(head) if isinstance(head, Absent) else entry_of(head)
        await self._cache.write(self._namespace, key, entry, self._policy, sealed=sealed)

    @staticmethod
    def _absent(head: Absent) -> Entry:
        if head.revision == UNVERSIONED:
            # Nothing was ever written under `key` (a delete that found nothing, a put that
            # failed before the KV took it). An eviction would also remove the entry of a
            # put that reached the KV after this read and wrote through before we got
            # here, and leave the cache short of the KV. A fence at the first revision any
            # write can have says "absent so far": it replaces a cached absence and yields
            # to every write.
            return Entry.fence(FIRST_REVISION)
        return Entry.absent(head.revision)
