"""The worker-side authenticator: bearer token → principal → scope check, per request.

Workers are the boundary (NATS clients reach them directly, past any gateway or shim), so
this runs in the worker for every request before its body is even decoded:

- no token: 401 `invalid_token`, unless the operation is explicitly public;
- a token that fails verification: 401 `invalid_token` (a token sent to a public operation
  is checked too);
- a valid token without the operation's scope: 403 `forbidden`;
- the revocation store unreachable: 503 `unavailable`;
- a client with too many recent failures sending an unproven token: 429 `rate_limited`.

Clients are told apart for rate limiting by the `Nexus-Client-Ip` header the HTTP shim sets
from the peer address. Plain NATS requests carry no address, so they are grouped by the
subject their token claims (unverified; it only picks a bucket), else all together.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Final, NoReturn

from nexus_bus.auth.limiter import FailureLimiter
from nexus_bus.auth.scopes import allows
from nexus_bus.auth.tokens import unverified_subject
from nexus_bus.auth.verifier import TokenVerifier
from nexus_bus.constants import AUTH_SCHEME, H_AUTHORIZATION, H_CLIENT_IP
from nexus_bus.context import Principal
from nexus_bus.errors import Forbidden, InvalidToken, NexusError, RateLimited
from nexus_bus.operations import Operation

_H_AUTHORIZATION_LOWER: Final = H_AUTHORIZATION.lower()
_SCHEME_PREFIX: Final = AUTH_SCHEME.lower() + " "
_ANONYMOUS: Final = "nats:anonymous"
_THROTTLED: Final = "too many failed authentications; retry later"


def bearer_token(headers: Mapping[str, str]) -> str | None:
    """The bearer token of a request, or None when it sends no `Authorization` header.

    Raises:
        InvalidToken: an `Authorization` header that is not `Bearer <token>`.
    """
    value = headers.get(H_AUTHORIZATION)
    if value is None:
        value = headers.get(_H_AUTHORIZATION_LOWER)  # HTTP/2-style lower-case names
    if value is None:
        return None
    value = value.strip()
    if value[: len(_SCHEME_PREFIX)].lower() != _SCHEME_PREFIX:
        raise InvalidToken(f"Authorization must use the {AUTH_SCHEME} scheme")
    token = value[len(_SCHEME_PREFIX) :].strip()
    if not token:
        raise InvalidToken("empty bearer token")
    return token


def client_key(headers: Mapping[str, str], token: str | None, max_token_bytes: int) -> str:
    """Who a failure is counted against: the client address, else the claimed subject."""
    address = headers.get(H_CLIENT_IP)
    if address:
        return "ip:" + address[:64]
    subject = unverified_subject(token, max_token_bytes) if token else None
    return "sub:" + subject if subject else _ANONYMOUS


class TokenAuthenticator:
    """Authenticates and authorizes requests with tokens from the token service."""

    def __init__(
        self,
        verifier: TokenVerifier,
        limiter: FailureLimiter,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.verifier = verifier
        self.limiter = limiter
        self._clock = clock
        self._max_token_bytes = verifier.codec.policy.max_token_bytes

    async def authenticate(
        self, headers: Mapping[str, str], operation: Operation
    ) -> Principal | None:
        """The caller's principal, or None for a public operation called without a token.

        Raises:
            InvalidToken: missing or invalid token (401).
            Forbidden: a valid token without the operation's scope (403).
            RateLimited: too many recent failures from this client (429).
            Unavailable: the revocation store cannot answer (503).
        """
        try:
            token = bearer_token(headers)
        except InvalidToken as exc:
            self._fail(headers, None, exc)
        if token is None:
            if operation.public:
                return None
            self._fail(headers, None, InvalidToken("missing bearer token"))
        if not self.verifier.is_known(token):
            # Only unproven tokens wait out a throttle: a client whose token verified before
            # keeps working while someone at its address guesses.
            client = client_key(headers, token, self._max_token_bytes)
            wait = self.limiter.retry_after(client, self._clock())
            if wait is not None:
                self._fail(headers, token, RateLimited(_THROTTLED, retry_after=wait))
        try:
            principal = await self.verifier.verify(token)
        except InvalidToken as exc:
            self._fail(headers, token, exc)
        if not operation.public and not allows(principal.scopes, operation.op, operation.action):
            raise Forbidden(f"token lacks scope {operation.scope}")
        return principal

    def _fail(self, headers: Mapping[str, str], token: str | None, error: NexusError) -> NoReturn:
        """Count a failure against the client and raise; 429 instead once over budget.

        Raises:
            RateLimited: the client has no allowance left.
            NexusError: `error` otherwise.
        """
        client = client_key(headers, token, self._max_token_bytes)
        now = self._clock()
        wait = self.limiter.retry_after(client, now)
        self.limiter.record_failure(client, now)  # hammering while throttled keeps it so
        if wait is not None and not isinstance(error, RateLimited):
            raise RateLimited(_THROTTLED, retry_after=wait) from None
        raise error
