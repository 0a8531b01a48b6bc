"""Redis key names of the cache: one entry and one lease key per cached key.

The lease is updated in the same Lua script as its entry, so both must hash to the same
Redis Cluster slot: the cached key becomes the hash tag (`{...}`) of both names. A key
containing braces would cut the tag short (or empty it, and then Redis hashes the whole
name), so such keys are tagged by a digest of the key instead.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Final

from nexus_bus.constants import CACHE_HOLDERS_SUFFIX, CACHE_LEASE_SUFFIX, TOKEN_PATTERN

MAX_KEY_BYTES: Final = 1024
_NAMESPACE = re.compile(TOKEN_PATTERN)


@dataclass(frozen=True, slots=True)
class CacheKey:
    """The Redis names for one cached key: its entry, its load lease and its L1 holders."""

    entry: str
    lease: str
    holders: str = ""

    @classmethod
    def of_entry(cls, entry: str) -> CacheKey:
        """The names for an entry name (as carried in invalidation notices)."""
        return cls(entry, entry + CACHE_LEASE_SUFFIX, entry + CACHE_HOLDERS_SUFFIX)


def build_key(prefix: str, namespace: str, key: str) -> CacheKey:
    """The names of `key` in `namespace` under `prefix`.

    Raises:
        ValueError: a namespace that is not a subject-style token, or an empty or oversized key.
    """
    if not _NAMESPACE.fullmatch(namespace):
        raise ValueError(f"cache namespace {namespace!r} must match {TOKEN_PATTERN}")
    if not key or len(key.encode()) > MAX_KEY_BYTES:
        raise ValueError(f"cache key must be 1 to {MAX_KEY_BYTES} bytes")
    if "{" in key or "}" in key:
        digest = hashlib.sha1(key.encode(), usedforsecurity=False).hexdigest()[:16]
        return CacheKey.of_entry(f"{prefix}:{namespace}:{{{digest}}}:{key}")
    return CacheKey.of_entry(f"{prefix}:{namespace}:{{{key}}}")


def is_under(prefix: str, entry: str) -> bool:
    """Whether `entry` names a cache entry under `prefix` (checks names that came off the bus)."""
    return entry.startswith(prefix + ":")


class KeyNames:
    """`build_key` for one prefix, remembered: the same keys are named on every request.
    Bounded: past `max_names` the memo starts again."""

    def __init__(self, prefix: str, *, max_names: int = 4096) -> None:
        self._prefix = prefix
        self._max = max_names
        self._names: dict[tuple[str, str], CacheKey] = {}

    def of(self, namespace: str, key: str) -> CacheKey:
        """The names of `key` in `namespace`.

        Raises:
            ValueError: an invalid namespace or key.
        """
        names = self._names.get((namespace, key))
        if names is None:
            names = build_key(self._prefix, namespace, key)
            if len(self._names) >= self._max:
                self._names.clear()
            self._names[(namespace, key)] = names
        return names
