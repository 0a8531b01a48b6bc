"""The Redis cache: read-through, write-through and cache-aside with revisions (docs/cache.md)."""

from nexus_bus.cache.core import Cache
from nexus_bus.cache.declare import invalidates, read_through, write_through
from nexus_bus.cache.entries import (
    UNKNOWN_REVISION,
    UNVERSIONED,
    CacheUnavailable,
    Entry,
    EntryStore,
    Kind,
    Lookup,
)
from nexus_bus.cache.notice import Peers
from nexus_bus.cache.policy import CachePolicy
from nexus_bus.cache.records import CachedRecordStore
from nexus_bus.cache.service import cached_records, create_cache, data_policy, start_cache
from nexus_bus.cache.stats import CacheResult, CacheStats

__all__ = [
    "UNKNOWN_REVISION",
    "UNVERSIONED",
    "Cache",
    "CachePolicy",
    "CacheResult",
    "CacheStats",
    "CacheUnavailable",
    "CachedRecordStore",
    "Entry",
    "EntryStore",
    "Kind",
    "Lookup",
    "Peers",
    "cached_records",
    "create_cache",
    "data_policy",
    "invalidates",
    "read_through",
    "start_cache",
    "write_through",
]
