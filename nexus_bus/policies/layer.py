"""The gateway's policy layer, assembled from settings: one object with `call` and `close`."""

from __future__ import annotations

from collections.abc import Awaitable

from nexus_bus.bus.replies import Reply
from nexus_bus.config import Settings
from nexus_bus.policies.fallback import Authorize, StaleAnswers
from nexus_bus.policies.guard import Guard, Send
from nexus_bus.policies.shared import BreakerSync
from nexus_bus.redis_client import RedisClient
from nexus_bus.resilience.policy import PolicyTable


class PolicyLayer:
    """A `Guard` plus its background breaker sync, started with the first call.

    Args:
        guard: breakers, budgets and the retry loop.
        sync: shares breaker state with the other replicas; None: this replica alone.
    """

    def __init__(self, guard: Guard, sync: BreakerSync | None = None) -> None:
        self.guard = guard
        self.sync = sync
        self._started = sync is None
        if sync is not None:
            guard.publisher = sync

    def call(
        self,
        op: str,
        action: str,
        body: bytes,
        headers: dict[str, str],
        timeout_s: float,
        send: Send,
    ) -> Awaitable[Reply]:
        """See `Guard.call` (whose coroutine this returns: no frame of its own per call).

        Call it from a coroutine: the first call starts the sync in the running loop.
        """
        if not self._started:
            self.start()  # needs the running loop, which the constructor may not have
        return self.guard.call(op, action, body, headers, timeout_s, send)

    def start(self) -> None:
        """Start following the shared state now (a shim does, at start-up; a Python
        gateway at its first call). Inside the running event loop."""
        if not self._started and self.sync is not None:
            self.sync.start()
        self._started = True

    async def close(self) -> None:
        """Stop the background sync."""
        if self.sync is not None:
            await self.sync.close()


def create_policy_layer(
    settings: Settings, redis: RedisClient | None, *, authorize: Authorize | None = None
) -> PolicyLayer | None:
    """The policy layer `settings.resilience` describes; None when it is disabled.

    Args:
        redis: the shared store; None: breakers are per replica and there is no fallback.
        authorize: checks a caller's token before a stale answer (the shim's authorizer).
            Without one, stale answers are served only when auth is off.
    """
    config = settings.resilience
    if not config.enabled:
        return None
    # What a call gets when its caller names no budget (an HTTP client's is capped at
    # http.max_timeout_ms): a timeout within less was the caller's haste (guard.py).
    default_ms = min(settings.client.default_timeout_ms, settings.http.max_timeout_ms)
    guard = Guard(PolicyTable.from_settings(config), default_budget_s=default_ms / 1000)
    sync = None
    if redis is not None:
        if config.shared_breakers:
            sync = BreakerSync(guard, redis, interval_s=config.sync_interval_ms / 1000)
        if authorize is not None or not settings.auth.enabled:
            guard.fallback = StaleAnswers(
                redis,
                key_prefix=settings.cache.key_prefix,
                authorize=authorize,
                timeout_s=settings.cache.timeout_ms / 1000,
            )
    return PolicyLayer(guard, sync)
