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
any window, never in the long run, whatever the number of replicas. A limit with a rate or
a burst under 20 is not leased at all (`batch_max == 1`): every request asks Redis, exactly
as without leasing.

The batch follows demand: it starts at one, and each reservation asks for what the current
batch's spending rate would use in half of `hold_s` (at most four times what it spent and
`batch_max`), so a batch usually runs out before it expires and little is dropped. When a
batch is half spent, the next one is reserved ahead (`low`): half a batch (a quarter of
`hold_s` at a steady rate) leaves the call time to come back, so requests at a steady rate
do not wait for the shared store at all.

    lease = QuotaLease(limit, name)
    if lease.take(now):
        if lease.low:  # in the background: reserve the next batch ahead
            lease.refilling()
            ...  # granted = reserve up to lease.want(now); lease.granted(granted, now, spend=False)
    else:
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

    Two generations at most: the tokens being spent, and a `spare` batch reserved ahead when
    they run low (`low`), each dropped `hold_s` after its reservation began, so a steady
    stream of requests never waits for the shared store.

    Args:
        limit: the shared limit (its plan: `LeasePlan.of(limit)`).
        name: the shared limit's key (opaque here).

    Attributes:
        low: the tokens being spent are down to half their batch and nothing is on
            its way: time to reserve the next batch ahead (`refilling`, then `granted` with
            `spend=False`).
    """

    __slots__ = (
        "_expires", "_low_water", "_spare", "_spare_expires", "_started", "_tokens", "_used",
        "limit", "low", "name", "plan",
    )

    def __init__(self, limit: RateLimit, name: str) -> None:
        self.limit = limit
        self.plan = LeasePlan.of(limit)
        self.name = name
        self.low = False
        self._tokens = 0  # reserved and not yet handed out
        self._expires = 0.0  # unspent tokens are dropped from then on
        self._low_water = -1  # `low` once `_tokens` is down to this (-1: never)
        self._spare = 0  # the next batch, reserved ahead
        self._spare_expires = 0.0
        self._started = 0.0  # when the current batch was reserved (or taken up)
        self._used = 0  # tokens handed out from the current batch

    @property
    def tokens(self) -> int:
        """Tokens left in the current batch (expired ones included until replaced)."""
        return self._tokens

    def take(self, now: float) -> bool:
        """Hand out one reserved token; False when none is left or the lease expired."""
        if self._tokens > 0 and now < self._expires:
            self._tokens -= 1
            self._used += 1
            self.low = self._tokens <= self._low_water
            return True
        if self._spare > 0 and now < self._spare_expires:
            self._begin(self._spare, self._spare_expires, now)
            self._spare = 0
            return self.take(now)
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
        # The rate the current batch is spent at (over its life at most: it expired then).
        span = max(min(elapsed, hold), hold * _MIN_SPAN)
        return max(1, min(plan.batch_max, math.ceil(self._used * hold / 2 / span - _SLACK)))

    def idle(self, now: float) -> bool:
        """Whether nothing was reserved for two hold times: the lease holds nothing worth
        keeping (its tokens expired, its demand estimate is stale)."""
        return now - self._started >= 2 * self.plan.hold_s and now >= self._spare_expires

    def refilling(self) -> None:
        """A reservation ahead was started: no other until this batch is replaced."""
        self._low_water = -1
        self.low = False

    def granted(self, count: int, started: float, *, spend: bool = True) -> None:
        """`count` tokens (at least one) were reserved by a call begun at `started`.

        Args:
            count: tokens the shared limit granted.
            started: when the call began (tokens are dropped `hold_s` after it).
            spend: the caller is a request that spends one at once; False: a reservation
                ahead, kept as the spare batch.
        """
        expires = started + self.plan.hold_s
        if not spend:
            self._spare, self._spare_expires = count, expires
            return
        self._spare = 0
        self._begin(count - 1, expires, started)
        self._used = 1

    def _begin(self, tokens: int, expires: float, now: float) -> None:
        """Make `tokens` the batch being spent (what was left of the previous is dropped)."""
        self._tokens = tokens
        self._expires = expires
        self._started = now
        self._used = 0
        self._low_water = (tokens + 1) // 2 if self.plan.batch_max > 1 else -1
        self.low = False
