"""GCRA (the generic cell rate algorithm): a rate limit as one timestamp per client. Pure.

Each client has a theoretical arrival time (TAT). A request at `now` is allowed when
`max(tat, now) + interval - now <= burst * interval`; then TAT moves on by one interval.
`decide` is the reference; `GCRA_LUA` runs the same arithmetic inside Redis (one script,
one key, atomic), so every replica shares one limit.
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


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome for one request; times in milliseconds."""

    allowed: bool
    remaining: int
    retry_after_ms: float  # 0 when allowed
    reset_ms: float  # until the whole burst is available again
    tat_ms: float  # the new theoretical arrival time to store

    def header(self, name: str) -> str:
        """`RateLimit` (draft-ietf-httpapi-ratelimit-headers): remaining quota and reset."""
        return f'"{name}";r={self.remaining};t={math.ceil(self.reset_ms / 1000)}'


def decide(limit: RateLimit, tat_ms: float | None, now_ms: float) -> Decision:
    """Whether a request at `now_ms` fits, given the stored TAT (None: a new client)."""
    interval = limit.interval_ms
    tolerance = interval * limit.burst
    tat = max(tat_ms if tat_ms is not None else now_ms, now_ms)
    new_tat = tat + interval
    if new_tat - now_ms > tolerance:
        retry = new_tat - now_ms - tolerance
        return Decision(False, 0, retry, tat - now_ms, tat)
    remaining = int((tolerance - (new_tat - now_ms)) // interval)
    return Decision(True, remaining, 0.0, new_tat - now_ms, new_tat)


# KEYS: the client's key. ARGV: interval ms, burst. Server time, so replicas' clocks do not
# matter. Returns {allowed 0/1, remaining, retry after ms, reset ms} (as strings: Lua
# numbers become integers on the way out).
GCRA_LUA: Final = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local interval = tonumber(ARGV[1])
local tolerance = interval * tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local new_tat = tat + interval
if new_tat - now > tolerance then
  return {0, 0, tostring(new_tat - now - tolerance), tostring(tat - now)}
end
redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.ceil(new_tat - now) + 1000)
local remaining = math.floor((tolerance - (new_tat - now)) / interval)
return {1, remaining, '0', tostring(new_tat - now)}
"""
