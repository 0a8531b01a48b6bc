"""Exponential backoff with jitter: how long to wait before attempt number `n`.

Pure: randomness is injected, nothing sleeps here. Callers (breakers, retry loops, job
redelivery) ask `compute(attempt, rng)` and do the waiting themselves.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import StrEnum

# 2**64 times any sane base is past every cap; stopping the exponent here avoids
# OverflowError for absurd attempt numbers.
_MAX_EXPONENT = 64
_DEFAULT_RNG = random.Random()


class Jitter(StrEnum):
    """How randomness spreads the delay (AWS Architecture Blog, "Exponential Backoff And Jitter").

    `full` spreads retries of many clients the most and is the default; `equal` keeps at
    least half of the delay; `none` is deterministic.
    """

    NONE = "none"
    FULL = "full"
    EQUAL = "equal"


@dataclass(frozen=True, slots=True, kw_only=True)
class ExponentialBackoff:
    """`base_s * factor**(attempt - 1)`, capped at `cap_s`, then jittered.

    Attributes:
        base_s: the ceiling of the first delay.
        cap_s: no delay is ever longer.
        factor: growth per attempt.
        jitter: how randomness is applied under the ceiling.
    """

    base_s: float = 0.1
    cap_s: float = 10.0
    factor: float = 2.0
    jitter: Jitter = Jitter.FULL

    def __post_init__(self) -> None:
        if self.base_s < 0 or self.cap_s < 0:
            raise ValueError("backoff delays must not be negative")
        if self.factor < 1:
            raise ValueError("backoff factor must be at least 1")

    def ceiling(self, attempt: int) -> float:
        """The un-jittered delay before `attempt` (1 = the first retry)."""
        exponent = min(max(attempt, 1) - 1, _MAX_EXPONENT)
        return min(self.cap_s, self.base_s * self.factor**exponent)

    def compute(self, attempt: int, rng: random.Random | None = None) -> float:
        """The delay in seconds before `attempt` (1-based; values below 1 count as 1).

        Args:
            attempt: which retry this is.
            rng: the random source; a module-wide one when omitted.
        """
        top = self.ceiling(attempt)
        source = rng or _DEFAULT_RNG
        match self.jitter:
            case Jitter.NONE:
                return top
            case Jitter.EQUAL:
                return top / 2 + source.uniform(0, top / 2)
            case _:
                return source.uniform(0, top)
