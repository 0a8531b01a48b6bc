"""The in-process cache (L1): entries held under read leases, LRU-bounded by bytes.

An entry enters the L1 only with a read lease that the store recorded for this worker
(`Lookup.held`), and leaves it when the lease runs out or when a writer revokes it
(`drop`). A writer returns only after every holder of a live lease has dropped the key or
its lease has run out, so an L1 never serves a value older than a completed write
(docs/cache.md, "L1"). The lease is counted from before the read was sent, so it always
ends before the store's record of it.

One race is closed here: a read that was answered before a write, but whose answer arrives
after the writer's revocation, must not put the old entry back. `drop` remembers when each
key was revoked, and `put` refuses an entry read before that. The memory is kept one lease
long (after that, such an entry would have expired anyway) and bounded; on overflow
everything read so far is refused, which costs only Redis reads. Pure; the clock is injected.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from nexus_bus.cache.entries import Entry

# What one L1 entry costs besides its value and key: the tuple, the Entry, dict slots.
_OVERHEAD_BYTES = 200


class LocalCache:
    """Entries by Redis entry name, least recently used evicted first.

    Args:
        max_entries: the bound on entries kept.
        max_bytes: the bound on the bytes they take (values, keys and overhead).
        max_revocations: how many recent revocations are remembered before `drop` falls
            back to refusing every read made so far.
        clock: monotonic seconds.
    """

    def __init__(
        self,
        max_entries: int = 10_000,
        *,
        max_bytes: int = 64 * 1024 * 1024,
        max_revocations: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ):
        if max_entries < 1 or max_bytes < 1 or max_revocations < 1:
            raise ValueError("max_entries, max_bytes and max_revocations must be at least 1")
        self._max = max_entries
        self._max_bytes = max_bytes
        self._max_revocations = max_revocations
        self._clock = clock
        self._items: OrderedDict[str, tuple[Entry, float, int]] = OrderedDict()
        self._bytes = 0
        self._revoked: OrderedDict[str, float] = OrderedDict()  # key -> when, oldest first
        self._revoked_all = -float("inf")  # reads started before this are all refused
        self._longest_s = 0.0  # the longest lease handed out: how long revocations matter

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        """What the entries take, by the same estimate as the bound."""
        return self._bytes

    def get(self, key: str) -> Entry | None:
        """The entry of `key` while its lease runs, else None."""
        item = self._items.get(key)
        if item is None:
            return None
        if item[1] <= self._clock():
            self._remove(key)
            return None
        self._items.move_to_end(key)
        return item[0]

    def expect(self, lease_s: float) -> None:
        """A read under a lease of `lease_s` is about to be sent: revocations must be kept
        at least that long, or its answer could outlive the revocation that refuses it."""
        if lease_s > self._longest_s:
            self._longest_s = lease_s

    def put(self, key: str, entry: Entry, *, read_at: float, expires_at: float) -> bool:
        """Keep `entry`, read (sent to the store) at `read_at`, until its lease ends at
        `expires_at`. Refused when the lease has already run out, when the key was revoked
        after `read_at`, or when a newer revision is held. Returns whether it was kept."""
        now = self._clock()
        if expires_at <= now or read_at <= self._revoked_all:
            return False
        if (revoked := self._revoked.get(key)) is not None and read_at <= revoked:
            return False
        current = self._items.get(key)
        if current is not None and current[0].revision > entry.revision:
            return False
        self._longest_s = max(self._longest_s, expires_at - read_at)
        size = len(entry.value) + len(key) + _OVERHEAD_BYTES
        if current is not None:
            self._bytes -= current[2]
        self._items[key] = (entry, expires_at, size)
        self._items.move_to_end(key)
        self._bytes += size
        while len(self._items) > self._max or self._bytes > self._max_bytes:
            _, (_, _, freed) = self._items.popitem(last=False)
            self._bytes -= freed
        return True

    def drop(self, key: str) -> None:
        """Forget `key`, and refuse any entry of it read until now (a revocation)."""
        now = self._clock()
        self._remove(key)
        self._revoked[key] = now
        self._revoked.move_to_end(key)
        horizon = now - self._longest_s
        while self._revoked:
            oldest, when = next(iter(self._revoked.items()))
            if when >= horizon:
                break
            del self._revoked[oldest]
        if len(self._revoked) > self._max_revocations:
            self.clear()

    def clear(self) -> None:
        """Forget everything, and refuse every entry read until now."""
        self._items.clear()
        self._bytes = 0
        self._revoked.clear()
        self._revoked_all = self._clock()

    def _remove(self, key: str) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            self._bytes -= item[2]
