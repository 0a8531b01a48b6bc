"""Pure parts of the cache: the accept rule, key names, TTL policy, floors and the L1."""

from __future__ import annotations

import random

import pytest
from redis.crc import key_slot

from nexus_bus.cache.entries import Entry, Kind, accepts
from nexus_bus.cache.floors import Floors
from nexus_bus.cache.keys import CacheKey, build_key, is_under
from nexus_bus.cache.local import LocalCache
from nexus_bus.cache.policy import CachePolicy
from nexus_bus.config import CacheSettings


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


V5, V7 = Entry.of(b"five", 5), Entry.of(b"seven", 7)


@pytest.mark.parametrize(
    ("current", "incoming", "expected"),
    [
        (None, V5, True),
        (V5, V7, True),  # newer revision wins
        (V7, V5, False),  # a late fill of an older revision loses
        (V5, Entry.of(b"five", 5), True),  # same revision refreshes
        (Entry.absent(8), V7, False),  # a tombstone outranks the value it deleted
        (Entry.fence(7), V7, True),  # the write's own value replaces its fence
        (V7, Entry.fence(7), False),  # a fence never hides the value it was fencing
        (Entry.fence(7), Entry.fence(7), True),
        (Entry.fence(9), Entry.absent(9), True),
        (Entry.absent(0), Entry.of(b"x", 0), False),  # unversioned: kinds do not replace
    ],
)
def test_accept_rule(current: Entry | None, incoming: Entry, expected: bool) -> None:
    assert accepts(current, incoming) is expected


def test_an_unversioned_write_replaces_any_entry_where_a_fill_would_not() -> None:
    value = Entry.of(b"x", 0)
    for current in (Entry.absent(0), Entry.fence(0), Entry.of(b"y", 0), V7):
        assert accepts(current, value, write=True), current
    assert not accepts(Entry.absent(0), value)  # a fill keeps the cached absence
    assert not accepts(V7, V5, write=True)  # versioned writes keep the revision order


def test_entry_and_lease_share_a_cluster_slot_even_with_braces_in_the_key() -> None:
    for key in ["users.42", "a{b}c", "}x", "{", "{}", "x}{y"]:
        ck = build_key("nexus:cache", "data", key)
        assert key_slot(ck.entry.encode()) == key_slot(ck.lease.encode()), key
        assert is_under("nexus:cache", ck.entry)
    assert build_key("p", "data", "k") == CacheKey(
        "p:data:{k}", "p:data:{k}:lease", "p:data:{k}:holders"
    )
    assert build_key("p", "data", "a{b}") != build_key("p", "data", "a{c}")
    assert not is_under("nexus:cache", "other:data:{k}")


@pytest.mark.parametrize(
    ("namespace", "key"), [("Data", "k"), ("a.b", "k"), ("data", ""), ("data", "x" * 1025)]
)
def test_bad_namespaces_and_keys_are_refused(namespace: str, key: str) -> None:
    with pytest.raises(ValueError):
        build_key("p", namespace, key)


def test_ttls_are_jittered_within_bounds_and_stale_window_added() -> None:
    policy = CachePolicy(ttl_s=100, jitter=0.2, stale_s=10, negative_ttl_s=5, fence_ttl_s=60)
    rng = random.Random(1)
    values = [policy.expiry(Kind.VALUE, rng) for _ in range(300)]
    assert all(80_000 + 10_000 <= e.ttl_ms <= 120_000 + 10_000 for e in values)
    assert {e.stale_ms for e in values} == {10_000}
    assert len({e.ttl_ms for e in values}) > 100  # actually spread
    negatives = [policy.expiry(Kind.ABSENT, rng) for _ in range(100)]
    assert all(4_000 <= e.ttl_ms <= 6_000 and e.stale_ms == 0 for e in negatives)
    assert policy.expiry(Kind.FENCE, rng).ttl_ms == 60_000
    assert policy.lifetime_s == pytest.approx(130)


def test_policy_validation_lists_every_problem() -> None:
    with pytest.raises(ValueError, match="ttl_s, jitter"):
        CachePolicy(ttl_s=0, jitter=1.5)
    assert CachePolicy().with_(ttl_s=5).ttl_s == 5


def test_settings_require_every_jittered_ttl_to_outlive_a_fill() -> None:
    """A tombstone or a value lives its TTL less the jitter at the shortest; a fill that
    raced with it is refused only `max_fill_age_s` after its read."""
    base = {"max_fill_age_s": 5.0, "jitter": 0.1}
    with pytest.raises(ValueError, match="negative_ttl_s"):
        CacheSettings(negative_ttl_s=5.2, **base)  # 4.68 s at the shortest
    with pytest.raises(ValueError, match="ttl_s less its jitter"):
        CacheSettings(ttl_s=5.2, stale_s=0, **base)
    CacheSettings(negative_ttl_s=5.6, **base)  # 5.04 s
    CacheSettings(negative_ttl_s=0, ttl_s=5.2, stale_s=1, **base)  # no negative cache; 5.68 s


def test_floors_raise_meet_expire_and_repair() -> None:
    clock = FakeClock()
    floors = Floors(clock=clock)
    floors.raise_floor("k", 7, lifetime_s=10, fence_ttl_ms=1000)
    floors.raise_floor("k", 5, lifetime_s=10, fence_ttl_ms=1000)  # never lowered
    assert floors.minimum("k") == 7
    floors.met("k", 6)
    assert floors.minimum("k") == 7
    floors.met("k", 7)
    assert floors.minimum("k") == 0
    floors.raise_floor("u", 0, lifetime_s=10, fence_ttl_ms=1000)  # unversioned: distrust rev 0
    assert floors.minimum("u") == 1
    floors.met("u", 0)
    assert floors.minimum("u") == 1
    [(key, floor)] = floors.pending()
    floors.raise_floor("u", 0, lifetime_s=20, fence_ttl_ms=1000)  # replaced meanwhile
    floors.repaired(key, floor)
    assert floors.minimum("u") == 1
    clock.now += 21
    assert floors.minimum("u") == 0 and floors.pending() == []


def test_floor_overflow_distrusts_the_cache_for_one_lifetime() -> None:
    clock = FakeClock()
    floors = Floors(max_keys=2, clock=clock)
    floors.raise_floor("a", 1, lifetime_s=5, fence_ttl_ms=1)
    floors.raise_floor("b", 1, lifetime_s=5, fence_ttl_ms=1)
    assert not floors.distrusted
    floors.raise_floor("c", 1, lifetime_s=30, fence_ttl_ms=1)
    assert floors.distrusted and len(floors) == 2
    clock.now += 6  # a and b expired: room again, but c was lost, so distrust remains
    assert floors.distrusted
    clock.now += 25
    assert not floors.distrusted


def test_local_cache_lru_ttl_and_revision_order() -> None:
    clock = FakeClock()
    local = LocalCache(2, clock=clock)

    def put(key: str, entry: Entry, ttl: float = 10) -> bool:
        return local.put(key, entry, read_at=clock.now, expires_at=clock.now + ttl)

    put("a", V5)
    put("a", Entry.of(b"old", 3))  # never replaced by an older revision
    assert local.get("a") == V5
    put("b", V7)
    local.get("a")
    put("c", V7)  # evicts b, the least recently used
    assert local.get("b") is None and local.get("a") == V5
    clock.now += 11
    assert local.get("a") is None
    put("c", V7)
    local.drop("c")
    assert local.get("c") is None
    with pytest.raises(ValueError):
        LocalCache(0)


def test_local_cache_is_bounded_by_bytes() -> None:
    clock = FakeClock()
    local = LocalCache(1000, max_bytes=3 * 1300, clock=clock)
    for n in range(5):
        now = clock.now
        assert local.put(f"k{n}", Entry.of(b"x" * 1000, 1), read_at=now, expires_at=now + 10)
    assert len(local) == 3 and local.nbytes <= 3 * 1300
    assert local.get("k0") is None and local.get("k4") is not None


def test_local_cache_refuses_entries_read_before_a_revocation_or_past_their_lease() -> None:
    clock = FakeClock()
    local = LocalCache(10, max_revocations=2, clock=clock)
    read_at = clock.now
    clock.now += 0.1
    local.drop("k")  # a writer revoked k while the read was in flight
    assert not local.put("k", V5, read_at=read_at, expires_at=read_at + 1)
    clock.now += 0.1
    assert local.put("k", V5, read_at=clock.now, expires_at=clock.now + 1)  # read afterwards
    assert not local.put("j", V5, read_at=0, expires_at=clock.now)  # lease already over
    late = clock.now
    for key in ("x", "y", "z"):  # more revocations than remembered: everything older refused
        local.drop(key)
    assert len(local) == 0
    assert not local.put("k", V7, read_at=late, expires_at=late + 5)
    clock.now += 0.1
    assert local.put("k", V7, read_at=clock.now, expires_at=clock.now + 5)


def test_a_revocation_is_remembered_for_a_read_in_flight_before_any_entry_was_kept() -> None:
    clock = FakeClock()
    local = LocalCache(10, clock=clock)
    local.expect(1.0)  # the first read of this L1 is sent, with a 1 s lease
    read_at = clock.now
    clock.now += 0.1
    local.drop("k")  # a writer revokes k
    clock.now += 0.1
    local.drop("j")  # and another key: k's revocation must not be forgotten yet
    assert not local.put("k", V5, read_at=read_at, expires_at=read_at + 1.0)
