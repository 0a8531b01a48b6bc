"""Writing journaled writes through to the Redis cache, with its public API.

The effect journal (`journal.py`) commits a job's or a keyed request's writes to the KV in
atomic batches, around the cached record store; this adapter then tells the cache what the KV
now holds, exactly as the cached store does after its own writes, so no reader keeps seeing
the replaced value.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

from nexus_bus.cache import UNKNOWN_REVISION, Cache, CachePolicy, Entry
from nexus_bus.constants import CACHE_DATA_NAMESPACE

T = TypeVar("T")


class CacheWriteThrough:
    """`WriteThrough` into the `data` namespace of the cache."""

    def __init__(self, cache: Cache, policy: CachePolicy, namespace: str = CACHE_DATA_NAMESPACE):
        self._cache = cache
        self._policy = policy
        self._namespace = namespace

    async def seal(self, key: str) -> bool:
        """Take back every L1 copy of `key` before a write (`Cache.seal`). Never raises."""
        return await self._cache.seal(self._namespace, key, self._policy)

    async def unseal(self, key: str) -> None:
        """End the seal of a write that did not happen. Never raises."""
        await self._cache.invalidate(self._namespace, key, self._policy, sealed=True)

    async def written(
        self, key: str, value: bytes | None, revision: int, *, sealed: bool = False
    ) -> None:
        """Store the entry at `revision` unless the cache holds a newer one (`sealed`: ending
        the write's seal). Never raises."""
        entry = Entry.absent(revision) if value is None else Entry.of(value, revision)
        await self._cache.write(self._namespace, key, entry, self._policy, sealed=sealed)

    async def finish(self, work: Coroutine[Any, Any, T]) -> T:
        """Run `work` to its end even when the caller is cancelled (`Cache.finish`).

        Raises:
            Whatever `work` raises.
        """
        return await self._cache.finish(work)

    async def fenced(self, key: str, revision: int, *, sealed: bool = False) -> None:
        """Fence the entry at `revision`, or above every revision when it is 0 (unknown), so
        that nothing older is served or filled while the fence lives. Never raises."""
        entry = Entry.fence(revision or UNKNOWN_REVISION)
        await self._cache.write(self._namespace, key, entry, self._policy, sealed=sealed)
