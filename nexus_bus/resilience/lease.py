"""Quota leasing: a replica's batch of tokens from a shared GCRA limit, spent locally. Pure.

Checking a shared limit costs a round trip to Redis per request. Far from the limit that
round trip only ever says yes, so a replica reserves several tokens in one call (GCRA with a
quantity, `gcra.decide(want=n)`) and hands them out itself until they run out or `hold_s`
passes; tokens still unspent then are dropped, never returned.

Why the limit still holds: every admitted request spends a token the shared GCRA granted at
most `hold_s` before. Grants conform to GCRA(rate, burst), so in any window of length T at
most `burst + rate * T` are granted, and the requests admitted in it were granted within
`T + hold_s`: at most `burst + rate * (T + hold_s)`. `LeasePlan.of` keeps
`rate * hold_s <= burst / 10`, so the limit is exceeded by at most a tenth of its burst in
any window, never in the long run, whatever the number of replicas. A limit whose tenth of
a burst is under two requests is not leased at all (`batch_max == 1`): every request asks
Redis, exactly as without leasing.

The batch follows demand: it starts at one, and each reservation asks for what the last
lease's spending rate would use in half of `hold_s` (at most four times the last batch and
`batch_max`), so a lease usually runs out before it expires and little is dropped.

    lease = QuotaLease(limit, name)
    if not lease.take(now):
        want = lease.want(now)
        granted = ...  # reserve up to `want` from the shared GCRA (0: over the limit)
        if granted:
            lease.granted(granted, now)  # `now` taken before the call: a conservative expiry
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

from nexus_bus.resilience.gcra import RateLimit

# The longest a leased token may wait to be spent.
MAX_HOLD_S: Final = 0.1
# The share of a burst that leased tokens may add to it, in any window.
BURST_SHARE: Final = 0.1
# Rate projections look at no less than this share of `hold_s` (bounds growth per lease).
_MIN_SPAN: Final = 1 / 8
_SLACK: Final = 1e-9


@dataclass(frozen=True, slots=True)
class LeasePlan:
    """How much of a limit one replica may reserve at once, and for how long.

    Attributes:
        batch_max: the most tokens one reservation asks for (1: no leasing).
        hold_s: how long reserved tokens may be spent.
    """

    batch_max: int
    hold_s: float

    @classmethod
    def of(cls, limit: RateLimit) -> LeasePlan:
        """The plan of `limit`: `rate * hold_s <= burst * BURST_SHARE`, `hold_s <= 0.1`."""
        hold_s = min(MAX_HOLD_S, BURST_SHARE * limit.burst / limit.rate)
        return cls(max(1, math.floor(limit.rate * hold_s + _SLACK)), hold_s)


class QuotaLease:
    """Tokens reserved from one shared limit (one subject and op), handed out locally.

    Args:
        limit: the shared limit (its plan: `LeasePlan.of(limit)`).
        name: the shared limit's key (opaque here).
    """

    __slots__ = ("_expires", "_started", "_tokens", "_used", "limit", "name", "plan")

    def __init__(self, limit: RateLimit, name: str) -> None:
        self.limit = limit
        self.plan = LeasePlan.of(limit)
        self.name = name
        self._tokens = 0  # reserved and not yet handed out
        self._expires = 0.0  # unspent tokens are dropped from then on
        self._started = 0.0  # when the current lease was reserved
        self._used = 0  # tokens handed out from the current lease

    @property
    def tokens(self) -> int:
        """Tokens left in the lease (expired ones included until the next reservation)."""
        return self._tokens

    def take(self, now: float) -> bool:
        """Hand out one reserved token; False when none is left or the lease expired."""
        if self._tokens > 0 and now < self._expires:
            self._tokens -= 1
            self._used += 1
            return True
        return False

    def want(self, now: float) -> int:
        """How many tokens the next reservation should ask for (1 to `batch_max`)."""
        plan = self.plan
        if plan.batch_max == 1:
            return 1
        hold = plan.hold_s
        elapsed = now - self._started
        if self._used == 0 or elapsed >= 2 * hold:
            return 1  # nothing spent yet, or idle since: demand unknown, start small
        # The rate the last lease was spent at (over its life at most: it expired then).
        span = max(min(elapsed, hold), hold * _MIN_SPAN)
        return max(1, min(plan.batch_max, math.ceil(self._used * hold / 2 / span - _SLACK)))

    def idle(self, now: float) -> bool:
        """Whether nothing was reserved for two hold times: the lease holds nothing worth
        keeping (its tokens expired, its demand estimate is stale)."""
        return now - self._started >= 2 * self.plan.hold_s

    def granted(self, count: int, started: float) -> None:
        """`count` tokens (at least one) were reserved by a call begun at `started`; the
        caller spends one of them at once. Unspent tokens of the previous lease are dropped.
        """
        self._tokens = count - 1
        self._started = started
        self._expires = started + self.plan.hold_s
        self._used = 1
