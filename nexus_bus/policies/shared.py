"""Breaker state shared by every gateway replica, through one Redis hash.

`nexus:breakers` maps an op to the wall-clock time (epoch ms) its breaker is open until.
A replica whose breaker opens writes its entry; one whose probe succeeds deletes it. Every
replica reads the whole hash every `sync_interval_ms` (250 ms by default) in a background
task, so a breaker opened through one shim is open on the others well within a second,
and the request path never waits on Redis. One hash (one key) keeps this legal on Redis
Cluster.

When Redis cannot be reached, each replica keeps acting on its own breakers: the failure is
counted (`nexus_shared_state_failures_total{store="breakers"}`) and logged once per outage.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

from nexus_bus.constants import BREAKERS_KEY
from nexus_bus.observability import METRICS, logger
from nexus_bus.policies.guard import Guard
from nexus_bus.redis_client import RedisClient

_STORE: Final = "breakers"
_WRITE_TIMEOUT_S: Final = 0.5


class StoreHealth:
    """Counts failures of a shared store and logs the first of each outage only."""

    def __init__(self, store: str) -> None:
        self.store = store
        self.failing = False

    def failed(self, exc: BaseException) -> None:
        """One call failed."""
        METRICS.shared_state_failures.labels(self.store).inc()
        if not self.failing:
            self.failing = True
            logger.warning(
                "shared {} store unreachable ({}); each replica acts on its own state",
                self.store, type(exc).__name__,
            )

    def succeeded(self) -> None:
        """One call worked."""
        if self.failing:
            self.failing = False
            logger.info("shared {} store reachable again", self.store)


class BreakerSync:
    """Publishes this replica's breaker transitions and adopts the others'.

    Args:
        guard: the breakers to keep in step.
        redis: the shared store.
        interval_s: how often the hash is read.
        wall_clock: epoch seconds (entries are compared across machines).
    """

    def __init__(
        self,
        guard: Guard,
        redis: RedisClient,
        *,
        interval_s: float = 0.25,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._guard = guard
        self._redis = redis
        self._interval_s = interval_s
        self._wall = wall_clock
        self._present: set[str] = set()  # ops with an entry at the last read
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._writes: set[asyncio.Task[None]] = set()
        self.health = StoreHealth(_STORE)

    def start(self) -> None:
        """Start the background reader (inside the running event loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Stop the reader and wait for pending writes (briefly; never unbounded)."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            # Bounded: a cancellation that lands as an asyncio.timeout expires can be turned
            # into TimeoutError (Python 3.11) and swallowed; `_stopping` ends the loop then.
            await asyncio.wait({self._task}, timeout=_WRITE_TIMEOUT_S + self._interval_s)
            self._task = None
        if self._writes:
            await asyncio.wait(self._writes, timeout=_WRITE_TIMEOUT_S)

    # -- BreakerPublisher ----------------------------------------------------------------

    def opened(self, op: str, seconds: float) -> None:
        """See `BreakerPublisher.opened`: write `op`'s entry in the background."""
        until_ms = int((self._wall() + seconds) * 1000)
        self._spawn(self._redis.hset(BREAKERS_KEY, op, str(until_ms)))

    def closed(self, op: str) -> None:
        """See `BreakerPublisher.closed`: delete `op`'s entry in the background."""
        self._spawn(self._redis.hdel(BREAKERS_KEY, op))

    def _spawn(self, call: Awaitable[Any]) -> None:
        task = asyncio.get_running_loop().create_task(self._write(call))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, call: Awaitable[Any]) -> None:
        try:
            async with asyncio.timeout(_WRITE_TIMEOUT_S):
                await call
        except Exception as exc:  # every redis-py failure: counted, this replica carries on
            self.health.failed(exc)
        else:
            self.health.succeeded()

    # -- reading -------------------------------------------------------------------------

    async def sync_once(self) -> None:
        """Read the hash once and adopt what it says.

        Raises:
            Exception: whatever redis-py raised (the loop counts and logs it).
        """
        async with asyncio.timeout(max(self._interval_s, _WRITE_TIMEOUT_S)):
            raw: dict[Any, Any] = await self._redis.hgetall(BREAKERS_KEY)
        now_ms = self._wall() * 1000
        present: set[str] = set()
        for key, value in raw.items():
            op = key.decode() if isinstance(key, bytes) else str(key)
            text = value.decode() if isinstance(value, bytes) else str(value)
            present.add(op)
            try:
                until_ms = int(text)
            except ValueError:
                continue
            if until_ms > now_ms:
                self._guard.apply_remote(op, (until_ms - now_ms) / 1000)
        for op in self._present - present:
            self._guard.apply_remote(op, None)  # another replica's probe closed it
        self._present = present

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self.sync_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # every redis-py failure: counted, logged once
                if self._stopping:
                    return
                self.health.failed(exc)
            else:
                self.health.succeeded()
            await asyncio.sleep(self._interval_s)
