"""The worker's side of the policy layer: rate limits and idempotent replay, per request.

`Dispatcher` calls `Admission.admit` after authenticating a core request/reply request, when
`applies` says it must. A request without `Idempotency-Key` costs no Redis round trip unless
its limit's lease (`ratelimit.SharedRateLimiter.take`) is spent, and is admitted by
`applies` itself when a leased token is there; when no limit is configured at all,
`applies` is one header lookup, otherwise one header and one dict lookup.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from nexus_bus.bus.replies import Reply
from nexus_bus.config import Settings
from nexus_bus.constants import H_CONTENT_TYPE, H_IDEMPOTENCY_KEY
from nexus_bus.context import Principal
from nexus_bus.policies.idempotency import IdempotencyStore, Produce
from nexus_bus.policies.ratelimit import SharedRateLimiter
from nexus_bus.redis_client import RedisClient
from nexus_bus.resilience.gcra import RateLimit
from nexus_bus.resilience.policy import PolicyTable

_UNRESOLVED: Final = RateLimit(0.0, 0)  # `limit_of` has not looked this pair up yet


class Admission:
    """Rate limits and idempotency keys for the requests one worker serves.

    Args:
        policies: the resolved policy table (rate limits per op.action).
        limiter: the shared GCRA limiter.
        idempotency: the shared idempotency records.
    """

    def __init__(
        self,
        policies: PolicyTable,
        limiter: SharedRateLimiter,
        idempotency: IdempotencyStore,
    ) -> None:
        self._policies = policies
        self._limiter = limiter
        self._idempotency = idempotency
        self._limits: dict[tuple[str, str], RateLimit | None] = {}
        self._scope_limits: dict[str, RateLimit] = {}
        # Whether any op may have a limit: the default policy's, or an entry's.
        self._limited = any(
            policy.rate_limit_per_s > 0 for policy in policies.named().values()
        )

    def limit_scopes(self, limits: dict[str, RateLimit]) -> None:
        """Set the limits of tokens holding these scopes (on every op)."""
        self._scope_limits = dict(limits)
        self._limited = self._limited or bool(limits)

    def applies(
        self, op: str, action: str, principal: Principal | None, headers: Mapping[str, str]
    ) -> bool:
        """Whether `admit` must run for this request (it has a key, or a limit to check).

        A request without a key whose limit has a token leased in this worker is admitted
        here, spending that token: `admit` has nothing left to do, and the request is served
        without its coroutine. An op without a limit costs a dict lookup or two.
        """
        if H_IDEMPOTENCY_KEY in headers:
            return True
        if not self._limited:
            return False
        if self._scope_limits:
            limit = self.limit_for(op, action, principal)
        else:  # `limit_of` inline: this runs for every request of every op
            limit = self._limits.get((op, action), _UNRESOLVED)
            if limit is _UNRESOLVED:
                limit = self.limit_of(op, action)
        if limit is None:
            return False
        subject = principal.subject if principal is not None else None
        return not self._limiter.take(limit, subject, op, action)

    def limit_for(self, op: str, action: str, principal: Principal | None) -> RateLimit | None:
        """The limit on this caller for `op.action`: its scopes' (the highest), else the op's."""
        if self._scope_limits and principal is not None:
            best: RateLimit | None = None
            for scope, limit in self._scope_limits.items():
                if scope in principal.scopes and (best is None or limit.rate > best.rate):
                    best = limit
            if best is not None:
                return best
        return self.limit_of(op, action)

    def limit_of(self, op: str, action: str) -> RateLimit | None:
        """The rate limit of `op.action` (None: unlimited); resolved once per pair."""
        key = (op, action)
        found = self._limits.get(key, _UNRESOLVED)
        if found is not _UNRESOLVED:
            return found
        policy = self._policies.get(op, action)
        found = None
        if policy.rate_limit_per_s > 0:
            found = RateLimit.of(policy.rate_limit_per_s, policy.rate_limit_burst)
        if len(self._limits) < 4096:  # a shim's callers name ops (any, with a `*` token)
            self._limits[key] = found
        return found

    async def spend(self, op: str, action: str, principal: Principal | None) -> None:
        """Take one call of `op.action` from the caller's rate limit (none: nothing to take).

        The HTTP shim spends one for a job it accepts, which the job runner then runs
        without this admission: a job is a call of its op like a synchronous one.

        Raises:
            RateLimitExceeded: over the op's limit for this subject (429).
        """
        limit = self.limit_for(op, action, principal)
        if limit is None:
            return
        subject = principal.subject if principal is not None else None
        if not self._limiter.take(limit, subject, op, action):
            await self._limiter.check(limit, subject, op, action)  # the lease is spent

    async def admit(
        self,
        op: str,
        action: str,
        principal: Principal | None,
        headers: Mapping[str, str],
        body: bytes,
        request_id: str,
        deadline_ms: int,
        produce: Produce,
    ) -> Reply:
        """Check the rate limit, then run `produce` once per idempotency key (or just run it).

        Raises:
            RateLimitExceeded: over the op's limit for this subject (429).
            InvalidRequest / IdempotencyMismatch / UpstreamTimeout / Unavailable: see
                `IdempotencyStore.run`.
        """
        await self.spend(op, action, principal)
        subject = principal.subject if principal is not None else None
        key = headers.get(H_IDEMPOTENCY_KEY)
        if key is None:
            return await produce()
        return await self._idempotency.run(
            subject=subject,
            op=op,
            action=action,
            key=key,
            content_type=headers.get(H_CONTENT_TYPE),
            body=body,
            request_id=request_id,
            deadline_ms=deadline_ms,
            produce=produce,
        )


def create_admission(settings: Settings, redis: RedisClient) -> Admission | None:
    """The worker's admission from settings; None when the policy layer is disabled."""
    config = settings.resilience
    if not config.enabled:
        return None
    admission = Admission(
        PolicyTable.from_settings(config),
        SharedRateLimiter(redis, timeout_s=config.rate_limit_timeout_ms / 1000),
        IdempotencyStore(
            redis,
            retention_s=config.idempotency_retention_s,
            lease_ms=config.idempotency_lease_ms,
        ),
    )
    admission.limit_scopes({
        scope: RateLimit.of(limit.rate_limit_per_s, limit.rate_limit_burst)
        for scope, limit in config.scope_limits.items()
    })
    return admission
