"""The cache's logic on the in-memory twin: stampedes, revisions, leases, breaker, fences."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from nexus_bus.cache import (
    UNKNOWN_REVISION,
    Cache,
    CachedRecordStore,
    CachePolicy,
    CacheResult,
    Entry,
    Kind,
)
from nexus_bus.cache.heads import Absent, Head
from nexus_bus.cache.local import LocalCache
from nexus_bus.cache.memory import MemoryEntryStore
from nexus_bus.cache.notice import Notice
from nexus_bus.errors import NotFound, Unavailable
from nexus_bus.resilience import CircuitBreaker, ExponentialBackoff, Jitter
from nexus_bus.store import Deleted, Record

POLICY = CachePolicy(ttl_s=60, negative_ttl_s=10, jitter=0, wait_s=1.0)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class RecordingPeers:
    """Stands in for the NATS bus in unit tests: records notices, fences as told."""

    def __init__(self, *, can_fence: bool) -> None:
        self.can_fence = can_fence
        self.fences: list[Notice] = []
        self.notices: list[Notice] = []

    async def fence(self, notice: Notice) -> bool:
        self.fences.append(notice)
        return self.can_fence

    async def announce(self, notice: Notice) -> None:
        self.notices.append(notice)

    async def revoke(self, origin: str, notice: Notice, timeout_s: float) -> bool:
        return False

    async def close(self) -> None:
        pass


Loader = Callable[[], Awaitable[Entry]]


def counting(value: Entry, delay_s: float = 0.0) -> tuple[list[int], Loader]:
    calls: list[int] = []

    async def load() -> Entry:
        calls.append(1)
        await asyncio.sleep(delay_s)
        return value

    return calls, load


def fast_breaker(clock: Callable[[], float]) -> CircuitBreaker:
    return CircuitBreaker(
        failure_threshold=2,
        reset=ExponentialBackoff(base_s=1.0, jitter=Jitter.NONE),
        clock=clock,
    )


async def test_miss_loads_and_fills_then_hits() -> None:
    store = MemoryEntryStore()
    cache = Cache(store)
    calls, load = counting(Entry.of(b"v", 3))
    assert await cache.fetch("data", "k", load, POLICY) == Entry.of(b"v", 3)
    assert await cache.fetch("data", "k", load, POLICY) == Entry.of(b"v", 3)
    assert len(calls) == 1
    assert cache.stats.counts("data") == {CacheResult.MISS: 1, CacheResult.HIT: 1}
    assert cache.stats.hit_ratio("data") == 0.5
    assert store.lease_holder(cache.key("data", "k")) is None  # the filler released it


async def test_concurrent_misses_run_one_loader() -> None:
    cache = Cache(MemoryEntryStore())
    calls, load = counting(Entry.of(b"v", 1), delay_s=0.05)
    results = await asyncio.gather(*(cache.fetch("data", "hot", load, POLICY) for _ in range(50)))
    assert len(calls) == 1
    assert {r.value for r in results} == {b"v"}
    counts = cache.stats.counts("data")
    assert counts[CacheResult.MISS] == 1 and counts[CacheResult.COALESCED] == 49


async def test_waiters_load_themselves_when_the_loader_takes_too_long() -> None:
    cache = Cache(MemoryEntryStore())
    calls, slow = counting(Entry.of(b"v", 1), delay_s=0.5)
    policy = POLICY.with_(wait_s=0.05)
    first = asyncio.create_task(cache.fetch("data", "k", slow, policy))
    await asyncio.sleep(0.01)
    other_calls, fast = counting(Entry.of(b"v", 1))
    started = asyncio.get_running_loop().time()
    assert (await cache.fetch("data", "k", fast, policy)).value == b"v"
    assert asyncio.get_running_loop().time() - started < 0.4  # bounded by wait_s, not the loader
    assert len(other_calls) == 1
    await first
    assert len(calls) == 1


async def test_not_found_is_cached_only_with_negative_ttl() -> None:
    store = MemoryEntryStore()
    cache = Cache(store)
    calls, load = counting(Entry.absent(4))
    for _ in range(3):
        assert (await cache.fetch("data", "gone", load, POLICY)).kind is Kind.ABSENT
    assert len(calls) == 1
    calls2, load2 = counting(Entry.absent(4))
    for _ in range(3):
        await cache.fetch("data", "gone2", load2, POLICY.with_(negative_ttl_s=0))
    assert len(calls2) == 3


async def test_late_fill_of_an_older_revision_never_overwrites_a_write() -> None:
    store = MemoryEntryStore()
    cache = Cache(store)
    gate = asyncio.Event()

    async def slow_old() -> Entry:
        await gate.wait()
        return Entry.of(b"old", 5)

    reader = asyncio.create_task(cache.fetch("data", "k", slow_old, POLICY))
    await asyncio.sleep(0.01)
    await cache.write("data", "k", Entry.of(b"new", 6), POLICY)  # the put returned
    gate.set()
    await reader
    assert store.peek(cache.key("data", "k")) == Entry.of(b"new", 6)
    _, never = counting(Entry.of(b"x", 1))
    assert (await cache.fetch("data", "k", never, POLICY)).value == b"new"


async def test_tombstone_blocks_a_late_fill_of_the_deleted_value() -> None:
    store = MemoryEntryStore()
    cache = Cache(store)
    gate = asyncio.Event()

    async def slow_value() -> Entry:
        await gate.wait()
        return Entry.of(b"doomed", 5)

    reader = asyncio.create_task(cache.fetch("data", "k", slow_value, POLICY))
    await asyncio.sleep(0.01)
    await cache.write("data", "k", Entry.absent(6), POLICY)  # the delete returned
    gate.set()
    await reader
    assert store.peek(cache.key("data", "k")) == Entry.absent(6)


async def test_delete_without_negative_caching_leaves_a_fence() -> None:
    store = MemoryEntryStore()
    cache = Cache(store)
    policy = POLICY.with_(negative_ttl_s=0)
    await cache.write("data", "k", Entry.of(b"v", 5), policy)
    await cache.write("data", "k", Entry.absent(6), policy)
    assert store.peek(cache.key("data", "k")) == Entry.fence(6)
    calls, load = counting(Entry.absent(6))
    assert (await cache.fetch("data", "k", load, policy)).kind is Kind.ABSENT
    assert len(calls) == 1  # a fence is a miss


async def test_unversioned_write_revokes_the_lease_of_a_load_in_flight() -> None:
    store = MemoryEntryStore()
    cache = Cache(store)
    gate = asyncio.Event()

    async def stale_source() -> Entry:
        await gate.wait()
        return Entry.of(b'"old"')

    reader = asyncio.create_task(cache.fetch("users", "u", stale_source, POLICY))
    await asyncio.sleep(0.01)
    await cache.invalidate("users", "u", POLICY)  # the source changed meanwhile
    gate.set()
    assert (await reader).value == b'"old"'  # the caller gets what it read...
    assert store.peek(cache.key("users", "u")) is None  # ...but it is not cached


async def test_stale_entry_is_served_while_one_refresh_runs() -> None:
    clock = FakeClock()
    store = MemoryEntryStore(clock=clock)
    cache = Cache(store, clock=clock)
    policy = POLICY.with_(ttl_s=10, stale_s=5)
    _, first = counting(Entry.of(b"v1", 1))
    await cache.fetch("data", "k", first, policy)
    clock.now += 11  # past fresh, inside the stale window
    calls, second = counting(Entry.of(b"v2", 2), delay_s=0.02)
    served = await asyncio.gather(*(cache.fetch("data", "k", second, policy) for _ in range(10)))
    assert {e.value for e in served} == {b"v1"}
    assert cache.stats.counts("data")[CacheResult.STALE] == 10
    await asyncio.sleep(0.1)
    assert len(calls) == 1
    assert store.peek(cache.key("data", "k")) == Entry.of(b"v2", 2)
    clock.now += 16  # even the stale window is over: a plain miss
    calls3, third = counting(Entry.of(b"v3", 3))
    await cache.fetch("data", "k", third, policy)
    assert len(calls3) == 1


async def test_a_slow_load_is_not_filled() -> None:
    clock = FakeClock()
    store = MemoryEntryStore(clock=clock)
    cache = Cache(store, clock=clock, max_fill_age_s=2)

    async def slow() -> Entry:
        clock.now += 3
        return Entry.of(b"v", 1)

    await cache.fetch("data", "k", slow, POLICY)
    assert store.peek(cache.key("data", "k")) is None
    assert store.lease_holder(cache.key("data", "k")) is None


async def test_a_fill_that_reaches_the_store_after_max_fill_age_is_refused() -> None:
    """The load was quick (its age passes), but the worker stalls before its fill reaches
    the store, longer than the tombstone it raced with lives: the store refuses the fill on
    its own clock, counted from the read that missed."""
    clock = FakeClock()
    store = MemoryEntryStore(clock=clock)
    cache = Cache(store, clock=clock, max_fill_age_s=5)
    filling = store.fill

    async def stalled_fill(*args: Any, **kwargs: Any) -> Any:
        if not kwargs.get("collect"):  # a read-through fill, not a write
            clock.now += 40  # past the tombstone's 10 s
        return await filling(*args, **kwargs)

    async def head_then_deleted() -> Entry:
        await cache.write("data", "k", Entry.absent(2), POLICY)  # the delete lands
        return Entry.of(b"doomed", 1)  # read before it

    store.fill = stalled_fill  # type: ignore[method-assign]
    await cache.fetch("data", "k", head_then_deleted, POLICY)
    store.fill = filling  # type: ignore[method-assign]
    assert store.peek(cache.key("data", "k")) is None  # the tombstone expired; nothing back
    _, absent = counting(Entry.absent(2))
    assert (await cache.fetch("data", "k", absent, POLICY)).kind is Kind.ABSENT


async def test_a_failed_load_releases_the_lease() -> None:
    store = MemoryEntryStore()
    cache = Cache(store)

    async def broken() -> Entry:
        raise NotFound("boom")

    with pytest.raises(NotFound):
        await cache.fetch("data", "k", broken, POLICY)
    assert store.lease_holder(cache.key("data", "k")) is None


async def test_dead_store_fails_open_and_breaker_stops_calling_it_then_recovers() -> None:
    clock = FakeClock()
    store = MemoryEntryStore(clock=clock)
    cache = Cache(store, breaker=fast_breaker(clock), clock=clock)
    store.down = True
    calls, load = counting(Entry.of(b"v", 1))
    for _ in range(10):
        assert (await cache.fetch("data", "k", load, POLICY)).value == b"v"
    assert len(calls) == 10 and store.calls == 2  # two failures opened the breaker
    assert cache.stats.counts("data") == {CacheResult.BYPASS: 10}
    store.down = False
    clock.now += 1.5  # the reset delay passed: one probe goes through and closes it
    await cache.fetch("data", "k", load, POLICY)
    await cache.fetch("data", "k", load, POLICY)
    assert cache.stats.counts("data")[CacheResult.HIT] == 1


async def test_failed_write_through_is_fenced_by_a_peer() -> None:
    store = MemoryEntryStore()
    peers = RecordingPeers(can_fence=True)
    cache = Cache(store, peers=peers)
    store.down = True
    await cache.write("data", "k", Entry.of(b"v", 9), POLICY)
    assert [n.revision for n in peers.fences] == [9]
    assert cache.floors.minimum(cache.key("data", "k").entry) == 0
    assert [n.floor for n in peers.notices] == [False]  # the plain invalidation notice


async def test_unfenced_write_keeps_a_floor_until_repaired() -> None:
    store = MemoryEntryStore()
    peers = RecordingPeers(can_fence=False)
    cache = Cache(store, peers=peers, repair_backoff=ExponentialBackoff(base_s=0.01, cap_s=0.01))
    ck = cache.key("data", "k")
    await cache.write("data", "k", Entry.of(b"old", 3), POLICY)
    store.down = True
    await cache.write("data", "k", Entry.of(b"new", 4), POLICY)
    assert cache.floors.minimum(ck.entry) == 4
    assert [n.floor for n in peers.notices] == [False, True, False]
    store.down = False
    await asyncio.sleep(0.05)  # the repair loop fenced the key
    assert store.peek(ck) == Entry.fence(4)
    assert len(cache.floors) == 0
    calls, load = counting(Entry.of(b"new", 4))
    assert (await cache.fetch("data", "k", load, POLICY)).value == b"new"
    assert len(calls) == 1
    await cache.close()


async def test_a_floor_from_a_peer_hides_older_entries_at_once() -> None:
    store = MemoryEntryStore()
    cache = Cache(store, repair_backoff=ExponentialBackoff(base_s=5, cap_s=5))
    ck = cache.key("data", "k")
    await cache.write("data", "k", Entry.of(b"old", 3), POLICY)
    store.down = True  # the repair cannot land yet
    notice = Notice(key=ck.entry, revision=4, origin="other", floor=True, lifetime_ms=60_000)
    cache.on_notice(notice)
    store.down = False
    calls, load = counting(Entry.of(b"new", 4))
    assert (await cache.fetch("data", "k", load, POLICY)).value == b"new"
    assert len(calls) == 1 and cache.floors.minimum(ck.entry) == 0  # the fill met the floor
    await cache.close()


async def test_fence_requests_from_peers() -> None:
    store = MemoryEntryStore()
    cache = Cache(store)
    ck = cache.key("data", "k")
    await cache.write("data", "k", Entry.of(b"old", 3), POLICY)
    assert await cache.apply_fence(Notice(key=ck.entry, revision=5))
    assert store.peek(ck) == Entry.fence(5)
    assert not await cache.apply_fence(Notice(key="elsewhere:data:{k}", revision=5))
    store.down = True
    assert not await cache.apply_fence(Notice(key=ck.entry, revision=6))


async def test_l1_is_used_by_opted_in_policies_and_dropped_by_notices() -> None:
    store = MemoryEntryStore()
    cache = Cache(store, local=LocalCache(10))
    policy = POLICY.with_(local_ttl_s=30)
    _, load = counting(Entry.of(b"v", 2))
    await cache.fetch("users", "u", load, policy)  # a miss: loaded and filled
    await cache.fetch("users", "u", load, policy)  # a Redis hit, with a read lease
    calls_before = store.calls
    await cache.fetch("users", "u", load, policy)
    assert store.calls == calls_before  # served from the L1
    cache.on_notice(Notice(key=cache.key("users", "u").entry, revision=3, origin="other"))
    await cache.fetch("users", "u", load, policy)
    assert store.calls == calls_before + 1


async def test_get_or_set_set_and_delete() -> None:
    cache = Cache(MemoryEntryStore())
    calls: list[int] = []

    async def getter() -> dict[str, int]:
        calls.append(1)
        return {"n": len(calls)}

    assert await cache.get_or_set("k", getter, ttl=60) == {"n": 1}
    assert await cache.get_or_set("k", getter, ttl=60) == {"n": 1}
    await cache.set("k", {"n": 42})
    assert await cache.get_or_set("k", getter) == {"n": 42}
    await cache.delete("k")
    assert await cache.get_or_set("k", getter) == {"n": 2}

    async def missing() -> int:
        calls.append(1)
        raise NotFound("no such thing")

    negative = CachePolicy(negative_ttl_s=5)
    for _ in range(3):
        with pytest.raises(NotFound):
            await cache.get_or_set("gone", missing, policy=negative)
    assert len(calls) == 3  # two getters above, one for the cached absence


async def test_a_cache_aside_set_replaces_a_cached_not_found() -> None:
    """The documented pattern: the source is updated, then `set`. A cached absence and the
    value are both unversioned; the fill rule keeps the absence, a write must not."""
    cache = Cache(MemoryEntryStore())
    source: dict[str, int] = {}
    policy = CachePolicy(negative_ttl_s=30)

    async def getter() -> int:
        if "u" not in source:
            raise NotFound("no user u")
        return source["u"]

    with pytest.raises(NotFound):
        await cache.get_or_set("user.u", getter, policy=policy)  # the absence is cached
    source["u"] = 7
    await cache.set("user.u", 7, policy=policy)
    source["u"] = 8  # the cache must answer from the set, not the getter
    assert await cache.get_or_set("user.u", getter, policy=policy) == 7


class HeldKV:
    """The KV in memory, records and heads (with delete markers). While `answer` is clear, a
    write is stored and its answer then held: the KV has it while its caller still waits.
    `fail_writes` loses the answers of writes it stored; `fail_heads` fails head reads."""

    def __init__(self) -> None:
        self.records: dict[str, Record] = {}
        self.markers: dict[str, int] = {}
        self.revision = 0
        self.stored = asyncio.Event()
        self.answer = asyncio.Event()
        self.answer.set()
        self.fail_writes = False
        self.fail_heads = False

    async def _stored(self) -> None:
        self.stored.set()
        await self.answer.wait()
        if self.fail_writes:
            raise Unavailable("the KV stored the write; its answer was lost")

    async def get(self, key: str) -> Record:
        if key not in self.records:
            raise NotFound(key)
        return self.records[key]

    async def put(self, key: str, value: bytes, *, expected_revision: int | None = None) -> int:
        self.revision += 1
        self.records[key] = Record(key, value, self.revision)
        await self._stored()
        return self.revision

    async def delete(self, key: str) -> bool:
        return (await self.delete_versioned(key)).existed

    async def delete_versioned(self, key: str) -> Deleted:
        if key not in self.records:
            return Deleted(existed=False, revision=self.markers.get(key, 0))
        del self.records[key]
        self.revision += 1
        self.markers[key] = self.revision
        await self._stored()
        return Deleted(existed=True, revision=self.revision)

    async def keys(self, prefix: str = "", limit: int = 100) -> list[str]:
        return sorted(k for k in self.records if k.startswith(prefix))[:limit]

    async def head(self, key: str) -> Head:
        await asyncio.sleep(0)  # a round trip: a cancellation can land here
        if self.fail_heads:
            raise Unavailable("the KV cannot be read")
        if key in self.records:
            return self.records[key]
        return Absent(key, self.markers.get(key, 0))


@pytest.mark.parametrize("op", ["put", "delete"])
async def test_a_write_cancelled_after_the_kv_stored_it_still_writes_through(op: str) -> None:
    """The worker's deadline reaper (again and again), a dispatch timeout or a drain cancels
    a handler; one cancelled after the KV took its write must still leave no old entry."""
    store, kv = MemoryEntryStore(), HeldKV()
    cache = Cache(store)
    records = CachedRecordStore(kv, kv, cache, POLICY)
    await records.put("k", b"old")
    assert (await records.get("k")).value == b"old"  # cached
    kv.stored.clear()
    kv.answer.clear()
    writing = asyncio.create_task(records.put("k", b"new") if op == "put" else records.delete("k"))
    await kv.stored.wait()  # in the KV; its answer is slow
    while not writing.done():  # the reaper cancels until the handler is gone
        writing.cancel()
        await asyncio.sleep(0)
    with pytest.raises(asyncio.CancelledError):
        await writing
    kv.answer.set()
    await cache.close()  # waits for the write still running
    expected = Entry.of(b"new", 2) if op == "put" else Entry.absent(2)
    assert store.peek(cache.key("data", "k")) == expected


@pytest.mark.parametrize("answered", [True, False], ids=["delete-answered", "answer-lost"])
async def test_a_delete_leaves_what_a_fill_in_flight_cannot_replace_when_the_kv_cannot_be_read(
    answered: bool,
) -> None:
    """A load read the value before the delete and fills after it, while the KV cannot be
    read: the delete's tombstone carries the revision the delete itself returned, and a
    delete whose answer was lost (its revision unknown) fences above every revision. An
    eviction, after a head read that failed, let the fill bring the deleted value back."""
    store, kv = MemoryEntryStore(), HeldKV()
    cache = Cache(store)
    records = CachedRecordStore(kv, kv, cache, POLICY)
    await records.put("k", b"doomed")
    await cache.invalidate("data", "k", POLICY)  # the entry expired: the next read loads
    gate = asyncio.Event()

    async def slow_load() -> Entry:
        head = Entry.of(b"doomed", 1)  # read from the KV before the delete
        await gate.wait()
        return head

    reading = asyncio.create_task(cache.fetch("data", "k", slow_load, POLICY))
    await asyncio.sleep(0.01)
    kv.fail_heads, kv.fail_writes = True, not answered
    if answered:
        assert await records.delete("k") is True
    else:
        with pytest.raises(Unavailable):
            await records.delete("k")
    gate.set()
    assert (await reading).value == b"doomed"  # concurrent with the delete: allowed
    entry = store.peek(cache.key("data", "k"))
    assert entry == (Entry.absent(2) if answered else Entry.fence(UNKNOWN_REVISION))
    kv.fail_heads = False
    with pytest.raises(NotFound):
        await records.get("k")  # begins after the delete ended
