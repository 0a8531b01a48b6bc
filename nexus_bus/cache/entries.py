"""What the cache stores, the one rule that orders writes, and the `EntryStore` seam.

Every entry carries the revision of the system-of-record state it mirrors. Writers (write
-through after a put or delete) and readers (read-through fills after a miss) race, and a
fill can land after a newer write; `accepts` decides which one wins, identically in the
Redis Lua scripts and in the in-memory twin, so a cache never goes back in time.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Final, Protocol

from nexus_bus.cache.keys import CacheKey
from nexus_bus.errors import Unavailable

# Values cached without a revision (cache-aside of arbitrary getters). They are ordered by
# leases instead: a fill needs the lease it was loaded under, and every write revokes it.
UNVERSIONED: Final = 0
# The lowest revision a KV write can have (a JetStream stream sequence): an entry at it yields
# to every write of the key.
FIRST_REVISION: Final = 1
# Above every revision a KV write will have (Lua numbers are doubles, exact up to here): the
# fence of a write whose revision nobody can tell (it may have landed, and the KV cannot be
# read). It hides the key's entry and refuses every fill and write until it expires.
UNKNOWN_REVISION: Final = 2**53


class Kind(StrEnum):
    """What an entry says about its key (one letter: it is stored in every Redis hash)."""

    VALUE = "v"  # the key has this value at this revision
    ABSENT = "a"  # the key does not exist at this revision (tombstone / negative cache)
    FENCE = "f"  # a write at this revision happened; nothing older may be served or filled


@dataclass(frozen=True, slots=True)
class Entry:
    """One cached state of a key."""

    kind: Kind
    revision: int
    value: bytes = b""

    @classmethod
    def of(cls, value: bytes, revision: int = UNVERSIONED) -> Entry:
        """A value at `revision`."""
        return cls(Kind.VALUE, revision, value)

    @classmethod
    def absent(cls, revision: int = UNVERSIONED) -> Entry:
        """A tombstone: the key does not exist as of `revision`."""
        return cls(Kind.ABSENT, revision)

    @classmethod
    def fence(cls, revision: int) -> Entry:
        """A marker that hides every entry older than `revision` without a value of its own."""
        return cls(Kind.FENCE, revision)

    @property
    def versioned(self) -> bool:
        """Whether the entry is ordered by revision (not by lease)."""
        return self.revision != UNVERSIONED


def accepts(current: Entry | None, incoming: Entry, *, write: bool = False) -> bool:
    """Whether `incoming` may replace `current` (the compare-and-set rule).

    A higher revision always wins. At the same revision the same kind refreshes the entry
    (a revalidation), and a value or tombstone replaces the fence of its own write; a fence
    never replaces what it was fencing.

    An unversioned `write` (a cache-aside `set`, not a fill) replaces whatever is there.
    Unversioned entries are ordered by the lease, not by revision: the write revokes the
    lease in the same step, so no fill loaded before it can land after it, and what it
    replaces was written or filled before it. (At revision 0 the kind rule would keep a
    cached "not found" over the value the source has now.)
    """
    if current is None or (write and not incoming.versioned):
        return True
    if current.revision != incoming.revision:
        return incoming.revision > current.revision
    return current.kind is incoming.kind or current.kind is Kind.FENCE


@dataclass(frozen=True, slots=True)
class Lookup:
    """The answer to a read: a usable entry (or none), and whether this reader holds the lease.

    Attributes:
        entry: the entry when it is usable: not a fence and not below the reader's floor.
        stale: the entry is past its fresh TTL but inside its serve-stale window.
        lease: this reader won the right to load the key from the system of record.
        held: the store recorded this reader as an L1 holder of the entry (read lease).
        now_ms: the store's clock when it read, in ms (0: unknown): a fill after this read
            is bounded on that clock (`EntryStore.fill`'s `not_after_ms`).
    """

    entry: Entry | None
    stale: bool = False
    lease: bool = False
    held: bool = False
    now_ms: int = 0


@dataclass(frozen=True, slots=True)
class Holder:
    """A worker that may keep the entry in its L1, and how much longer its read lease runs."""

    origin: str
    remaining_ms: int


@dataclass(frozen=True, slots=True)
class Written:
    """The answer to a write (`fill` or `evict`).

    Attributes:
        stored: the entry was stored (`fill`), or an entry was there (`evict`).
        holders: the read leases that were live when the write ran (collected and cleared
            when the write asked for them): each must drop the key or run out before the
            write returns.
        wait_ms: the store itself is younger than one read lease (a restart or a flush lost
            its holders): the write must wait this long too.
    """

    stored: bool
    holders: tuple[Holder, ...] = ()
    wait_ms: int = 0


class CacheUnavailable(Unavailable):
    """The cache store did not answer in time or failed; callers fail open."""

    code, title = "unavailable", "Cache unavailable"


class EntryStore(Protocol):
    """Where entries live (Redis, or the in-memory twin in unit tests).

    Every method raises `CacheUnavailable` on any failure of the store, and nothing else.
    """

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
        """Read `key`; when it is missing, stale or below `min_revision`, try to take its lease
        (not with `lease_ms` 0: a reader that only looks). With `holder`, a usable entry is
        handed out with a read lease of `hold_ms` recorded for that holder (`Lookup.held`)."""
        ...

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
        """Store `entry` if `accepts` allows it (and, with `need_lease`, if `token` holds the
        lease; with `not_after_ms`, if the store's clock, as `Lookup.now_ms` reads it, is not
        past that yet); the entry lives `ttl_ms`, of which the last `stale_ms` are stale.
        Releases the lease held by `token`, or any lease with `drop_lease`: an unversioned
        entry stored so is a write, which replaces any entry (`accepts` with `write`). With
        `collect` (a write, not a fill), every live read lease of the key is returned and
        cleared, and a store younger than `hold_ms` says how much longer to wait; with
        `unseal`, the write ends the seal it took (`seal`).
        """
        ...

    async def evict(self, key: CacheKey, *, hold_ms: int = 0, unseal: bool = False) -> Written:
        """Remove the entry and revoke its lease (the invalidation of unversioned entries),
        collecting its read leases like a write (and ending its seal, with `unseal`);
        `stored`: whether an entry was there."""
        ...

    async def seal(self, key: CacheKey, *, hold_ms: int) -> Written:
        """Before a write reaches the system of record: collect the key's read leases like a
        write, and grant none (reads still answer, unheld) until the write's `fill` or `evict`
        with `unseal`, or at most `hold_ms` past the longest lease collected (which the writer
        may wait out), so that no L1 keeps the value the write replaces while the new one is
        visible anywhere."""
        ...

    async def release(self, key: CacheKey, token: str) -> None:
        """Give up the lease held by `token` (the load failed)."""
        ...
