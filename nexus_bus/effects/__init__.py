"""Exactly-once effects for jobs and keyed requests (docs/jobs.md, docs/resilience.md)."""

from nexus_bus.effects.cache_sync import CacheWriteThrough
from nexus_bus.effects.journal import (
    EffectRecord,
    JournaledRecordStore,
    WriteThrough,
    effect_scope,
    effect_subject,
)
from nexus_bus.effects.stream import data_stream_name, ensure_effect_records, journaled_services

__all__ = [
    "CacheWriteThrough",
    "EffectRecord",
    "JournaledRecordStore",
    "WriteThrough",
    "data_stream_name",
    "effect_scope",
    "effect_subject",
    "ensure_effect_records",
    "journaled_services",
]
