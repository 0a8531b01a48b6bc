"""The token service: issue, verify and revoke, and its wiring into a worker.

One `TokenService` per worker process holds the keyring, the verification cache and the
revocation store. The worker's authenticator and the built-in `auth.*` handlers share it, so
a revocation served here evicts this process's cache at once; other processes learn of it by
a notice on `nexus.sys.auth.revoked` (and, were the notice lost, within `auth.cache_ttl_s`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from nats.aio.client import Client
from nats.aio.msg import Msg

from nexus_bus.auth.authenticator import TokenAuthenticator
from nexus_bus.auth.base import Authenticator, NoAuthentication
from nexus_bus.auth.cache import VerificationCache
from nexus_bus.auth.keys import Keyring, load_keyring
from nexus_bus.auth.limiter import FailureLimiter
from nexus_bus.auth.revocation import RevocationStore, RevocationStoreWithCache
from nexus_bus.auth.scopes import check_scope, covers
from nexus_bus.auth.tokens import SignedToken, TokenCodec, TokenPolicy
from nexus_bus.auth.verifier import TokenVerifier
from nexus_bus.bus.connection import round_trip
from nexus_bus.config import ConfigError, Settings
from nexus_bus.constants import AUTH_REVOKED_SUBJECT
from nexus_bus.context import Principal
from nexus_bus.errors import Forbidden, InvalidRequest, Unavailable
from nexus_bus.observability import logger
from nexus_bus.redis_client import RedisClient

if TYPE_CHECKING:
    from nexus_bus.services import Services

_SERVICE_KEY: Final = "nexus.auth.token_service"


def new_jti() -> str:
    """A fresh random token id (128 bits, hex)."""
    return os.urandom(16).hex()


class TokenService:
    """Issues, verifies and revokes tokens."""

    def __init__(
        self,
        codec: TokenCodec,
        verifier: TokenVerifier,
        revocations: RevocationStore,
        *,
        default_ttl_s: int,
        nc: Client | None = None,
        clock: Callable[[], float] = time.time,
        jti_factory: Callable[[], str] = new_jti,
    ) -> None:
        self.codec = codec
        self.verifier = verifier
        self.revocations = revocations
        self.default_ttl_s = default_ttl_s
        self._nc = nc
        self._clock = clock
        self._new_jti = jti_factory

    @property
    def max_ttl_s(self) -> int:
        """The longest lifetime a token may have."""
        return self.codec.policy.max_ttl_s

    def issue(
        self,
        subject: str,
        scopes: frozenset[str],
        ttl_s: int | None = None,
        *,
        issuer: Principal | None = None,
    ) -> SignedToken:
        """Sign a token.

        Args:
            subject: who the token stands for.
            scopes: what it grants; each must be covered by `issuer`'s own scopes.
            ttl_s: its lifetime; default `auth.default_ttl_s`; never past `issuer`'s expiry.
            issuer: the caller, when issuing for someone else (None: an operator with the key).

        Raises:
            InvalidRequest: a malformed scope, or a lifetime over `auth.max_ttl_s`.
            Forbidden: a scope the issuer does not hold itself, or an issuer whose token has
                expired (within the clock-skew leeway verification allows).
            Unavailable: this process holds no signing key.
        """
        ttl = ttl_s or self.default_ttl_s
        if ttl > self.max_ttl_s:
            raise InvalidRequest(f"ttl_s {ttl} exceeds the maximum of {self.max_ttl_s}")
        for scope in sorted(scopes):
            check_scope(scope)
            if issuer is not None and not covers(issuer.scopes, scope):
                raise Forbidden(f"cannot grant scope {scope}: the caller does not hold it")
        now = int(self._clock())
        if issuer is not None and issuer.expires_at is not None:
            # Delegation narrows lifetimes as it narrows scopes: a token holding `auth:issue`
            # must not mint a longer-lived copy of itself, which outlives its revocation.
            ttl = min(ttl, issuer.expires_at - now)
            if ttl < 1:
                raise Forbidden("cannot issue: the caller's own token has expired")
        return self.codec.issue(subject, scopes, ttl, now=now, jti=self._new_jti())

    async def verify(self, token: str) -> Principal:
        """The principal `token` proves (see `TokenVerifier.verify`).

        Raises:
            InvalidToken: the token is not valid now.
            Unavailable: the revocation store cannot answer.
        """
        return await self.verifier.verify(token)

    async def revoke(self, jti: str) -> None:
        """Revoke the token with id `jti` everywhere.

        The record outlives any token carrying the id (see `revocation.py`). This process
        forgets it at once; others on the notice, or within `auth.cache_ttl_s` without it.

        Raises:
            InvalidRequest: an empty id.
            Unavailable: the revocation store cannot be reached (nothing was revoked).
        """
        await self.revocations.revoke(jti)
        self.verifier.on_revoked(jti)
        if self._nc is not None and not self._nc.is_closed:
            try:
                await self._nc.publish(AUTH_REVOKED_SUBJECT, jti.encode())
            except Exception as exc:  # the store has it: other caches catch up within ttl
                logger.warning("revocation notice not sent: {}", exc)

    async def listen(
        self, nc: Client, *, on_revoked: Callable[[str], None] | None = None
    ) -> None:
        """Evict revoked tokens from this process's cache as notices arrive.

        Args:
            nc: the connection to hear notices on.
            on_revoked: also told each notice's `jti`, after the eviction (so whatever it
                re-checks asks the store again rather than trusting the cache).

        Raises:
            Unavailable: the subscription cannot be made.
        """

        async def on_notice(msg: Msg) -> None:
            jti = msg.data.decode(errors="replace")
            self.verifier.on_revoked(jti)
            if on_revoked is not None:
                on_revoked(jti)

        try:
            await nc.subscribe(AUTH_REVOKED_SUBJECT, cb=on_notice)
            await round_trip(nc)  # a revocation published after we return reaches us
        except Exception as exc:
            raise Unavailable(f"cannot subscribe to revocation notices: {exc}") from exc


def revocation_store(
    settings: Settings, redis: RedisClient, nc: Client
) -> RevocationStoreWithCache:
    """The revocation store every process shares: records in JetStream KV, the system of
    record, read from Redis (re-seeded from the KV when it lost its data), each kept
    `auth.max_ttl_s + auth.leeway_s` (the bucket is made sure of on first use)."""
    retention_s = TokenPolicy.from_settings(settings.auth).revocation_ttl_s
    return RevocationStoreWithCache(
        redis, nc.jetstream(), settings.jetstream, retention_s=retention_s
    )


def create_token_service(
    settings: Settings,
    redis: RedisClient,
    nc: Client,
    *,
    keyring: Keyring | None = None,
    clock: Callable[[], float] = time.time,
) -> TokenService:
    """A token service from settings (the keyring from `auth.keys_dir` unless given).

    Args:
        redis: the revocation store's read path.
        nc: the revocation store's JetStream, and where revocation notices are sent.

    Raises:
        ConfigError: no usable keys.
    """
    auth = settings.auth
    codec = TokenCodec(keyring or load_keyring(settings), TokenPolicy.from_settings(auth))
    store = revocation_store(settings, redis, nc)
    cache = VerificationCache(ttl_s=auth.cache_ttl_s, max_entries=auth.cache_size)
    verifier = TokenVerifier(codec, store, cache, clock=clock)
    return TokenService(
        codec, verifier, store, default_ttl_s=auth.default_ttl_s, nc=nc, clock=clock
    )


async def token_service_of(services: Services) -> TokenService:
    """This worker's token service, created (and listening for notices) on first use.

    Raises:
        Unavailable: no usable keys, or notices cannot be subscribed to.
    """
    found = services.extras.get(_SERVICE_KEY)
    if isinstance(found, TokenService):
        return found
    try:
        service = create_token_service(services.settings, services.redis, services.nc)
    except ConfigError as exc:
        raise Unavailable(f"token service is not configured: {exc.detail}") from exc
    # Stored before the first await, so concurrent first requests share one service.
    services.extras[_SERVICE_KEY] = service
    await service.listen(services.nc)
    return service


async def create_authenticator(settings: Settings, services: Services) -> Authenticator:
    """The authenticator a worker enforces, from settings.

    Raises:
        ConfigError: auth is enabled but no usable keys are configured (fail at start).
        Unavailable: notices cannot be subscribed to, or the revocation bucket cannot be made
            sure of (JetStream does not answer).
    """
    if not settings.auth.enabled:
        logger.warning("authentication is DISABLED (auth.enabled=false): every request passes")
        return NoAuthentication()
    service = create_token_service(settings, services.redis, services.nc)
    services.extras[_SERVICE_KEY] = service
    # The revocation bucket now, not on the first re-seed (a shim makes sure of it when first
    # needed instead: it starts while JetStream may still be away).
    await service.verifier.revocations.prepare()
    return await _enforcing(service, settings, services.nc)


async def create_shim_authenticator(
    settings: Settings,
    redis: RedisClient,
    nc: Client,
    *,
    on_revoked: Callable[[str], None] | None = None,
) -> TokenAuthenticator | None:
    """The workers' authenticator, for an HTTP shim's own routes; None with auth off.

    The shim only verifies, so public keys (`<kid>.pub.pem`) are enough in `auth.keys_dir`.

    Args:
        settings: the shim's settings (`auth`).
        redis: the revocation store's read path.
        nc: the revocation store's JetStream, and where revocation notices are heard.
        on_revoked: told each revoked `jti` after the cache dropped it (see `listen`).

    Raises:
        ConfigError: auth is enabled but no usable keys are configured (fail at start).
        Unavailable: notices cannot be subscribed to.
    """
    if not settings.auth.enabled:
        return None
    service = create_token_service(settings, redis, nc)
    return await _enforcing(service, settings, nc, on_revoked=on_revoked)


async def _enforcing(
    service: TokenService,
    settings: Settings,
    nc: Client,
    *,
    on_revoked: Callable[[str], None] | None = None,
) -> TokenAuthenticator:
    """Listen for revocation notices and build the authenticator on `service`'s verifier.

    Raises:
        Unavailable: notices cannot be subscribed to.
    """
    await service.listen(nc, on_revoked=on_revoked)
    logger.info("token auth on; keys {} (signing with {})", service.codec.keyring.kids,
                service.codec.keyring.active_kid)
    return TokenAuthenticator(service.verifier, FailureLimiter.from_settings(settings.auth))
