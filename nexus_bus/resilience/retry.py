"""Which outcomes may be retried, and when the next attempt may start. Pure.

Only failures that leave the operation unexecuted are retried blindly: `no_responders`
(nobody received it) and `unavailable` (the connection or a draining worker refused it).
A timeout may have run the operation, so it is retried only when running it twice is
harmless: the operation is declared idempotent, or the request carries an
`Idempotency-Key` (workers then replay instead of running again).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Final

from nexus_bus.errors import NoResponders, Unavailable, UpstreamTimeout
from nexus_bus.resilience.backoff import ExponentialBackoff, Jitter

ALWAYS_RETRYABLE: Final = frozenset({NoResponders.code, Unavailable.code})
TIMEOUT: Final = UpstreamTimeout.code
# Outcomes that say the operation's workers are unhealthy: they count against its breaker.
BREAKER_FAILURES: Final = frozenset({NoResponders.code, Unavailable.code, UpstreamTimeout.code})
# An attempt needs at least this much of the budget left to be worth sending.
MIN_ATTEMPT_S: Final = 0.005


def is_retryable(code: str, *, idempotent: bool, has_key: bool) -> bool:
    """Whether an attempt that failed with `code` may be sent again.

    Args:
        code: the stable error code of the failed attempt.
        idempotent: the operation is declared idempotent in its policy.
        has_key: the request carries an `Idempotency-Key`.
    """
    if code in ALWAYS_RETRYABLE:
        return True
    return code == TIMEOUT and (idempotent or has_key)


@dataclass(frozen=True, slots=True)
class RetrySchedule:
    """Backoff with full jitter, bounded by the number of attempts and the deadline.

    Attributes:
        attempts: tries in total, the first included.
        backoff: the delay before retry n (full jitter by default).
    """

    attempts: int
    backoff: ExponentialBackoff

    @classmethod
    def create(cls, attempts: int, base_s: float, cap_s: float, factor: float) -> RetrySchedule:
        """A schedule with full jitter (AWS's "Exponential Backoff And Jitter")."""
        backoff = ExponentialBackoff(base_s=base_s, cap_s=cap_s, factor=factor, jitter=Jitter.FULL)
        return cls(attempts, backoff)

    def delay(self, attempt: int, now: float, deadline: float, rng: random.Random) -> float | None:
        """Seconds to wait before attempt `attempt + 1`, or None when there is none.

        Args:
            attempt: the attempt that just failed (1-based).
            now: the current time, on the clock `deadline` is on.
            deadline: when the caller stops waiting.
            rng: the randomness of the jitter.
        """
        if attempt >= self.attempts:
            return None
        wait = self.backoff.compute(attempt, rng)
        if now + wait + MIN_ATTEMPT_S >= deadline:
            return None  # the retry could not finish (or even start) within the deadline
        return wait
