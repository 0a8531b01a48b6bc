"""Guards around one backend's upstream calls: timeout, Retry-After, breaker, bulkhead.

Order of checks for a call: the backend's `Retry-After` window (a 429 told us to wait: fail
fast with 429 instead of asking again), the breaker (`circuit_open` with `Retry-After`), then
a bulkhead slot (at most `max_concurrency` calls upstream at once; the rest wait, within the
caller's deadline), then the call itself with `min(backend timeout, time left)`.

The breaker counts failures of the server (timeouts, 5xx, unreachable), not answers about
the request: a 400 or a 429 leaves it alone. Time is injected; the asyncio parts are the
semaphore and the timeout only.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from nexus_bus.ai.settings import BackendSettings
from nexus_bus.errors import (
    CircuitOpen,
    InvalidRequest,
    NexusError,
    RateLimited,
    UpstreamTimeout,
)
from nexus_bus.resilience.backoff import ExponentialBackoff, Jitter
from nexus_bus.resilience.breaker import BreakerState, CircuitBreaker

T = TypeVar("T")
Clock = Callable[[], float]


def counts_against_server(exc: NexusError) -> bool:
    """Whether a failure says the server is unwell (it feeds the breaker)."""
    return not isinstance(exc, InvalidRequest | RateLimited)


class BackendGuard:
    """Admission and bookkeeping for one backend.

    Args:
        name: the backend's name (in error details).
        settings: timeouts, bulkhead size and breaker thresholds.
        clock: monotonic seconds.
    """

    def __init__(self, name: str, settings: BackendSettings, clock: Clock = time.monotonic):
        self.name = name
        self.timeout_s = settings.timeout_s
        self._clock = clock
        self.breaker = CircuitBreaker(
            failure_threshold=settings.breaker_failures,
            reset=ExponentialBackoff(
                base_s=settings.breaker_reset_s,
                cap_s=settings.breaker_reset_max_s,
                jitter=Jitter.NONE,
            ),
            clock=clock,
        )
        self._slots = asyncio.Semaphore(settings.max_concurrency)
        self.max_concurrency = settings.max_concurrency
        self.in_flight = 0
        self._quiet_until = 0.0  # the upstream's Retry-After, as a monotonic time

    def _admit(self) -> None:
        wait = self._quiet_until - self._clock()
        if wait > 0:
            raise RateLimited(
                f"{self.name} asked us to wait (Retry-After)", retry_after=math.ceil(wait)
            )
        if not self.breaker.allow():
            raise CircuitOpen(
                f"{self.name}: too many upstream failures; failing fast",
                retry_after=max(1, math.ceil(self.breaker.retry_after_s)),
            )

    async def call(
        self,
        work: Callable[[float], Awaitable[T]],
        remaining_s: float,
        *,
        cancel_is_timeout: bool = False,
    ) -> T:
        """Run `work(timeout_s)` under the guards, within `remaining_s` of the caller's time.

        Args:
            cancel_is_timeout: a cancellation while `work` runs counts for the breaker as a
                timeout. For a call made on behalf of callers that cancel it only when all
                of them stopped waiting for it (an embedding batch, in a task of its own):
                they stop at their deadlines, so such a call did not answer in time, which
                a caller's own call would have counted when its timeout fired.

        Raises:
            RateLimited: inside the upstream's Retry-After window, or a 429 now.
            CircuitOpen: the breaker is open.
            UpstreamTimeout: no slot or no answer before the deadline.
            NexusError: whatever the backend raised, mapped.
        """
        self._admit()
        started = self._clock()
        try:
            async with asyncio.timeout(max(0.0, remaining_s)):
                await self._slots.acquire()
        except TimeoutError:
            raise UpstreamTimeout(
                f"{self.name}: all {self.max_concurrency} upstream slots busy until the deadline"
            ) from None
        self.in_flight += 1
        try:
            left = remaining_s - (self._clock() - started)
            timeout_s = max(0.001, min(self.timeout_s, left))
            try:
                async with asyncio.timeout(timeout_s):
                    result = await work(timeout_s)
            except TimeoutError:
                raise UpstreamTimeout(f"{self.name}: no answer within {timeout_s:.3f}s") from None
        except NexusError as exc:
            self._record(exc)
            raise
        except asyncio.CancelledError:
            if cancel_is_timeout:
                self._record(UpstreamTimeout(f"{self.name}: abandoned by every caller"))
            raise
        finally:
            self.in_flight -= 1
            self._slots.release()
        self.breaker.record_success()
        return result

    def _record(self, exc: NexusError) -> None:
        if isinstance(exc, RateLimited) and exc.retry_after:
            self._quiet_until = max(self._quiet_until, self._clock() + exc.retry_after)
        if counts_against_server(exc):
            self.breaker.record_failure()
        elif self.breaker.state is not BreakerState.CLOSED:
            # An answer about the request is an answer: the server is up.
            self.breaker.record_success()
