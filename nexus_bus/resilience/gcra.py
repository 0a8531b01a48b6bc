"""GCRA (the generic cell rate algorithm): a rate limit as one timestamp per client. Pure.

Each client has a theoretical arrival time (TAT). A request at `now` is allowed when
`max(tat, now) + interval - now <= burst * interval`; then TAT moves on by one interval.
`decide` is the reference; `GCRA_LUA` runs the same arithmetic inside Redis (one script,
one key, atomic), so every replica shares one limit.

Both take a quantity: `want` requests arriving at once get as many as fit (at least one, or
none and a refusal), exactly what `want` single requests at the same instant would get. A
replica reserves a batch of tokens this way and hands them out itself (`lease.QuotaLease`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True, slots=True)
class RateLimit:
    """`rate` requests per second, up to `burst` at once."""

    rate: float
    burst: int

    @classmethod
    def of(cls, rate: float, burst: int) -> RateLimit:
        """A limit; a burst of 0 means one second's worth (at least 1)."""
        return cls(rate, burst if burst > 0 else max(1, math.ceil(rate)))

    @property
    def interval_ms(self) -> float:
        """Milliseconds between requests at the steady rate."""
        return 1000.0 / self.rate

    @property
    def window_s(self) -> int:
        """Seconds for an empty allowance to refill (the `w` of `RateLimit-Policy`)."""
        return max(1, math.ceil(self.burst / self.rate))

    def policy_header(self, name: str) -> str:
        """`RateLimit-Policy` (draft-ietf-httpapi-ratelimit-headers): quota per window."""
        return f'"{name}";q={self.burst};w={self.window_s}'


# Floating-point slack when counting whole intervals (a rate of 3/s has an inexact interval).
_SLACK: Final = 1e-9


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome for one request (or a batch); times in milliseconds."""

    allowed: bool
    remaining: int
    retry_after_ms: float  # 0 when allowed
    reset_ms: float  # until the whole burst is available again
    tat_ms: float  # the new theoretical arrival time to store
    granted: int = 1  # requests admitted (0 when refused; at most the `want` asked for)

    def header(self, name: str) -> str:
        """`RateLimit` (draft-ietf-httpapi-ratelimit-headers): remaining quota and reset."""
        return f'"{name}";r={self.remaining};t={math.ceil(self.reset_ms / 1000)}'


def decide(limit: RateLimit, tat_ms: float | None, now_ms: float, want: int = 1) -> Decision:
    """Whether requests at `now_ms` fit, given the stored TAT (None: a new client).

    Args:
        limit: the rate and burst.
        tat_ms: the stored theoretical arrival time.
        now_ms: the time of the request(s).
        want: how many requests arrive at once; as many as fit are granted.
    """
    interval = limit.interval_ms
    tolerance = interval * limit.burst
    tat = max(tat_ms if tat_ms is not None else now_ms, now_ms)
    fits = math.floor((tolerance - (tat - now_ms)) / interval + _SLACK)
    if fits < 1:
        retry = tat + interval - now_ms - tolerance
        return Decision(False, 0, retry, tat - now_ms, tat, 0)
    granted = min(max(1, want), fits)
    new_tat = tat + granted * interval
    return Decision(True, fits - granted, 0.0, new_tat - now_ms, new_tat, granted)


# KEYS: the client's key. ARGV: interval ms, burst, want (default 1). Server time, so
# replicas' clocks do not matter. Returns {granted (0: refused), remaining, retry after ms,
# reset ms} (as strings: Lua numbers become integers on the way out).
GCRA_LUA: Final = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local interval = tonumber(ARGV[1])
local tolerance = interval * tonumber(ARGV[2])
local want = math.max(1, tonumber(ARGV[3]) or 1)
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local fits = math.floor((tolerance - (tat - now)) / interval + 1e-9)
if fits < 1 then
  return {0, 0, tostring(tat + interval - now - tolerance), tostring(tat - now)}
end
local granted = math.min(want, fits)
local new_tat = tat + granted * interval
redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.ceil(new_tat - now) + 1000)
return {granted, fits - granted, '0', tostring(new_tat - now)}
"""
