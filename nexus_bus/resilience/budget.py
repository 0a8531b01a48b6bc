"""A retry budget: retries stay under a share of requests, so an outage is not multiplied. Pure.

Every request deposits `ratio` of a token and every retry spends a whole one (Finagle's and
gRPC's retry budgets; Envoy's `retry_budget` bounds active retries the same way). A floor of
`min_per_s` tokens a second keeps a little traffic retrying even when requests are rare.
The balance is capped, so a long quiet spell does not bank a burst of retries.

    budget = RetryBudget(ratio=0.2, min_per_s=1.0, clock=time.monotonic)
    budget.deposit()            # once per request
    if budget.withdraw(): ...   # once per retry; False: the budget is spent, do not retry
"""

from __future__ import annotations

import time
from collections.abc import Callable

Clock = Callable[[], float]


class RetryBudget:
    """Token accounting of retries against requests, for one operation.

    Args:
        ratio: the share of requests that may be retried (0.2: one retry per five requests).
        min_per_s: retries allowed per second whatever the request count.
        cap: the most tokens ever held (default: 10 retries, or one second of the floor).
        clock: monotonic seconds.
    """

    __slots__ = ("_balance", "_cap", "_clock", "_min_per_s", "_ratio", "_updated")

    def __init__(
        self,
        *,
        ratio: float = 0.2,
        min_per_s: float = 1.0,
        cap: float | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        if not 0 <= ratio <= 1 or min_per_s < 0:
            raise ValueError("ratio must be 0 to 1 and min_per_s not negative")
        self._ratio = ratio
        self._min_per_s = min_per_s
        self._cap = cap if cap is not None else max(10.0, min_per_s)
        self._clock = clock
        self._balance = min(self._cap, min_per_s)  # one second of the floor to start with
        self._updated = clock()

    @property
    def balance(self) -> float:
        """Tokens available now (one token is one retry)."""
        self._refill()
        return self._balance

    def deposit(self) -> None:
        """Count one request (a first attempt): it earns `ratio` of a retry."""
        balance = self._balance + self._ratio  # per request: no `min` call
        self._balance = balance if balance < self._cap else self._cap

    def withdraw(self) -> bool:
        """Spend one retry; False (and nothing spent) when the budget cannot pay for it."""
        self._refill()
        if self._balance < 1 - 1e-9:  # ten deposits of 0.2 add up to 1.9999999999999998
            return False
        self._balance = max(0.0, self._balance - 1)
        return True

    def _refill(self) -> None:
        if not self._min_per_s:
            return
        now = self._clock()
        elapsed = now - self._updated
        self._updated = now
        if elapsed > 0:
            self._balance = min(self._cap, self._balance + elapsed * self._min_per_s)
