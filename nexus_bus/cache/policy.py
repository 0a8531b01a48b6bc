"""How long entries live: TTLs with jitter, negative caching, stale-while-revalidate, leases.

Pure: the random source is passed in. Jitter spreads the expiry of keys filled together
(after a deploy or a Redis restart), so they do not all miss in the same second.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Any

from nexus_bus.cache.entries import Kind


@dataclass(frozen=True, slots=True)
class Expiry:
    """An entry's time to live in Redis, of which the last `stale_ms` are served stale."""

    ttl_ms: int
    stale_ms: int


@dataclass(frozen=True, slots=True, kw_only=True)
class CachePolicy:
    """Per-operation cache behaviour (what handlers declare).

    Attributes:
        ttl_s: how long a value is fresh.
        negative_ttl_s: how long "not found" is cached; 0 disables negative caching.
        stale_s: after `ttl_s`, how long the old value is still served while one worker
            reloads it (stale-while-revalidate); 0 disables it.
        jitter: fresh TTLs are spread by up to this fraction either way.
        local_ttl_s: keep hits in this process (L1) under a read lease this long; 0
            disables the L1. A write waits at most this long for a holder that does not
            answer. Every worker must use the same value for a namespace.
        lease_s: how long one loader holds a missing key before others may load it.
        wait_s: how long others wait for that loader before loading themselves.
        fence_ttl_s: how long a fence (left when a write could not update the entry) lives.
    """

    ttl_s: float = 3600.0
    negative_ttl_s: float = 0.0
    stale_s: float = 0.0
    jitter: float = 0.1
    local_ttl_s: float = 0.0
    lease_s: float = 2.0
    wait_s: float = 0.5
    fence_ttl_s: float = 60.0

    def __post_init__(self) -> None:
        problems = [
            name
            for name, ok in (
                ("ttl_s", self.ttl_s > 0),
                ("negative_ttl_s", self.negative_ttl_s >= 0),
                ("stale_s", self.stale_s >= 0),
                ("jitter", 0 <= self.jitter < 1),
                ("local_ttl_s", self.local_ttl_s >= 0),
                ("lease_s", self.lease_s > 0),
                ("wait_s", self.wait_s >= 0),
                ("fence_ttl_s", self.fence_ttl_s > 0),
            )
            if not ok
        ]
        if problems:
            raise ValueError(f"invalid cache policy: {', '.join(problems)}")

    def with_(self, **changes: Any) -> CachePolicy:
        """A copy with `changes` applied (keyword names as the attributes)."""
        return replace(self, **changes)

    @property
    def lease_ms(self) -> int:
        """`lease_s` in milliseconds (at least 1)."""
        return max(1, round(self.lease_s * 1000))

    @property
    def local_ms(self) -> int:
        """`local_ttl_s` in milliseconds (0: no L1)."""
        return max(1, round(self.local_ttl_s * 1000)) if self.local_ttl_s > 0 else 0

    @property
    def lifetime_s(self) -> float:
        """The longest any entry written under this policy can stay in Redis."""
        return self.ttl_s * (1 + self.jitter) + self.stale_s

    def fill_age_s(self, max_fill_age_s: float) -> float:
        """How long after its read a versioned fill under this policy may still be stored.

        At most `max_fill_age_s` (the cache settings'), and shorter than the shortest life
        of an entry the fill may race with: a tombstone, a fence, or a newer value at its
        shortest jittered TTL. Settings validation guarantees that for the settings' own
        policy; a handler's policy may live shorter, and then bounds its own fills (10%
        short of that life, which covers the rounding of TTLs to milliseconds).
        """
        shortest = min(self.fence_ttl_s, self.ttl_s * (1 - self.jitter) + self.stale_s)
        if self.caches_absence:
            shortest = min(shortest, self.negative_ttl_s * (1 - self.jitter))
        return min(max_fill_age_s, 0.9 * shortest)

    @property
    def caches_absence(self) -> bool:
        """Whether "not found" is cached."""
        return self.negative_ttl_s > 0

    def expiry(self, kind: Kind, rng: random.Random) -> Expiry:
        """Time to live for an entry of `kind`: jittered, with the stale window on values only.

        Args:
            kind: what is stored.
            rng: the random source for the jitter.
        """
        if kind is Kind.FENCE:
            return Expiry(_ms(self.fence_ttl_s), 0)
        base = self.ttl_s if kind is Kind.VALUE else self.negative_ttl_s
        fresh = base * (1 + rng.uniform(-self.jitter, self.jitter))
        if kind is Kind.VALUE and self.stale_s > 0:
            stale = _ms(self.stale_s)
            return Expiry(_ms(fresh) + stale, stale)
        return Expiry(_ms(fresh), 0)


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))
