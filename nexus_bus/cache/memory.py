"""An in-memory `EntryStore` with the Redis adapter's exact semantics, for unit tests.

It follows the Lua scripts rule for rule (`accepts`, leases, read leases of L1 holders, the
store's epoch, the stale window measured on the remaining TTL), so the cache's logic is
tested without a server. It is never a stand-in for Redis in integration tests.
`down = True` makes every call fail like a dead Redis; `restart()` empties it like a Redis
restarted without persistence.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from nexus_bus.cache.entries import (
    CacheUnavailable,
    Entry,
    Holder,
    Kind,
    Lookup,
    Written,
    accepts,
)
from nexus_bus.cache.keys import CacheKey


@dataclass(slots=True)
class _Stored:
    entry: Entry
    expires_at: float
    stale_s: float


class MemoryEntryStore:
    """`EntryStore` in a dict; the clock is injected.

    Attributes:
        down: when set, every call raises `CacheUnavailable`.
        calls: how many calls reached the store (failed ones included).
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._entries: dict[str, _Stored] = {}
        self._leases: dict[str, tuple[str, float]] = {}
        self._holders: dict[str, dict[str, float]] = {}
        self._seals: dict[str, tuple[int, float]] = {}  # entry -> (writes sealing, until)
        # When this store's state began: never lost until `restart()` (Redis records it in
        # `<prefix>:epoch`, and a missing epoch counts as just begun).
        self._since = -float("inf")
        self.down = False
        self.calls = 0

    def restart(self) -> None:
        """Lose every entry, lease and holder, like a Redis restarted without persistence."""
        self._entries.clear()
        self._leases.clear()
        self._holders.clear()
        self._seals.clear()
        self._since = self._clock()

    def _check(self) -> float:
        self.calls += 1
        if self.down:
            raise CacheUnavailable("memory store is down")
        return self._clock()

    def peek(self, key: CacheKey) -> Entry | None:
        """The stored entry, whatever its kind (for assertions)."""
        stored = self._live(key.entry, self._clock())
        return stored.entry if stored else None

    def lease_holder(self, key: CacheKey) -> str | None:
        """The token holding the lease of `key`, if any."""
        return self._lease(key.lease, self._clock())

    def _live(self, name: str, now: float) -> _Stored | None:
        stored = self._entries.get(name)
        if stored is not None and stored.expires_at <= now:
            del self._entries[name]
            return None
        return stored

    def _lease(self, name: str, now: float) -> str | None:
        lease = self._leases.get(name)
        if lease is not None and lease[1] <= now:
            del self._leases[name]
            return None
        return lease[0] if lease else None

    def _take_lease(self, name: str, token: str, lease_ms: int, now: float) -> bool:
        if lease_ms <= 0 or self._lease(name, now) is not None:
            return False
        self._leases[name] = (token, now + lease_ms / 1000)
        return True

    async def read(
        self,
        key: CacheKey,
        *,
        token: str,
        lease_ms: int,
        min_revision: int,
        holder: str = "",
        hold_ms: int = 0,
    ) -> Lookup:
        """See `EntryStore.read`."""
        now = self._check()
        stored = self._live(key.entry, now)
        usable = (
            stored is not None
            and stored.entry.kind is not Kind.FENCE
            and stored.entry.revision >= min_revision
        )
        now_ms = round(now * 1000)
        if stored is None or not usable:
            lease = self._take_lease(key.lease, token, lease_ms, now)
            return Lookup(None, lease=lease, now_ms=now_ms)
        stale = stored.stale_s > 0 and stored.expires_at - now <= stored.stale_s
        lease = stale and self._take_lease(key.lease, token, lease_ms, now)
        held = bool(holder) and not self._sealed(key.entry, now)
        if held:
            holders = self._holders.setdefault(key.entry, {})
            holders[holder] = max(holders.get(holder, now), now + hold_ms / 1000)
        return Lookup(stored.entry, stale=stale, lease=lease, held=held, now_ms=now_ms)

    def _sealed(self, name: str, now: float) -> bool:
        count, until = self._seals.get(name, (0, 0.0))
        return count > 0 and until > now

    def _collect(self, key: CacheKey, hold_ms: int, now: float, unseal: bool = False) -> Written:
        if unseal and self._sealed(key.entry, now):
            count, until = self._seals[key.entry]
            self._seals[key.entry] = (count - 1, until)
        holders = self._holders.pop(key.entry, {})
        live = tuple(
            Holder(origin, max(1, round((until - now) * 1000)))
            for origin, until in holders.items()
            if until > now
        )
        if hold_ms <= 0:
            return Written(False, live)
        young = self._since + hold_ms / 1000 - now
        return Written(False, live, max(0, round(young * 1000)) if young > 0 else 0)

    async def fill(
        self,
        key: CacheKey,
        entry: Entry,
        *,
        ttl_ms: int,
        stale_ms: int = 0,
        token: str = "",
        need_lease: bool = False,
        drop_lease: bool = False,
        collect: bool = False,
        hold_ms: int = 0,
        unseal: bool = False,
        not_after_ms: int = 0,
    ) -> Written:
        """See `EntryStore.fill`."""
        now = self._check()
        holder = self._lease(key.lease, now)
        if need_lease and holder != token:
            return Written(False)
        current = self._live(key.entry, now)
        late = 0 < not_after_ms < round(now * 1000)
        stored = not late and accepts(current.entry if current else None, entry, write=drop_lease)
        if stored:
            self._entries[key.entry] = _Stored(entry, now + ttl_ms / 1000, stale_ms / 1000)
        if drop_lease or (token and holder == token):
            self._leases.pop(key.lease, None)
        if not collect:
            return Written(stored)
        written = self._collect(key, hold_ms, now, unseal)
        return Written(stored, written.holders, written.wait_ms)

    async def evict(self, key: CacheKey, *, hold_ms: int = 0, unseal: bool = False) -> Written:
        """See `EntryStore.evict`."""
        now = self._check()
        existed = self._live(key.entry, now) is not None
        self._entries.pop(key.entry, None)
        self._leases.pop(key.lease, None)
        written = self._collect(key, hold_ms, now, unseal)
        return Written(existed, written.holders, written.wait_ms)

    async def seal(self, key: CacheKey, *, hold_ms: int) -> Written:
        """See `EntryStore.seal`."""
        now = self._check()
        written = self._collect(key, hold_ms, now)
        count, until = self._seals.get(key.entry, (0, 0.0))
        if until <= now:
            count = 0
        # One hold past the longest lease collected: the writer may wait that lease out.
        waits = [written.wait_ms, *(holder.remaining_ms for holder in written.holders)]
        longest = max(waits) / 1000  # a young store's wait is waited out too
        self._seals[key.entry] = (count + 1, max(until, now + longest + hold_ms / 1000))
        return Written(True, written.holders, written.wait_ms)

    async def release(self, key: CacheKey, token: str) -> None:
        """See `EntryStore.release`."""
        now = self._check()
        if self._lease(key.lease, now) == token:
            del self._leases[key.lease]
