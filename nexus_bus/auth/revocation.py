"""The revocation store: revoked token ids (`jti`), kept until their tokens expire.

A revocation only needs to outlive the token it kills. `auth.revoke` is given just a `jti`, so
the record is kept for the longest lifetime any accepted token can have (`auth.max_ttl_s`,
which the verifier enforces as `exp - iat`, plus the clock leeway): no token carrying that id
can still be valid when the record goes.

Two copies, with two jobs:

- The record: a key of the `nexus_auth_revoked` JetStream KV bucket (the system of record,
  with the replicas and storage of every other stream); the bucket's max age is the
  retention. Redis runs without persistence, as a cache must: were it the only copy, a Redis
  restart would silently make every revoked token valid again.
- The read path: one Redis hash, `nexus:auth:{revocations}`, a field per record (its value
  the record's expiry, Unix ms) and the marker field `.seeded` saying that the hash holds
  every record. A lookup is one command (`HMGET` of the marker and the id); it never touches
  JetStream, so a JetStream leader election (a NATS node died) does not stall token checks.

Records and marker live and die together, in one key without an expiry: Redis restarting
empty, an eviction under any `maxmemory-policy` (`volatile-*` never picks a key without an
expiry; `allkeys-*` drops the hash whole) or a Redis Cluster node losing it takes the marker
with the records, so the next lookup re-seeds. (Separate keys, one per record with its own
expiry, let `volatile-*` evict exactly the records and keep the marker: revoked tokens passed
again.) Fields past their expiry are pruned a page at a time, on each `revoke`.

A lookup that finds no marker (Redis restarted empty, first use ever, an eviction) re-seeds
Redis before it answers: it lists the bucket's keys, HSETs each, and sets the marker last.
Ordering: `revoke` puts the KV record first and HSETs its field second, so a revocation that
commits while a re-seed runs is either in the listing (put before it) or HSETs its own field
before its `revoke` returns; once the marker is set, every revocation whose `revoke` returned
is in Redis. A hash lost during a re-seed must not get the marker: each re-seed adds a nonce
field at its start, and a script sets the marker only if that field is still there (a
restart or an eviction drops it; that re-seed fails with 503 and the next lookup starts
another).

Every worker asks the store when it verifies a token it has not seen (or whose cached answer
is older than `auth.cache_ttl_s`). A store that cannot answer (Redis down; JetStream down
while a re-seed needs it) makes the request fail with 503 `unavailable`: never a silent
allow.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final, Protocol

from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from nexus_bus.bus.assets import stream_missing
from nexus_bus.config import JetStreamSettings
from nexus_bus.constants import AUTH_REVOKED_BUCKET, AUTH_REVOKED_KEY
from nexus_bus.errors import InvalidRequest, NexusError, Unavailable
from nexus_bus.jetstream import ensure_revocations_bucket
from nexus_bus.observability import logger
from nexus_bus.redis_client import RedisClient
from nexus_bus.redis_errors import REDIS_FAILURES, map_redis_error
from nexus_bus.store import KeyValueRecordStore, translate_nats_errors

# Ids used as keys as they are: what `new_jti` makes (32 hex digits) and any other id made of
# characters that are one KV key token. Matched with fullmatch().
_PLAIN_JTI: Final = re.compile(r"[A-Za-z0-9_-]{1,128}")
_HASHED_PREFIX: Final = "sha256."
_WHAT: Final = "the token revocation store"
# Fields of the hash beside the records: no record key starts with a dot.
SEEDED_FIELD: Final = ".seeded"
_SEEDING_FIELD: Final = ".seeding."  # + a re-seed's nonce
_SEEDING_TTL_S: Final = 60  # a re-seed that died leaves its nonce this long at most
_NEVER: Final = "never"  # the marker's "expiry": not a number, so never pruned
_PRUNE_PAGE: Final = 100  # fields looked at per `revoke`: more than the one it adds
# How long a re-seed may wait for JetStream (the bucket, then its keys): the requests behind
# it get 503 after this, not after nats-py's own timeouts.
SEED_TIMEOUT_S: Final = 2.0
_SEED_BATCH: Final = 1000
# The marker only if this re-seed's nonce survived (the hash was not lost meanwhile).
_SEAL_LUA: Final = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
  return 1
end
return 0
"""
# One page of fields from cursor ARGV[1]: those whose expiry (Unix ms) is before ARGV[2] go.
# Returns the next cursor ("0": a whole pass is done).
_PRUNE_LUA: Final = """
local page = redis.call('HSCAN', KEYS[1], ARGV[1], 'COUNT', ARGV[3])
local fields = page[2]
for i = 1, #fields, 2 do
  local expiry = tonumber(fields[i + 1])
  if expiry and expiry < tonumber(ARGV[2]) then
    redis.call('HDEL', KEYS[1], fields[i])
  end
end
return page[1]
"""


def revocation_key(jti: str) -> str:
    """The KV key that records `jti` (and, after the prefix, its Redis key).

    A token's `jti` may be any string its signer chose (and `auth.revoke` takes any 1 to 128
    characters), but a KV key may not hold spaces, `*`, `>` or most other characters, nor be
    of any length. Such an id is keyed by its SHA-256 instead: `sha256.<hex>`. A plain key
    never contains a `.`, so the two kinds cannot collide.
    """
    if _PLAIN_JTI.fullmatch(jti):
        return jti
    return _HASHED_PREFIX + hashlib.sha256(jti.encode(errors="surrogatepass")).hexdigest()


class RevocationStore(Protocol):
    """Where revoked token ids live, each as long as a token can (the store's own setting)."""

    async def prepare(self) -> None:
        """Get ready to answer (a worker at start).

        Raises:
            Unavailable: the store cannot be reached.
        """
        ...

    async def revoke(self, jti: str) -> None:
        """Record `jti` as revoked.

        Raises:
            InvalidRequest: an empty id.
            Unavailable: the store cannot be reached.
        """
        ...

    async def is_revoked(self, jti: str) -> bool:
        """Whether `jti` is revoked.

        Raises:
            Unavailable: the store cannot be reached.
        """
        ...


class RevocationStoreWithCache:
    """Revoked ids in JetStream KV (the record) and in Redis (the read path); see above.

    The bucket is created (or its max age lengthened) when first needed, not at
    construction: an HTTP shim starts while JetStream may still be away, as it does for its
    other buckets. A worker makes sure of it at start (`prepare`). A failed JetStream call
    forgets the bucket, so the next one makes sure of it again (it may have been deleted).
    """

    def __init__(
        self,
        redis: RedisClient,
        js: JetStreamContext,
        settings: JetStreamSettings,
        *,
        retention_s: int,
        key: str = AUTH_REVOKED_KEY,
    ) -> None:
        """Args:
        redis: the read path.
        js: where the bucket lives.
        settings: its replicas and storage.
        retention_s: how long a record lasts (`TokenPolicy.revocation_ttl_s`).
        key: the Redis hash.
        """
        self._redis = redis
        self._js = js
        self._settings = settings
        self._retention_s = max(1, retention_s)
        self._key = key
        self._kv: KeyValue | None = None
        self._seeding: asyncio.Task[None] | None = None
        self._seal = redis.register_script(_SEAL_LUA)
        self._prune = redis.register_script(_PRUNE_LUA)
        self._prune_cursor = b"0"

    async def prepare(self) -> None:
        """Make sure of the bucket now (a worker at start, where JetStream must answer anyway).

        Raises:
            Unavailable: JetStream cannot be reached.
        """
        async with self._failing_closed():
            await self._bucket()

    async def revoke(self, jti: str) -> None:
        """Record `jti` as revoked: the KV record first, then the Redis key (idempotent:
        again, it only restarts the record's age).

        A 503 after the KV put (Redis failed) leaves the revocation durable but not yet on
        the read path: lookups see it only once Redis is re-seeded (it restarted) or the
        caller retries, which it should. A failed KV put leaves nothing anywhere. Each call
        also prunes one page of expired records.

        Raises:
            InvalidRequest: an empty id.
            Unavailable: JetStream or Redis cannot be reached.
        """
        if not jti:
            raise InvalidRequest("jti must not be empty")
        key = revocation_key(jti)
        try:
            await self._record(key, jti)
        except Unavailable as exc:
            if not stream_missing(exc):
                raise
            # The bucket is gone (a memory-storage nats-server restarted, an operator):
            # `_bucket` creates it again, and the record goes there.
            await self._record(key, jti)
        async with self._redis_failing():
            now_ms = int(time.time() * 1000)
            await self._redis.hset(self._key, key, _ms_from_now(self._retention_s))
            cursor = await self._prune(
                keys=[self._key], args=[self._prune_cursor, now_ms, _PRUNE_PAGE]
            )
            self._prune_cursor = cursor

    async def _record(self, key: str, jti: str) -> None:
        async with self._failing_closed():
            kv = await self._bucket()
            async with translate_nats_errors("put revocation"):
                await kv.put(key, jti.encode(errors="surrogatepass"))

    async def is_revoked(self, jti: str) -> bool:
        """Whether `jti` is revoked, as Redis says (re-seeded first when it lost its data).

        Raises:
            Unavailable: Redis cannot be reached, or it must be re-seeded and JetStream
                cannot be (within `SEED_TIMEOUT_S`).
        """
        key = revocation_key(jti)
        seeded, found = await self._lookup(key)
        if not seeded:
            await self._reseeded()
            seeded, found = await self._lookup(key)
            if not seeded:  # lost again since (a second restart): the next lookup re-seeds
                raise Unavailable(f"{_WHAT} cannot answer (Redis lost its data meanwhile)")
        return found

    async def _lookup(self, key: str) -> tuple[bool, bool]:
        """(Redis holds every record, it holds `key`): one command."""
        async with self._redis_failing():
            seeded, found = await self._redis.hmget(self._key, [SEEDED_FIELD, key])
        return seeded is not None, found is not None

    async def _reseeded(self) -> None:
        """One re-seed per process at a time; concurrent callers await the same one.

        Shielded: a caller giving up (its deadline) does not cancel the others' re-seed.
        """
        if self._seeding is None:
            task = self._seeding = asyncio.ensure_future(self._reseed())

            def done(finished: asyncio.Task[None]) -> None:
                if self._seeding is finished:
                    self._seeding = None
                if not finished.cancelled():
                    finished.exception()  # retrieved: every caller may have given up

            task.add_done_callback(done)
        await asyncio.shield(self._seeding)

    async def _reseed(self) -> None:
        """Copy every KV record to Redis, then set the marker (only if Redis kept our nonce).

        Raises:
            Unavailable: JetStream did not list the keys within `SEED_TIMEOUT_S`, Redis
                failed, or Redis restarted meanwhile.
        """
        nonce = _SEEDING_FIELD + uuid.uuid4().hex
        async with self._redis_failing():
            # Its expiry, like a record's: pruned after a re-seed that died.
            await self._redis.hset(self._key, nonce, _ms_from_now(_SEEDING_TTL_S))
        try:
            async with asyncio.timeout(SEED_TIMEOUT_S), self._failing_closed():
                kv = await self._bucket()
                # Not nats-py's `kv.keys()`: it can end before the last entries arrive (it
                # trusts a pending count taken after subscribing), and a record missing here
                # would be missing from Redis under the marker: a revoked token valid again.
                records = KeyValueRecordStore(kv, self._js, bucket=AUTH_REVOKED_BUCKET)
                keys = await records.keys("", limit=sys.maxsize)
        except TimeoutError:
            detail = f"re-seed: JetStream did not list the revocations within {SEED_TIMEOUT_S} s"
            raise Unavailable(f"{_WHAT} cannot answer ({detail})") from None
        async with self._redis_failing():
            expiry = _ms_from_now(self._retention_s)
            for start in range(0, len(keys), _SEED_BATCH):
                batch = keys[start : start + _SEED_BATCH]
                await self._redis.hset(self._key, mapping=dict.fromkeys(batch, expiry))
            sealed = await self._seal(keys=[self._key], args=[nonce, SEEDED_FIELD, _NEVER])
        if not sealed:
            raise Unavailable(f"{_WHAT} cannot answer (Redis lost its data during a re-seed)")
        logger.info("token revocations re-seeded into Redis: {} from JetStream KV", len(keys))

    async def _bucket(self) -> KeyValue:
        """The bucket, created or brought up to date on first use.

        Concurrent first calls each make sure of it (idempotent), without a lock: behind one,
        every waiting caller would wait out the previous one's timeout in turn while
        JetStream does not answer.

        Raises:
            Unavailable: JetStream cannot be reached.
        """
        if self._kv is None:
            self._kv = await ensure_revocations_bucket(
                self._js, self._settings, max_age_s=self._retention_s
            )
        return self._kv

    @asynccontextmanager
    async def _failing_closed(self) -> AsyncIterator[None]:
        """Any JetStream failure is 503 `unavailable` naming this store, a timeout too (a
        retry may succeed, and no answer is ever taken for "not revoked"); the bucket is
        looked up again next time."""
        try:
            yield
        except NexusError as exc:
            self._kv = None
            raise Unavailable(f"{_WHAT} cannot answer ({exc.detail})") from exc

    @asynccontextmanager
    async def _redis_failing(self) -> AsyncIterator[None]:
        """A Redis failure as the `NexusError` it means (503 when Redis cannot be reached)."""
        try:
            yield
        except REDIS_FAILURES as exc:
            raise map_redis_error(exc, _WHAT) from exc


def _ms_from_now(seconds: float) -> int:
    return int((time.time() + seconds) * 1000)


class MemoryRevocationStore:
    """An in-memory twin for unit tests (no expiry; never for production)."""

    def __init__(self) -> None:
        self.revoked: set[str] = set()
        self.available = True
        self.lookups = 0

    async def prepare(self) -> None:
        """Nothing to get ready.

        Raises:
            Unavailable: `available` was set to False.
        """
        self._check()

    async def revoke(self, jti: str) -> None:
        """Record `jti`.

        Raises:
            Unavailable: `available` was set to False.
        """
        self._check()
        self.revoked.add(jti)

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
