"""Revision floors: what a worker remembers about writes nobody could fence in Redis.

When a write-through fails (Redis down, slow or partitioned from the writer) and no peer
could fence the key either, an older entry may still sit in Redis and come back with it.
Every worker then keeps a floor for the key: entries below it are treated as misses, and a
repair loop fences the key once Redis answers. A floor is dropped once it is met (an entry
at or above it was stored, or the fence landed) or once every entry older than it must have
expired on its own.

The set is bounded. When it overflows the worker stops trusting cached entries altogether
(reads go to the system of record) for one entry lifetime: losing a floor silently could
serve an old value, distrusting costs only latency. The clock is injected, and the repair
loop (`repair_floors`) is handed the call that fences a key.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Floor:
    """The revision a write reached (0: an unversioned write), until when it matters, and
    how long the fence that repairs it should live."""

    revision: int
    expires_at: float
    fence_ttl_ms: int

    @property
    def minimum(self) -> int:
        """The lowest revision an entry needs to be served (unversioned entries carry 0)."""
        return max(self.revision, 1)


class Floors:
    """Per-key revision floors, bounded, expiring.

    Args:
        max_keys: how many floors to keep before distrusting the whole cache.
        clock: monotonic seconds.
    """

    def __init__(self, *, max_keys: int = 100_000, clock: Callable[[], float] = time.monotonic):
        self._max = max_keys
        self._clock = clock
        self._floors: dict[str, Floor] = {}
        self._distrust_until = 0.0

    def __len__(self) -> int:
        return len(self._floors)

    @property
    def distrusted(self) -> bool:
        """Whether floors were lost to overflow and no cached entry may be served now."""
        return self._clock() < self._distrust_until

    def raise_floor(self, key: str, revision: int, *, lifetime_s: float, fence_ttl_ms: int) -> None:
        """Remember that `key` was written at `revision` without fencing its old entry.

        Args:
            key: the entry name.
            revision: the write's revision (0 for unversioned entries).
            lifetime_s: the longest an entry of this key lives; after that the floor is moot.
            fence_ttl_ms: the TTL of the fence that will repair the key.
        """
        now = self._clock()
        current = self._floors.get(key)
        if current is None and len(self._floors) >= self._max:
            self._prune(now)
        if current is None and len(self._floors) >= self._max:
            self._distrust_until = max(self._distrust_until, now + lifetime_s)
            return
        revision = max(revision, current.revision) if current else revision
        expires = max(now + lifetime_s, current.expires_at) if current else now + lifetime_s
        self._floors[key] = Floor(revision, expires, fence_ttl_ms)

    def minimum(self, key: str) -> int:
        """The lowest revision of `key` that may be served (0: no floor)."""
        floor = self._floors.get(key)
        if floor is None:
            return 0
        if floor.expires_at <= self._clock():
            del self._floors[key]
            return 0
        return floor.minimum

    def met(self, key: str, revision: int) -> None:
        """An entry at `revision` was stored: drop the floor if that is at or above it."""
        floor = self._floors.get(key)
        if floor is not None and floor.revision and revision >= floor.revision:
            del self._floors[key]

    def repaired(self, key: str, floor: Floor) -> None:
        """The fence for `floor` landed: drop it, unless a newer floor replaced it meanwhile."""
        if self._floors.get(key) == floor:
            del self._floors[key]

    def pending(self) -> list[tuple[str, Floor]]:
        """The floors still to repair (expired ones are dropped)."""
        self._prune(self._clock())
        return list(self._floors.items())

    def _prune(self, now: float) -> None:
        for key in [k for k, f in self._floors.items() if f.expires_at <= now]:
            del self._floors[key]


async def repair_floors(
    floors: Floors,
    fence: Callable[[str, Floor], Awaitable[bool]],
    backoff_s: Callable[[int], float],
) -> None:
    """The repair loop: fence every floored key (`fence`: whether it landed), in order,
    waiting `backoff_s(consecutive failures)` after a failure, until no floor is left."""
    failures = 0
    while pending := floors.pending():
        for key, floor in pending:
            if not await fence(key, floor):
                failures += 1
                await asyncio.sleep(backoff_s(failures))
                break
            floors.repaired(key, floor)
        else:
            failures = 0
