"""Authorization on the shim's own routes: async submits, job status and event streams.

Workers authorize synchronous operations: the shim forwards the bearer token and the worker's
`TokenAuthenticator` decides. Three routes never reach a worker's request path, so the shim
enforces the same rules there with the same authenticator (verifier, verification cache,
revocation store and failure limiter; docs/auth.md):

- `Prefer: respond-async`: what a synchronous call to the operation would answer (401, 403,
  429, 503), before anything is written to JetStream. The job worker checks again when it
  runs the job.
- `GET /v1/jobs/{id}`: a valid token first (401 before any lookup, so an anonymous caller
  cannot tell which ids exist), then the job's scope `op:action`. A token without it gets
  the same 404 as an absent job: ids derived from an `Idempotency-Key` are guessable, and
  a 403 would confirm a guess.
- `GET /v1/events/{topic}`: the stream holds a `StreamLease` and re-checks its token while it
  lives; it ends when the token expires or is revoked.

Which actions are public comes from the operation groups the shim was given (the built-in
ones unless told otherwise). An operation the shim does not know needs its scope: it fails
closed, never open.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

from nats.aio.client import Client

from nexus_bus.auth import (
    TokenAuthenticator,
    TokenVerifier,
    allows,
    bearer_token,
    create_shim_authenticator,
)
from nexus_bus.config import Settings
from nexus_bus.constants import H_AUTHORIZATION, H_CLIENT_IP
from nexus_bus.context import Principal
from nexus_bus.errors import InvalidToken, NexusError, UnknownOperation
from nexus_bus.operations import Operation, Operations
from nexus_bus.redis_client import RedisClient


async def _never_run(request: Any, ctx: Any) -> Any:
    """The handler of an operation the shim only authorizes (it runs nothing itself)."""
    raise UnknownOperation("the shim authorizes operations; workers run them")


# Any valid token, whatever its scopes: what reading a job's status needs before the lookup.
_ANY_TOKEN: Final = Operation(
    op="jobs", action="status", handler=_never_run, request_type=Any, reply_type=Any,
    public=True,
)


def credentials(authorization: str | None, client_ip: str) -> dict[str, str]:
    """The headers the authenticator reads: the token and the client it is counted against."""
    headers: dict[str, str] = {}
    if authorization is not None:
        headers[H_AUTHORIZATION] = authorization
    if client_ip:
        headers[H_CLIENT_IP] = client_ip
    return headers


class StreamLease:
    """An event stream's token, re-checked while the stream lives.

    A check is due `recheck_s` after the revocation store's last answer for the token (the
    verification cache's ttl: a check within it costs a dictionary lookup, one after it a
    revocation-store round trip), at once after `mark_stale` (a revocation notice named this
    token), and at the token's `exp`, where the stream ends whatever leeway verification
    allows for clock skew. The store's answer, not the check: a check answered from the cache
    (kept fresh by another stream or request with the same token) rests on an answer up to
    `recheck_s` old, and dating the next check from the check itself would let a stream outlive
    a revocation whose notice was lost by up to twice `recheck_s`.
    """

    def __init__(
        self,
        token: str,
        principal: Principal,
        verifier: TokenVerifier,
        *,
        recheck_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Args: recheck_s: the longest time between checks; 0: only when told or at exp."""
        self.principal = principal
        self._token = token
        self._verifier = verifier
        self._recheck_s = recheck_s if recheck_s > 0 else math.inf
        self._clock = clock
        self._checked_at = self._answered_at(clock())
        self._stale = False

    @property
    def jti(self) -> str | None:
        """The token's id, which revocation notices name."""
        return self.principal.jti

    def due_in(self) -> float:
        """Seconds until the next check is due (0: now)."""
        if self._stale:
            return 0.0
        due = self._checked_at + self._recheck_s
        expires = self.principal.expires_at
        if expires is not None:
            due = min(due, expires)
        return max(0.0, due - self._clock())

    def mark_stale(self) -> None:
        """Make a check due now (the verifier has already forgotten the token)."""
        self._stale = True

    async def check(self) -> NexusError | None:
        """None while the token holds; otherwise why the stream must end.

        A store that cannot answer ends the stream too (503): never a silent allow.
        """
        now = self._clock()
        expires = self.principal.expires_at
        if expires is not None and now >= expires:
            return InvalidToken("token expired")
        # Cleared before the await: a notice arriving during it makes the next check due.
        self._stale = False
        try:
            await self._verifier.verify(self._token)
        except NexusError as exc:
            return exc
        self._checked_at = self._answered_at(now)
        return None

    def _answered_at(self, now: float) -> float:
        """When the "not revoked" answer the last check rested on was given."""
        answered = self._verifier.answered_at(self._token)
        return now if answered is None else min(answered, now)


class ShimAuthorizer:
    """The shim's own authorization decisions; all pass when auth is off."""

    def __init__(
        self,
        authenticator: TokenAuthenticator | None,
        groups: Iterable[Operations],
        *,
        recheck_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Create the authorizer.

        Args:
            authenticator: the workers' authenticator; None when `auth.enabled` is false.
            groups: the operations the shim knows (which actions are public).
            recheck_s: how often an event stream's token is re-checked (`auth.cache_ttl_s`).
            clock: wall-clock seconds, as token times are.
        """
        self._auth = authenticator
        self._known = {(o.op, o.action): o for group in groups for o in group}
        self._recheck_s = recheck_s
        self._clock = clock

    @property
    def enabled(self) -> bool:
        """Whether tokens are checked at all."""
        return self._auth is not None

    def knows(self, op: str, action: str) -> bool:
        """Whether the shim was given `op.action` (its groups declare it)."""
        return (op, action) in self._known

    def operation(self, op: str, action: str) -> Operation:
        """The operation as the shim knows it; one it does not know is not public."""
        known = self._known.get((op, action))
        if known is not None:
            return known
        return Operation(
            op=op, action=action, handler=_never_run, request_type=Any, reply_type=Any
        )

    async def authorize(
        self, headers: Mapping[str, str], op: str, action: str
    ) -> Principal | None:
        """Refuse exactly as a worker would refuse a synchronous call to `op.action`.

        Returns:
            The caller; None when auth is off or a public action was called without a token.

        Raises:
            InvalidToken: missing or invalid token (401).
            Forbidden: a valid token without scope `op:action` (403).
            RateLimited: too many recent failures from this client (429).
            Unavailable: the revocation store cannot answer (503).
        """
        if self._auth is None:
            return None
        return await self._auth.authenticate(headers, self.operation(op, action))

    async def authenticate(self, headers: Mapping[str, str]) -> Principal | None:
        """The caller of a route every valid token may call; None when auth is off.

        Raises:
            InvalidToken: missing or invalid token (401).
            RateLimited: too many recent failures from this client (429).
            Unavailable: the revocation store cannot answer (503).
        """
        if self._auth is None:
            return None
        principal = await self._auth.authenticate(headers, _ANY_TOKEN)
        if principal is None:
            raise InvalidToken("missing bearer token")
        return principal

    def permits(self, principal: Principal | None, op: str, action: str) -> bool:
        """Whether `principal` (from `authenticate`) may see what `op.action` produced."""
        if principal is None:
            return self._auth is None
        return self.operation(op, action).public or allows(principal.scopes, op, action)

    async def lease(self, headers: Mapping[str, str], op: str, action: str) -> StreamLease | None:
        """Authorize a stream as `op.action` and hold its token; None when there is none.

        Raises:
            InvalidToken / Forbidden / RateLimited / Unavailable: see `authorize`.
        """
        if self._auth is None:
            return None
        principal = await self._auth.authenticate(headers, self.operation(op, action))
        token = bearer_token(headers)
        if principal is None or token is None:
            return None  # a public stream read without a token: nothing to re-check
        return StreamLease(
            token, principal, self._auth.verifier, recheck_s=self._recheck_s, clock=self._clock
        )


async def create_shim_authorizer(
    settings: Settings,
    redis: RedisClient,
    nc: Client,
    groups: Iterable[Operations],
    *,
    on_revoked: Callable[[str], None] | None = None,
) -> ShimAuthorizer:
    """The shim's authorizer from settings, listening for revocation notices.

    Raises:
        ConfigError: auth is enabled but `auth.keys_dir` holds no usable keys.
        Unavailable: notices cannot be subscribed to.
    """
    authenticator = await create_shim_authenticator(settings, redis, nc, on_revoked=on_revoked)
    # Without a verification cache (cache_ttl_s = 0) every check costs a signature and a
    # store round trip: then busy streams are re-checked once per heartbeat interval.
    recheck_s = settings.auth.cache_ttl_s or settings.http.sse_heartbeat_s
    return ShimAuthorizer(authenticator, groups, recheck_s=recheck_s)
