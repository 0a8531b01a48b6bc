"""Stale-if-error: a failed `data.get` answered from the workers' Redis cache.

Looked up only after a call failed (breaker open, no responders, timeout), never on the
success path. The entry must be a value (not a tombstone or fence) stored no longer than the
policy's `stale_if_error_s` ago, by Redis's own clock (the `t` field the fill script
writes), so replicas' clocks do not matter. The answer is the reply `data.get` would have
given, with `Nexus-Stale-Age: <seconds>`.

Workers authorize every request; here no worker is reached, so the caller's token is
checked first with the shim's authorizer (the same rules a worker applies). A gateway
without one (a Python caller) serves stale answers only when auth is off.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

import msgspec

from nexus_bus.bus.replies import Reply
from nexus_bus.cache.keys import build_key
from nexus_bus.constants import (
    CACHE_DATA_NAMESPACE,
    H_CONTENT_TYPE,
    H_REQUEST_ID,
    H_STALE_AGE,
    H_STATUS,
)
from nexus_bus.policies.shared import StoreHealth
from nexus_bus.redis_client import RedisClient
from nexus_bus.schemas.data import GetRequest

Authorize = Callable[[Mapping[str, str], str, str], Awaitable[None]]

# KEYS: entry. Returns {kind, revision, value, age ms} or nil when absent or of unknown age.
STALE_READ_LUA: Final = """
local e = redis.call('HMGET', KEYS[1], 'k', 'r', 'v', 't')
if not e[1] or not e[4] then return nil end
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
return {e[1], e[2], e[3], ms - tonumber(e[4])}
"""

_STALE_OPS: Final = frozenset({("data", "get")})
_request: Final = msgspec.json.Decoder(GetRequest)
_encode: Final = msgspec.json.Encoder().encode


class StaleAnswers:
    """Answers `data.get` from the cache when the operation cannot.

    Args:
        redis: the Redis the workers' cache lives in.
        key_prefix: the cache's key prefix (`cache.key_prefix`).
        authorize: checks the caller's token as a worker would; None: auth is off.
        timeout_s: the most a lookup may add to a failing request.
    """

    def __init__(
        self,
        redis: RedisClient,
        *,
        key_prefix: str,
        authorize: Authorize | None,
        timeout_s: float = 0.1,
    ) -> None:
        self._redis = redis
        self._prefix = key_prefix
        self._authorize = authorize
        self._timeout_s = timeout_s
        self._read = redis.register_script(STALE_READ_LUA)
        self.health = StoreHealth("stale_cache")

    async def answer(
        self, op: str, action: str, body: bytes, headers: Mapping[str, str], max_age_s: float
    ) -> Reply | None:
        """See `guard.Fallback.answer`.

        Raises:
            InvalidToken / Forbidden / RateLimited / Unavailable: the caller may not read
                `op.action` (what a worker would have answered).
        """
        if (op, action) not in _STALE_OPS or headers.get(H_CONTENT_TYPE, "").endswith("msgpack"):
            return None
        try:
            key = _request.decode(body).key
            names = build_key(self._prefix, CACHE_DATA_NAMESPACE, key)
        except (msgspec.MsgspecError, ValueError):
            return None  # the worker would have refused it; the original failure stands
        if self._authorize is not None:
            await self._authorize(headers, op, action)
        try:
            async with asyncio.timeout(self._timeout_s):
                found: Any = await self._read(keys=[names.entry])
        except Exception as exc:  # every redis-py failure: the original failure stands
            self.health.failed(exc)
            return None
        self.health.succeeded()
        if not found:
            return None
        kind, revision, value, age_ms = found
        kind = kind.decode() if isinstance(kind, bytes) else str(kind)
        if kind != "v" or int(age_ms) > max_age_s * 1000:
            return None
        raw = value if isinstance(value, bytes) else str(value).encode()
        reply_body = _encode({"key": key, "value": msgspec.Raw(raw), "revision": int(revision)})
        age_s = max(0, int(age_ms) // 1000)
        reply_headers = {
            H_STATUS: "200",
            H_REQUEST_ID: headers.get(H_REQUEST_ID, ""),
            H_STALE_AGE: str(age_s),
        }
        return Reply(200, reply_headers, reply_body)
