"""Cache-aside, for handlers of your own: `get_or_set`, `set` and `delete` of JSON values.

They rest on the cache's read-through (`fetch`) and write-through (`write`, `invalidate`),
so a cache-aside value has the same guarantees: one loader per key across all workers, an
L1 under read leases when the policy keeps one, and writes that revoke them (docs/cache.md).
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec

from nexus_bus.cache.entries import Entry, Kind
from nexus_bus.cache.policy import CachePolicy
from nexus_bus.constants import CACHE_DEFAULT_NAMESPACE
from nexus_bus.errors import NotFound

T = TypeVar("T")
Loader = Callable[[], Awaitable[Entry]]
_encode = msgspec.json.Encoder().encode


class CacheAside(abc.ABC):
    """The cache-aside API of `Cache`, on its read-through and write-through primitives."""

    @abc.abstractmethod
    async def fetch(self, namespace: str, key: str, loader: Loader, policy: CachePolicy) -> Entry:
        """The entry of `key`: from the cache, or from `loader` (filling the cache)."""

    @abc.abstractmethod
    async def write(
        self, namespace: str, key: str, entry: Entry, policy: CachePolicy, *, sealed: bool = False
    ) -> None:
        """Write `entry` through after the source accepted it (never raises)."""

    @abc.abstractmethod
    async def invalidate(
        self, namespace: str, key: str, policy: CachePolicy, *, sealed: bool = False
    ) -> None:
        """Drop `key` after the source deleted it (never raises)."""

    async def get_or_set(
        self,
        key: str,
        getter: Callable[[], Awaitable[T]],
        ttl: float = 3600.0,
        *,
        namespace: str = CACHE_DEFAULT_NAMESPACE,
        type: Any = Any,
        policy: CachePolicy | None = None,
    ) -> T:
        """Cache-aside: the cached value of `key`, or `await getter()` cached for `ttl` seconds.

        Values are stored as JSON (msgspec) and decoded as `type`, on hits and misses alike.
        One caller per key across all workers runs `getter`; the others wait for its result.

        Args:
            key: the key in `namespace`.
            getter: loads the value; raising `NotFound` caches the absence when the policy's
                `negative_ttl_s` allows it.
            ttl: seconds a value stays fresh (overrides `policy.ttl_s`).
            namespace: the cache namespace and `cache` metric label.
            type: what to decode the value as (any type msgspec can decode).
            policy: the rest of the behaviour (negative TTL, stale window, L1, jitter).

        Raises:
            NotFound: the getter raised it, now or (cached) before.
            Whatever `getter` raises; never a cache failure.
        """
        rules = (policy or CachePolicy()).with_(ttl_s=ttl)
        missing: list[NotFound] = []

        async def load() -> Entry:
            try:
                return Entry.of(_encode(await getter()))
            except NotFound as exc:
                missing.append(exc)
                return Entry.absent()

        entry = await self.fetch(namespace, key, load, rules)
        if entry.kind is Kind.ABSENT:
            raise missing[0] if missing else NotFound(f"{namespace} {key}: not found")
        decoded: T = msgspec.json.decode(entry.value, type=type)
        return decoded

    async def set(
        self,
        key: str,
        value: Any,
        ttl: float = 3600.0,
        *,
        namespace: str = CACHE_DEFAULT_NAMESPACE,
        policy: CachePolicy | None = None,
    ) -> None:
        """Cache-aside write: store `value` for `key` once the source has it (never raises)."""
        rules = (policy or CachePolicy()).with_(ttl_s=ttl)
        await self.write(namespace, key, Entry.of(_encode(value)), rules)

    async def delete(
        self,
        key: str,
        *,
        namespace: str = CACHE_DEFAULT_NAMESPACE,
        policy: CachePolicy | None = None,
    ) -> None:
        """Cache-aside invalidation: drop `key` so the next read loads it (never raises)."""
        await self.invalidate(namespace, key, policy or CachePolicy())
