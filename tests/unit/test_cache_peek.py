"""`Cache.peek`, the shim's read (docs/cache.md, "The shim's cached reads"), on the in-memory
twin: a fresh entry from the L1 or one store read under a read lease that writes revoke;
never a load, never the load lease, never a stale, fenced or floored entry."""

from __future__ import annotations

import asyncio
import time

from nexus_bus.cache import Cache, Entry, Kind
from nexus_bus.cache.local import LocalCache
from nexus_bus.cache.memory import MemoryEntryStore
from nexus_bus.cache.notice import Notice
from tests.unit.test_cache_l1 import LEASE_S, POLICY, LocalPeers


def shim_and_worker() -> tuple[MemoryEntryStore, LocalPeers, Cache, Cache]:
    store, peers = MemoryEntryStore(), LocalPeers()
    shim = peers.join(Cache(store, local=LocalCache(100), origin="shim"))
    worker = peers.join(Cache(store, local=LocalCache(100), origin="worker"))
    return store, peers, shim, worker


async def test_a_fresh_entry_is_read_once_then_held_until_a_write_revokes_it() -> None:
    store, peers, shim, worker = shim_and_worker()
    await worker.write("data", "k", Entry.of(b"old", 1), POLICY)
    first = await shim.peek("data", "k", POLICY)
    assert first is not None and first.value == b"old"
    calls = store.calls
    again = await shim.peek("data", "k", POLICY)
    assert again is not None and again.value == b"old" and store.calls == calls  # its L1
    started = time.monotonic()
    await worker.write("data", "k", Entry.of(b"new", 2), POLICY)
    assert time.monotonic() - started < LEASE_S / 2 and peers.revoked == ["shim"]
    after = await shim.peek("data", "k", POLICY)
    assert after is not None and after.value == b"new"


async def test_a_paused_shim_delays_a_write_by_its_lease_at_most() -> None:
    _, peers, shim, worker = shim_and_worker()
    await worker.write("data", "k", Entry.of(b"old", 1), POLICY)
    await shim.peek("data", "k", POLICY)
    held_at = time.monotonic()
    peers.paused.add("shim")
    await worker.write("data", "k", Entry.of(b"new", 2), POLICY)
    assert LEASE_S * 0.9 <= time.monotonic() - held_at <= LEASE_S * 1.5 + 0.1
    after = await shim.peek("data", "k", POLICY)
    assert after is not None and after.value == b"new"


async def test_a_miss_takes_no_load_lease_so_a_worker_loads_at_once() -> None:
    _, _, shim, worker = shim_and_worker()
    assert await shim.peek("data", "k", POLICY) is None
    loads = 0

    async def load() -> Entry:
        nonlocal loads
        loads += 1
        return Entry.of(b"v", 3)

    started = time.monotonic()
    entry = await worker.fetch("data", "k", load, POLICY)
    # Had the shim taken the lease, the worker would have polled for POLICY.wait_s first.
    assert entry.value == b"v" and loads == 1 and time.monotonic() - started < 0.1
    found = await shim.peek("data", "k", POLICY)
    assert found is not None and found.value == b"v"


async def test_stale_fenced_absent_and_floored_entries_are_left_to_the_worker() -> None:
    _, _, shim, worker = shim_and_worker()
    stale_policy = POLICY.with_(ttl_s=0.05, stale_s=30, local_ttl_s=0)
    await worker.write("data", "s", Entry.of(b"v", 1), stale_policy)
    await asyncio.sleep(0.06)
    assert await shim.peek("data", "s", stale_policy) is None  # stale: the worker refreshes
    await worker.write("data", "gone", Entry.absent(2), POLICY)
    absent = await shim.peek("data", "gone", POLICY)
    assert absent is not None and absent.kind is Kind.ABSENT  # CachedReads forwards it
    await worker.write("data", "f", Entry.of(b"v", 1), POLICY)
    floor = Notice(key=shim.key("data", "f").entry, revision=5, floor=True, lifetime_ms=60_000)
    shim.on_notice(floor)
    assert await shim.peek("data", "f", POLICY) is None  # below the floor
