"""Brute-force protection: a token bucket of authentication failures per client. Pure.

Each client may fail `max_failures` times in a burst; the allowance refills evenly over
`window_s`. A client with no allowance left is throttled: new, unproven tokens from it are
refused with 429 before any verification work. Tokens already proven (in the verification
cache) still pass, so a brute-forcer sharing an address with a valid client does not lock
that client out. Only failures are counted: successful requests cost nothing here.

The state is per process and bounded: at most `max_clients` buckets, least recently failed
dropped first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from nexus_bus.config import AuthSettings


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class FailureLimiter:
    """Counts authentication failures per client key and says when to throttle."""

    def __init__(self, *, max_failures: int, window_s: float, max_clients: int = 10_000) -> None:
        """Create a limiter.

        Args:
            max_failures: failures a client may have in a burst before it is throttled.
            window_s: time for a spent allowance to refill completely.
            max_clients: clients tracked at once.
        """
        self.capacity = float(max_failures)
        self.rate = max_failures / window_s
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    @classmethod
    def from_settings(cls, auth: AuthSettings) -> FailureLimiter:
        """The limiter configured in `auth`."""
        return cls(
            max_failures=auth.rate_limit_failures,
            window_s=auth.rate_limit_window_s,
            max_clients=auth.rate_limit_clients,
        )

    def __len__(self) -> int:
        return len(self._buckets)

    def retry_after(self, client: str, now: float) -> float | None:
        """Seconds until `client` may try an unproven token again; None when not throttled."""
        bucket = self._buckets.get(client)
        if bucket is None:
            return None
        tokens = self._refill(bucket, now)
        if tokens >= 1:
            if tokens >= self.capacity:
                del self._buckets[client]  # fully recovered: stop tracking
            return None
        return (1 - tokens) / self.rate

    def record_failure(self, client: str, now: float) -> None:
        """Spend one unit of `client`'s allowance."""
        bucket = self._buckets.get(client)
        if bucket is None:
            bucket = _Bucket(self.capacity, now)
            self._buckets[client] = bucket
        bucket.tokens = max(0.0, self._refill(bucket, now) - 1)
        bucket.updated = now
        self._buckets.move_to_end(client)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)

    def _refill(self, bucket: _Bucket, now: float) -> float:
        elapsed = max(0.0, now - bucket.updated)
        bucket.tokens = min(self.capacity, bucket.tokens + elapsed * self.rate)
        bucket.updated = now
        return bucket.tokens

