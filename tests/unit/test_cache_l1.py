"""The L1 under read leases, on the in-memory twin: a write returns only once every holder
dropped the key or its lease ran out; a planted L1 without that wait is caught."""

from __future__ import annotations

import asyncio
import time

import pytest

from nexus_bus.cache import Cache, CachePolicy, CacheUnavailable, Entry
from nexus_bus.cache.local import LocalCache
from nexus_bus.cache.memory import MemoryEntryStore
from nexus_bus.cache.notice import Notice

LEASE_S = 0.3
POLICY = CachePolicy(ttl_s=60, negative_ttl_s=10, jitter=0, local_ttl_s=LEASE_S)


class LocalPeers:
    """The NATS bus between caches of one process: revocations reach the named cache unless
    it is `paused` (a SIGSTOPped worker answers nothing)."""

    def __init__(self) -> None:
        self.caches: dict[str, Cache] = {}
        self.paused: set[str] = set()
        self.revoked: list[str] = []
        self.fencer = ""  # the cache that answers fence requests ("": nobody can)

    def join(self, cache: Cache) -> Cache:
        self.caches[cache.origin] = cache
        cache.attach(self)
        return cache

    async def fence(self, notice: Notice) -> bool:
        return bool(self.fencer) and await self.caches[self.fencer].apply_fence(notice)

    async def announce(self, notice: Notice) -> None:
        pass  # notices are best effort: the leases alone must keep the guarantee

    async def revoke(self, origin: str, notice: Notice, timeout_s: float) -> bool:
        self.revoked.append(origin)
        if origin in self.paused or origin not in self.caches:
            await asyncio.sleep(timeout_s)
            return False
        self.caches[origin].on_revoke(notice)
        return True

    async def close(self) -> None:
        pass


def pair() -> tuple[MemoryEntryStore, LocalPeers, Cache, Cache]:
    store, peers = MemoryEntryStore(), LocalPeers()
    a = peers.join(Cache(store, local=LocalCache(100), origin="a"))
    b = peers.join(Cache(store, local=LocalCache(100), origin="b"))
    return store, peers, a, b


async def never_loaded() -> Entry:
    raise AssertionError("the test expects a cached entry")


async def read(cache: Cache) -> bytes:
    return (await cache.fetch("data", "k", never_loaded, POLICY)).value


async def test_a_write_revokes_other_holders_before_it_returns() -> None:
    store, peers, a, b = pair()
    await a.write("data", "k", Entry.of(b"old", 1), POLICY)
    assert await read(b) == b"old"  # from Redis, now held
    calls = store.calls
    assert await read(b) == b"old" and store.calls == calls  # from b's L1
    started = time.monotonic()
    await a.write("data", "k", Entry.of(b"new", 2), POLICY)
    assert time.monotonic() - started < LEASE_S / 2  # acknowledged: no waiting
    assert peers.revoked == ["b"]
    assert await read(b) == b"new"


async def test_a_paused_holder_delays_a_write_by_at_most_its_lease_and_serves_nothing_stale(
) -> None:
    _, peers, a, b = pair()
    await a.write("data", "k", Entry.of(b"old", 1), POLICY)
    await read(b)
    held_at = time.monotonic()
    peers.paused.add("b")
    await a.write("data", "k", Entry.of(b"new", 2), POLICY)
    waited = time.monotonic() - held_at
    assert LEASE_S * 0.9 <= waited <= LEASE_S * 1.5 + 0.1
    assert await read(b) == b"new"  # its lease ran out before the write returned


async def test_a_read_answered_before_a_write_but_arriving_after_it_is_not_kept() -> None:
    store, _, a, b = pair()
    await a.write("data", "k", Entry.of(b"old", 1), POLICY)
    original = store.read
    gate = asyncio.Event()

    async def slow_read(*args: object, **kwargs: object) -> object:
        answer = await original(*args, **kwargs)  # type: ignore[arg-type]
        await gate.wait()  # the answer is in flight while the write completes
        return answer

    store.read = slow_read  # type: ignore[method-assign]
    in_flight = asyncio.create_task(read(b))
    await asyncio.sleep(0.01)
    await a.write("data", "k", Entry.of(b"new", 2), POLICY)
    gate.set()
    assert await in_flight == b"old"  # concurrent with the write: allowed
    store.read = original  # type: ignore[method-assign]
    assert await read(b) == b"new"  # but the old answer was not kept in the L1


async def test_a_restarted_store_makes_writes_wait_out_the_holders_it_forgot() -> None:
    store, peers, a, b = pair()
    await a.write("data", "k", Entry.of(b"old", 1), POLICY)
    await read(b)
    store.restart()  # b's read lease is forgotten with everything else
    started = time.monotonic()
    await a.write("data", "k", Entry.of(b"new", 2), POLICY)
    assert time.monotonic() - started >= LEASE_S * 0.9
    assert peers.revoked == []  # nobody to ask: the store's young epoch was the wait
    assert await read(b) == b"new"


async def test_a_write_that_cannot_reach_the_store_waits_one_lease() -> None:
    store, _, a, b = pair()
    await a.write("data", "k", Entry.of(b"old", 1), POLICY)
    await read(b)
    store.down = True
    started = time.monotonic()
    await a.write("data", "k", Entry.of(b"new", 2), POLICY)
    assert time.monotonic() - started >= LEASE_S * 0.9


@pytest.mark.parametrize("planted", [False, True], ids=["leases", "planted-no-wait"])
async def test_the_planted_bug_serves_a_stale_value(
    planted: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bug the linearizability tests must catch: an L1 whose writer skips the wait."""
    if planted:

        async def skip(*args: object) -> None:
            return None

        monkeypatch.setattr(Cache, "_revoke", skip)
    _, _, a, b = pair()
    await a.write("data", "k", Entry.of(b"old", 1), POLICY)
    await read(b)
    await a.write("data", "k", Entry.of(b"new", 2), POLICY)
    assert await read(b) == (b"old" if planted else b"new")


async def test_a_write_whose_answer_was_lost_after_it_ran_still_waits_out_the_holders() -> None:
    """The script ran (and cleared the holders) but its answer timed out; a peer fences the
    key, but nobody can name the holders any more, so the writer waits one lease."""
    store, peers, a, _ = pair()
    holder = peers.join(Cache(store, local=LocalCache(100), origin="c"))
    peers.fencer = "b"
    await a.write("data", "k", Entry.of(b"old", 1), POLICY)
    await read(holder)
    original = store.fill

    async def ran_then_lost(*args: object, **kwargs: object) -> object:
        answer = await original(*args, **kwargs)  # type: ignore[arg-type]
        if store.fill is ran_then_lost and kwargs.get("collect") and args[1].revision == 2:
            store.fill = original  # type: ignore[method-assign]
            raise CacheUnavailable("timed out after the script ran")
        return answer

    store.fill = ran_then_lost  # type: ignore[method-assign]
    started = time.monotonic()
    await a.write("data", "k", Entry.of(b"new", 2), POLICY)
    assert time.monotonic() - started >= LEASE_S * 0.9
    assert peers.revoked == []  # the holders were cleared with the lost answer
    assert await read(holder) == b"new"


async def test_a_seal_takes_every_l1_copy_back_before_the_write_and_grants_none_during_it(
) -> None:
    store, peers, a, b = pair()
    await a.write("data", "k", Entry.of(b"old", 1), POLICY)
    assert await read(b) == b"old"  # held by b
    assert await a.seal("data", "k", POLICY)
    assert peers.revoked == ["b"]  # taken back before the new value exists anywhere
    calls = store.calls
    assert await read(b) == b"old"  # the write has not happened: the old value, unheld
    assert await read(b) == b"old" and store.calls == calls + 2  # not kept in b's L1
    await a.write("data", "k", Entry.of(b"new", 2), POLICY, sealed=True)
    assert await read(b) == b"new"  # unsealed by the write: held again
    calls = store.calls
    assert await read(b) == b"new" and store.calls == calls


async def test_a_seal_lasts_until_every_sealing_write_ends_or_one_lease_passes() -> None:
    store, _, a, b = pair()
    await a.write("data", "k", Entry.of(b"v1", 1), POLICY)
    assert await a.seal("data", "k", POLICY) and await b.seal("data", "k", POLICY)
    await a.write("data", "k", Entry.of(b"v2", 2), POLICY, sealed=True)
    await read(b)
    calls = store.calls
    await read(b)
    assert store.calls == calls + 1  # b's own write still runs: not held
    await asyncio.sleep(LEASE_S * 1.1)  # b died before its write: its seal ends anyway
    await read(b)
    calls = store.calls
    await read(b)
    assert store.calls == calls  # held again


async def test_a_seal_that_waits_out_a_paused_holder_still_holds_when_the_write_goes_on(
) -> None:
    """A holder that answers nothing (SIGSTOPped) makes the seal wait out its lease, nearly a
    whole lease: the seal must outlast that wait. When it lasted one lease from its script,
    it ended while the writer still waited, a hot reader's L1 took the old value again, and
    once the write-through ran a read of the new value could be followed by that L1's old
    one: the history test_cache_linearizable forbids, where workers are SIGSTOPped."""
    store, peers = MemoryEntryStore(), LocalPeers()
    a, paused, hot, other = (
        peers.join(Cache(store, local=LocalCache(100), origin=name))
        for name in ("a", "paused", "hot", "other")
    )
    await a.write("data", "k", Entry.of(b"old", 1), POLICY)
    assert await read(paused) == b"old"  # held, for a whole lease
    peers.paused.add("paused")
    seal = asyncio.create_task(a.seal("data", "k", POLICY))
    await asyncio.sleep(LEASE_S * 0.95)  # the seal waits for `paused` to the end of its lease
    while not seal.done():  # meanwhile a hot reader, as the HTTP shim is, reads on
        assert await read(hot) == b"old"
        await asyncio.sleep(0)
    assert seal.result()
    peers.paused.add("hot")  # its revocation is handled late (a busy event loop)
    write = asyncio.create_task(a.write("data", "k", Entry.of(b"new", 2), POLICY, sealed=True))
    await asyncio.sleep(0.01)
    assert await read(other) == b"new"  # the write-through ran: the new value is visible
    assert await read(hot) == b"new"  # and no L1 goes back to the old one
    await write


async def test_a_seal_whose_answer_was_lost_after_it_ran_still_waits_out_the_holders() -> None:
    """The seal's script ran (and collected and cleared b's read lease) but its answer timed
    out: the write's own script then finds no holder, so the seal waits one lease before the
    write goes on; without that, b's L1 served the old value after the write returned."""
    store, peers, a, b = pair()
    await a.write("data", "k", Entry.of(b"old", 1), POLICY)
    assert await read(b) == b"old"  # held by b
    original = store.seal

    async def ran_then_lost(*args: object, **kwargs: object) -> object:
        await original(*args, **kwargs)  # type: ignore[arg-type]
        raise CacheUnavailable("timed out after the script ran")

    store.seal = ran_then_lost  # type: ignore[method-assign]
    started = time.monotonic()
    sealed = await a.seal("data", "k", POLICY)
    assert not sealed and time.monotonic() - started >= LEASE_S * 0.9
    await a.write("data", "k", Entry.of(b"new", 2), POLICY, sealed=sealed)
    assert peers.revoked == []  # nobody could name b any more
    assert await read(b) == b"new"


async def test_without_an_l1_or_a_store_there_is_nothing_to_seal() -> None:
    store, _, a, _ = pair()
    assert not await a.seal("data", "k", CachePolicy(ttl_s=60, local_ttl_s=0))
    store.down = True
    assert not await a.seal("data", "k", POLICY)
