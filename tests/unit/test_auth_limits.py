"""The verification cache and the failure limiter: pure state with an injected clock."""

from __future__ import annotations

import pytest

from nexus_bus.auth.cache import CachedToken, VerificationCache
from nexus_bus.auth.limiter import FailureLimiter
from nexus_bus.auth.tokens import Claims
from nexus_bus.context import Principal


def entry(jti: str, checked_at: float = 0.0) -> CachedToken:
    claims = Claims(iss="i", aud="a", sub="s", scope="*", iat=0, nbf=0, exp=100, jti=jti)
    return CachedToken(claims, "k1", Principal("s", frozenset({"*"}), jti, 100), checked_at)


def test_cache_freshness_is_bounded_by_ttl() -> None:
    cache = VerificationCache(ttl_s=5, max_entries=10)
    cache.put("t1", entry("j1", checked_at=100.0))
    found = cache.get("t1")
    assert found is not None
    assert cache.is_fresh(found, 104.9)
    assert not cache.is_fresh(found, 105.0)


def test_cache_is_a_bounded_lru() -> None:
    cache = VerificationCache(ttl_s=5, max_entries=2)
    cache.put("t1", entry("j1"))
    cache.put("t2", entry("j2"))
    assert cache.get("t1") is not None  # t1 now most recently used
    cache.put("t3", entry("j3"))
    assert "t2" not in cache and "t1" in cache and "t3" in cache
    assert len(cache) == 2
    assert not cache.evict_jti("j2")  # its jti index went with it


def test_cache_evicts_by_jti_on_revocation_notice() -> None:
    cache = VerificationCache(ttl_s=5, max_entries=10)
    cache.put("t1", entry("j1"))
    assert cache.evict_jti("j1")
    assert "t1" not in cache
    assert not cache.evict_jti("j1")
    cache.put("t2", entry("j2"))
    cache.discard("t2")
    assert "t2" not in cache and not cache.evict_jti("j2")


def test_disabled_cache_remembers_nothing() -> None:
    cache = VerificationCache(ttl_s=0, max_entries=10)
    cache.put("t1", entry("j1"))
    assert not cache.enabled and "t1" not in cache


def test_limiter_throttles_after_the_burst_and_refills() -> None:
    limiter = FailureLimiter(max_failures=3, window_s=3.0)
    for _ in range(3):
        assert limiter.retry_after("ip:1", 0.0) is None
        limiter.record_failure("ip:1", 0.0)
    wait = limiter.retry_after("ip:1", 0.0)
    assert wait == pytest.approx(1.0)
    assert limiter.retry_after("ip:2", 0.0) is None  # other clients are unaffected
    assert limiter.retry_after("ip:1", 0.5) == pytest.approx(0.5)
    assert limiter.retry_after("ip:1", 1.0) is None  # one failure's worth refilled
    limiter.record_failure("ip:1", 1.0)
    assert limiter.retry_after("ip:1", 1.0) is not None
    assert limiter.retry_after("ip:1", 10.0) is None
    assert len(limiter) == 0  # fully recovered clients are forgotten


def test_limiter_failures_while_throttled_keep_it_throttled() -> None:
    limiter = FailureLimiter(max_failures=2, window_s=2.0)
    for t in (0.0, 0.0, 0.5, 1.0, 1.5):
        limiter.record_failure("c", t)
    assert limiter.retry_after("c", 1.5) is not None


def test_limiter_tracks_a_bounded_number_of_clients() -> None:
    limiter = FailureLimiter(max_failures=1, window_s=60.0, max_clients=3)
    for i in range(10):
        limiter.record_failure(f"c{i}", 0.0)
    assert len(limiter) == 3
    assert limiter.retry_after("c9", 0.0) is not None
    assert limiter.retry_after("c0", 0.0) is None
