"""The revocation store: revoked token ids (`jti`) kept in Redis until their tokens expire.

A revocation only needs to outlive the token it kills. `auth.revoke` is given just a `jti`, so
the record is kept for the longest lifetime any accepted token can have (`auth.max_ttl_s`,
which the verifier enforces as `exp - iat`, plus the clock leeway): no token carrying that id
can still be valid when the record goes.

Every worker asks the store when it verifies a token it has not seen (or whose cached answer
is older than `auth.cache_ttl_s`). A store that cannot answer makes the request fail with
503 `unavailable`: never a silent allow.
"""

from __future__ import annotations

from typing import Protocol

from nexus_bus.constants import AUTH_REVOKED_KEY_PREFIX
from nexus_bus.errors import Unavailable
from nexus_bus.redis_client import RedisClient
from nexus_bus.redis_errors import REDIS_FAILURES, map_redis_error


class RevocationStore(Protocol):
    """Where revoked token ids live."""

    async def revoke(self, jti: str, ttl_s: int) -> None:
        """Record `jti` as revoked for `ttl_s` seconds.

        Raises:
            Unavailable: the store cannot be reached.
        """
        ...

    async def is_revoked(self, jti: str) -> bool:
        """Whether `jti` is revoked.

        Raises:
            Unavailable: the store cannot be reached.
        """
        ...


class RedisRevocationStore:
    """Revoked ids as Redis keys `nexus:auth:revoked:<jti>` with an expiry."""

    def __init__(self, redis: RedisClient, *, prefix: str = AUTH_REVOKED_KEY_PREFIX) -> None:
        self._redis = redis
        self._prefix = prefix

    async def revoke(self, jti: str, ttl_s: int) -> None:
        """Record `jti` as revoked for `ttl_s` seconds.

        Raises:
            Unavailable: Redis cannot be reached.
        """
        try:
            await self._redis.set(self._prefix + jti, b"1", ex=max(1, ttl_s))
        except REDIS_FAILURES as exc:
            raise map_redis_error(exc, "the token revocation store") from exc

    async def is_revoked(self, jti: str) -> bool:
        """Whether `jti` is revoked.

        Raises:
            Unavailable: Redis cannot be reached.
        """
        try:
            found = await self._redis.exists(self._prefix + jti)
        except REDIS_FAILURES as exc:
            raise map_redis_error(exc, "the token revocation store") from exc
        return bool(found)


class MemoryRevocationStore:
    """An in-memory twin for unit tests (no expiry; never for production)."""

    def __init__(self) -> None:
        self.revoked: dict[str, int] = {}
        self.available = True
        self.lookups = 0

    async def revoke(self, jti: str, ttl_s: int) -> None:
        """Record `jti`.

        Raises:
            Unavailable: `available` was set to False.
        """
        self._check()
        self.revoked[jti] = ttl_s

    async def is_revoked(self, jti: str) -> bool:
        """Whether `jti` was recorded.

        Raises:
            Unavailable: `available` was set to False.
        """
        self._check()
        self.lookups += 1
        return jti in self.revoked

    def _check(self) -> None:
        if not self.available:
            raise Unavailable("token revocation store is unavailable")
