"""The in-process verification cache: a bounded LRU of tokens already proven. Pure.

An entry remembers two different facts, which age differently:

- *The signature is good.* That never changes for the same token string and keyring, so the
  entry may be kept until the token expires (its times are re-checked on every use).
- *The revocation store said "not revoked" at `checked_at`.* That goes stale: an entry is
  trusted without asking again only while `now - checked_at < ttl_s`. After that the caller
  asks the store again but skips the signature check.

So a revoked token passes for at most `ttl_s` after its revocation even if the revocation
notice to this process is lost; with the notice it stops at once (`evict_jti`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from nexus_bus.auth.tokens import Claims
from nexus_bus.context import Principal


@dataclass(slots=True)
class CachedToken:
    """A token whose signature verified, and when it was last found not revoked."""

    claims: Claims
    kid: str
    principal: Principal
    checked_at: float


class VerificationCache:
    """Bounded LRU of verified tokens, by token string."""

    def __init__(self, *, ttl_s: float, max_entries: int) -> None:
        """Create an empty cache.

        Args:
            ttl_s: how long a "not revoked" answer is trusted; 0 disables the cache.
            max_entries: the most tokens remembered; the least recently used goes first.
        """
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: OrderedDict[str, CachedToken] = OrderedDict()
        self._by_jti: dict[str, str] = {}

    @property
    def enabled(self) -> bool:
        """Whether anything is cached at all."""
        return self.ttl_s > 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, token: object) -> bool:
        return token in self._entries

    def get(self, token: str) -> CachedToken | None:
        """The entry for `token`, marked most recently used."""
        entry = self._entries.get(token)
        if entry is not None:
            self._entries.move_to_end(token)
        return entry

    def is_fresh(self, entry: CachedToken, now: float) -> bool:
        """Whether the entry's "not revoked" answer may still be trusted at `now`."""
        return now - entry.checked_at < self.ttl_s

    def put(self, token: str, entry: CachedToken) -> None:
        """Remember a verified token (no-op when disabled)."""
        if not self.enabled:
            return
        self._entries[token] = entry
        self._entries.move_to_end(token)
        self._by_jti[entry.claims.jti] = token
        while len(self._entries) > self.max_entries:
            old, dropped = self._entries.popitem(last=False)
            self._forget_jti(dropped.claims.jti, old)

    def discard(self, token: str) -> None:
        """Forget one token."""
        entry = self._entries.pop(token, None)
        if entry is not None:
            self._forget_jti(entry.claims.jti, token)

    def evict_jti(self, jti: str) -> bool:
        """Forget the token with this id (a revocation notice); whether one was cached."""
        token = self._by_jti.pop(jti, None)
        if token is None:
            return False
        self._entries.pop(token, None)
        return True

    def clear(self) -> None:
        """Forget everything."""
        self._entries.clear()
        self._by_jti.clear()

    def _forget_jti(self, jti: str, token: str) -> None:
        if self._by_jti.get(jti) == token:
            del self._by_jti[jti]
