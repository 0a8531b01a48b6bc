"""The optional in-process cache (L1): a bounded LRU of entries with a short TTL.

An L1 skips the Redis round trip, but other workers' writes reach it only through the
invalidation notices on `nexus.sys.cache.invalidate`, which arrive after the write returns.
So an L1 is off by default and never used for `data`, whose contract is that no read
anywhere returns a value older than a completed write. Pure; the clock is injected.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from nexus_bus.cache.entries import Entry


class LocalCache:
    """Entries by Redis entry name, least recently used evicted first.

    Args:
        max_entries: the bound on entries kept.
        clock: monotonic seconds.
    """

    def __init__(self, max_entries: int = 10_000, *, clock: Callable[[], float] = time.monotonic):
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._max = max_entries
        self._clock = clock
        self._items: OrderedDict[str, tuple[Entry, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> Entry | None:
        """The entry of `key` if present and not expired."""
        item = self._items.get(key)
        if item is None:
            return None
        entry, expires_at = item
        if expires_at <= self._clock():
            del self._items[key]
            return None
        self._items.move_to_end(key)
        return entry

    def put(self, key: str, entry: Entry, ttl_s: float) -> None:
        """Keep `entry` for `ttl_s` seconds, replacing an older one only (never a newer one)."""
        current = self._items.get(key)
        if current is not None and current[0].revision > entry.revision:
            return
        self._items[key] = (entry, self._clock() + ttl_s)
        self._items.move_to_end(key)
        while len(self._items) > self._max:
            self._items.popitem(last=False)

    def drop(self, key: str) -> None:
        """Forget `key` (an invalidation arrived)."""
        self._items.pop(key, None)

    def clear(self) -> None:
        """Forget everything."""
        self._items.clear()
