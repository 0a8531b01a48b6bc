"""Verifying a bearer token: signature and claims, times, revocation, with a cache in front.

Per request, in order:

1. Cached and fresh (revocation answer younger than `cache_ttl_s`): re-check only the times.
2. Cached but stale: re-check times and ask the revocation store; skip the signature.
3. Not cached: size, shape, algorithm, kid, signature, claims, times, then the store.

A cache entry is never used past the token's expiry (times are checked on every use) nor
past its revocation: the revocation notice evicts it at once, and without the notice it goes
stale after `cache_ttl_s`, which is therefore the stated bound (docs/auth.md).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from nexus_bus.auth.cache import CachedToken, VerificationCache
from nexus_bus.auth.revocation import RevocationStore
from nexus_bus.auth.tokens import TokenCodec
from nexus_bus.context import Principal
from nexus_bus.errors import InvalidToken


class TokenVerifier:
    """Turns a bearer token into a `Principal`, or refuses it."""

    def __init__(
        self,
        codec: TokenCodec,
        revocations: RevocationStore,
        cache: VerificationCache,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.codec = codec
        self.revocations = revocations
        self.cache = cache
        self._clock = clock
        # Bumped by every revocation notice: a lookup that overlapped one is not cached, so
        # a "not revoked" answer read just before the revocation cannot be kept for ttl_s.
        self._notices = 0
        # Revocation lookups under way, by token id, with the notice count and time at their
        # start.
        self._lookups: dict[str, tuple[asyncio.Future[bool], int, float]] = {}

    def is_known(self, token: str) -> bool:
        """Whether `token`'s signature was proven before (it is in the cache)."""
        return token in self.cache

    def answered_at(self, token: str) -> float | None:
        """When the revocation store last said `token` was not revoked, if the cache holds it.

        A `verify` answered from the cache rests on that older answer, not on the time of
        the call: whoever re-checks on a schedule dates its next check from this.
        """
        entry = self.cache.get(token)
        return entry.checked_at if entry is not None else None

    async def verify(self, token: str) -> Principal:
        """The principal `token` proves.

        Raises:
            InvalidToken: malformed, oversized, wrong algorithm, unknown kid, bad signature,
                expired, not yet valid, or revoked.
            Unavailable: the revocation store cannot answer (never a silent allow).
        """
        now = self._clock()
        entry = self.cache.get(token)
        if entry is not None:
            try:
                self.codec.check_times(entry.claims, now)
            except InvalidToken:
                self.cache.discard(token)
                raise
            if self.cache.is_fresh(entry, now):
                return entry.principal
            claims, kid, principal = entry.claims, entry.kid, entry.principal
        else:
            claims, kid = self.codec.verify(token, now)
            principal = Principal(
                subject=claims.sub, scopes=claims.scopes, jti=claims.jti, expires_at=claims.exp
            )
        revoked, notices, asked_at = await self._lookup(claims.jti, now)
        if revoked:
            self.cache.discard(token)
            raise InvalidToken("token revoked")
        if notices == self._notices:
            # Dated from when the store was asked, not from this call: a caller that joined
            # a lookup under way holds an answer older than itself.
            checked_at = min(now, asked_at)
            self.cache.put(token, CachedToken(claims, kid, principal, checked_at=checked_at))
        return principal

    async def _lookup(self, jti: str, now: float) -> tuple[bool, int, float]:
        """Whether `jti` is revoked, the notice count when the store was asked, and when
        it was asked (the time the cached answer is dated from).

        One lookup per token id at a time: callers that come while one runs share its
        answer. Without that, every request in flight with a busy token asks the store at
        once when its cache entry goes stale (a shim at 128 connections ran its Redis pool
        dry: 503s). A caller that joins gets an answer up to one lookup older than its own
        would be, so the answer is dated from the lookup's start, and a caller joins only a
        lookup younger than `cache_ttl_s`: the bound above still holds from the revocation
        being stored (with the cache off, 0, every caller asks the store itself). A
        revocation notice drops the lookup, so callers after it ask the store again.
        """
        found = self._lookups.get(jti)
        if found is None or now - found[2] >= self.cache.ttl_s:
            asked_at = now
            task = asyncio.ensure_future(self.revocations.is_revoked(jti))
            found = self._lookups[jti] = (task, self._notices, asked_at)
            task.add_done_callback(lambda done: self._finished(jti, done))
        pending, notices, asked_at = found
        return await asyncio.shield(pending), notices, asked_at

    def _finished(self, jti: str, task: asyncio.Future[bool]) -> None:
        if (found := self._lookups.get(jti)) is not None and found[0] is task:
            del self._lookups[jti]
        if not task.cancelled():
            task.exception()  # retrieved: every caller may have gone (cancelled) meanwhile

    def on_revoked(self, jti: str) -> None:
        """A revocation notice: forget the cached token with this id, at once.

        Notices only make this process ask the store again; they never refuse a token by
        themselves, so a forged notice cannot revoke anything.
        """
        self._notices += 1
        self._lookups.pop(jti, None)  # callers from now on ask the store themselves
        self.cache.evict_jti(jti)
