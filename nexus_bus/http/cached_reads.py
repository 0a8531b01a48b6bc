"""Hot `data.get` answered by the shim itself, from the cache, under the workers' read leases.

A `data.get` whose entry the cache holds fresh costs a worker nothing but the NATS round trip
and its own per-message work, which is most of what the request costs. So the shim, a cache
participant like every worker (`Cache` with its own L1 and origin, and the `CacheBus` that
revocations reach), answers it from its L1, or from one Redis read that records the shim's
read lease, and forwards everything else to the workers unchanged:

- a miss, a stale entry, a deleted key (the worker's 404), a fence, a floor, Redis failing;
- a body that is not a plain JSON `{"key": ...}` the worker would accept (the worker's 400);
- `Idempotency-Key` (the worker's journal), `Prefer: respond-async` (a job);
- every read while the shim's NATS connection is down (it would hear no revision floor).

Before answering, the shim refuses exactly as a worker would: the caller's token and scope
(`ShimAuthorizer.authorize`, the workers' authenticator), then the caller's rate limit for
`data.get` (`Admission.spend`, the workers' limits), spent only for an answer given here.
The answer is the worker's to the byte: `GetReply` encoded as the handler encodes it.

Why no read returns an old value: the shim's L1 is the workers' L1 (docs/cache.md, "L1").
Its read lease is recorded in the same atomic step as its read, a write (and the seal before
it) collects it and waits until the shim dropped the key (`nexus.sys.cache.revoke.<origin>`)
or the lease ran out, and the shim's copy ends first. A read answered from Redis is the read
a worker makes.
"""

from __future__ import annotations

from typing import Final

import msgspec
from nats.aio.client import Client

from nexus_bus.cache import Cache, Kind
from nexus_bus.cache.heads import check_key
from nexus_bus.cache.policy import CachePolicy
from nexus_bus.cache.service import data_policy, recheck_a_renewed_bucket, start_cache
from nexus_bus.config import CacheSettings, Settings
from nexus_bus.constants import CACHE_DATA_NAMESPACE, CT_JSON
from nexus_bus.errors import InvalidRequest, NexusError
from nexus_bus.http.authz import ShimAuthorizer
from nexus_bus.http.problems import Answer
from nexus_bus.observability import logger
from nexus_bus.policies.admission import Admission
from nexus_bus.redis_client import RedisClient
from nexus_bus.schemas.data import GetReply, GetRequest

OP: Final = "data"
ACTION: Final = "get"
_CT_JSON: Final = CT_JSON.encode()
_decode_request: Final = msgspec.json.Decoder(GetRequest).decode
_decode_value: Final = msgspec.json.decode
_encode: Final = msgspec.json.Encoder().encode


class CachedReads:
    """`data.get` answered from the cache when it holds the key fresh.

    Args:
        nc: the shim's NATS connection, on which revocations and floors reach the cache.
        cache: the shim's cache (its own L1 and origin, its peers on the shim's NATS).
        policy: the `data` policy, the workers' (`cache.*` settings).
        authorizer: refuses as a worker would (token, scope).
        admission: the workers' rate limits; None: none (`resilience.enabled` false).
        max_body: a body longer than this is the worker's to refuse.
        cache_settings: the `cache.*` settings (how long a bucket created again is distrusted).
    """

    def __init__(
        self,
        nc: Client,
        cache: Cache,
        policy: CachePolicy,
        authorizer: ShimAuthorizer,
        admission: Admission | None,
        *,
        max_body: int,
        cache_settings: CacheSettings,
    ) -> None:
        self._nc = nc
        self._cache = cache
        self._policy = policy
        self._authz = authorizer
        self._admission = admission
        self._max_body = max_body
        self._settings = cache_settings

    async def answer(self, body: bytes, credentials: dict[str, str]) -> Answer | None:
        """The answer to a `data.get` with this JSON body, or None: the workers answer it.

        Args:
            body: the request body (JSON).
            credentials: the caller's `Authorization` and client address.

        Raises:
            InvalidToken / Forbidden / RateLimited / Unavailable: the caller is refused, as
                a worker would refuse the call (401, 403, 429, 503).
        """
        if len(body) > self._max_body or not self._nc.is_connected:
            # Cut off from NATS, the shim hears no floor a writer announces, and no
            # revocation (those its lease bounds): the workers answer, or nobody does.
            return None
        try:
            key = _decode_request(body).key
            check_key(key)
        except (msgspec.DecodeError, msgspec.ValidationError, InvalidRequest):
            return None  # the worker's 400, in the worker's words
        principal = await self._authz.authorize(credentials, OP, ACTION)
        entry = await self._cache.peek(CACHE_DATA_NAMESPACE, key, self._policy)
        if entry is None or entry.kind is not Kind.VALUE:
            return None
        try:
            value = _decode_value(entry.value)
        except msgspec.DecodeError:
            return None  # not JSON in the store: the worker's 500
        if self._admission is not None:
            await self._admission.spend(OP, ACTION, principal)
        reply = GetReply(key=key, value=value, revision=entry.revision)
        return Answer(200, _CT_JSON, [], _encode(reply))

    def reconnected(self) -> None:
        """NATS is back: a data bucket created again meanwhile was announced to nobody here
        (`recheck_a_renewed_bucket`, in the background)."""
        self._cache.spawn(
            recheck_a_renewed_bucket(self._cache, self._nc.jetstream(), self._settings)
        )

    async def close(self) -> None:
        """Stop listening for revocations (the connections are the shim's)."""
        await self._cache.close()


def _builtin_get(authorizer: ShimAuthorizer) -> bool:
    """Whether the `data.get` the shim was given is the built-in one."""
    from nexus_bus.handlers import BUILTIN  # the handlers import the package's public API

    builtin = BUILTIN[OP].get(ACTION)
    return authorizer.knows(OP, ACTION) and authorizer.operation(OP, ACTION) == builtin


async def start_cached_reads(
    nc: Client,
    redis: RedisClient,
    settings: Settings,
    authorizer: ShimAuthorizer,
    admission: Admission | None,
) -> CachedReads | None:
    """The shim's cached reads, subscribed to revocations; None when they are off.

    Off with `http.cached_reads` false, with the cache disabled, and when the shim was not
    given the built-in `data` operations (it does not know what `data.get` is then): a
    group of one's own named `data` may answer, and refuse, otherwise than the built-in one.
    A failure to subscribe leaves them off: every read goes to the workers.
    """
    if not (settings.http.cached_reads and settings.cache.enabled):
        return None
    if not _builtin_get(authorizer):
        return None
    try:
        cache = await start_cache(nc, redis, settings)
    except NexusError as exc:
        logger.warning("the shim answers no data.get from the cache: {}", exc)
        return None
    await recheck_a_renewed_bucket(cache, nc.jetstream(), settings.cache)
    return CachedReads(
        nc,
        cache,
        data_policy(settings.cache),
        authorizer,
        admission,
        max_body=settings.limits.max_body_bytes,
        cache_settings=settings.cache,
    )
