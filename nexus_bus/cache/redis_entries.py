"""`EntryStore` on Redis (single node or Cluster): one Lua script per operation.

An entry is a hash `{r: revision, k: kind, v: value, w: stale window ms, t: stored at,
server ms}` with a TTL; the lease is a string key holding the loader's token. Reads and
fills are scripts so that the revision compare-and-set, the lease check and the TTL are one
atomic step on the server: without that, a slow read-through fill could land after a newer
write and bring an old value back. Entry and lease share a hash tag (see `keys.py`), so the
scripts are legal on Redis Cluster.

Reads are auto-pipelined (as ioredis does): the reads a process makes in one event-loop
tick go to Redis as one pipeline, one round trip and one pooled connection for all of them,
instead of one connection each. On a cluster each read is sent alone (a cluster pipeline
splits per node anyway).

Every redis-py exception, and a call exceeding `timeout_s`, becomes `CacheUnavailable`
here and nowhere else.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from nexus_bus.cache.entries import CacheUnavailable, Entry, Holder, Kind, Lookup, Written
from nexus_bus.cache.keys import CacheKey
from nexus_bus.observability import logger
from nexus_bus.redis_client import RedisClient

T = TypeVar("T")

# Server time in ms. TIME is non-deterministic: scripts that write after it need effects
# replication, the default since Redis 5 (and asked for on older servers).
_NOW_LUA = """
if redis.replicate_commands then redis.replicate_commands() end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
"""

# KEYS: entry, lease, holders[, epoch]. ARGV: token, lease ms (0: take no lease), min
# revision, holder, hold ms.
# Returns {0, lease, now} for a miss, or {1 fresh | 2 stale, lease, revision, kind, value,
# held, now}; `now` is the server's ms, from which a fill's deadline is counted (FILL_LUA).
# A usable entry read by a `holder` records its read lease (until now + hold ms) in the
# holders hash, in the same atomic step: a write that runs later finds it there. While the
# key is sealed (a write is under way, `SEAL_LUA`) no lease is granted: the entry is not held.
READ_LUA = _NOW_LUA + """
local e = redis.call('HMGET', KEYS[1], 'r', 'k', 'v', 'w')
local status = 0
if e[1] and e[2] ~= 'f' and tonumber(e[1]) >= tonumber(ARGV[3]) then
  status = 1
  local window = tonumber(e[4]) or 0
  if window > 0 then
    local pttl = redis.call('PTTL', KEYS[1])
    if pttl >= 0 and pttl <= window then status = 2 end
  end
end
local lease = 0
if status ~= 1 and ARGV[2] ~= '0' then  -- lease ms 0: a reader that only looks
  if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then lease = 1 end
end
if status == 0 then return {0, lease, now} end
local held = 0
if ARGV[4] ~= '' then
  local seal = redis.call('HMGET', KEYS[3], '!seals', '!until')
  if tonumber(seal[1] or 0) > 0 and tonumber(seal[2] or 0) > now then
    return {status, lease, e[1], e[2], e[3], 0, now}  -- a write is under way: no read lease
  end
  local hold = tonumber(ARGV[5])
  local until_ms = now + hold
  local prior = tonumber(redis.call('HGET', KEYS[3], ARGV[4]) or 0)
  if prior > until_ms then until_ms = prior end
  redis.call('HSET', KEYS[3], ARGV[4], until_ms)
  if redis.call('PTTL', KEYS[3]) < hold then redis.call('PEXPIRE', KEYS[3], hold) end
  if #KEYS >= 4 then redis.call('SET', KEYS[4], now, 'NX') end
  held = 1
end
return {status, lease, e[1], e[2], e[3], held, now}
"""

# Shared by writes: collect and clear the live read leases of KEYS[3] into `out` (holder,
# remaining ms pairs after out[1], out[2]); keep the seals of other writes still under way
# (the count of sealed writes, `!seals`, less this one's when ARGV[unseal_arg] is 1, until
# `!until` at the latest: a writer that died leaves its seal for two holds at most); and set
# out[2] to how long a write must still wait when the epoch KEYS[4] is younger than one hold
# (ARGV[hold_arg]): the holders of a Redis that restarted or was flushed are lost with it,
# and ran at most one hold past it.
_COLLECT_LUA = """
local h = redis.call('HGETALL', KEYS[3])
local seals, sealed_until = 0, 0
for i = 1, #h, 2 do
  local left = tonumber(h[i + 1]) - now
  if h[i] == '!seals' then seals = tonumber(h[i + 1])
  elseif h[i] == '!until' then sealed_until = tonumber(h[i + 1])
  elseif left > 0 then out[#out + 1] = h[i]; out[#out + 1] = left end
end
redis.call('DEL', KEYS[3])
if ARGV[unseal_arg] == '1' then seals = seals - 1 end  -- this write's own seal ends
if seals > 0 and sealed_until > now then  -- other writes still under way: keep theirs
  redis.call('HSET', KEYS[3], '!seals', seals, '!until', sealed_until)
  redis.call('PEXPIRE', KEYS[3], sealed_until - now)
end
local hold = tonumber(ARGV[hold_arg]) or 0
if #KEYS >= 4 and hold > 0 then
  local since = tonumber(redis.call('GET', KEYS[4]) or 0)
  if since == 0 then redis.call('SET', KEYS[4], now); since = now end
  if since + hold > now then out[2] = since + hold - now end
end
"""

# KEYS: entry, lease, holders[, epoch]. ARGV: revision, kind, value, ttl ms, stale ms, token,
# need lease (0/1), drop lease (0/1), collect (0/1), hold ms, unseal (0/1), not after (server
# ms, 0: none). The accept rule is `entries.accepts`; an unversioned entry that drops the
# lease is a write (its `write`), and replaces any entry. A fill that runs after its deadline
# is refused: the entries that would have refused it may have expired since (see
# `Cache._load`). Returns {stored 0/1, wait ms, holder, remaining ms, ...}.
FILL_LUA = _NOW_LUA + """
local holder = redis.call('GET', KEYS[2])
if ARGV[7] == '1' and holder ~= ARGV[6] then return {0, 0} end
local cur = redis.call('HMGET', KEYS[1], 'r', 'k')
local stored = 1
local deadline = tonumber(ARGV[12])
if deadline > 0 and now > deadline then
  stored = 0
elseif cur[1] and not (ARGV[8] == '1' and tonumber(ARGV[1]) == 0) then
  local current, incoming = tonumber(cur[1]), tonumber(ARGV[1])
  if current > incoming or (current == incoming and cur[2] ~= ARGV[2] and cur[2] ~= 'f') then
    stored = 0
  end
end
if stored == 1 then
  -- 't': when the entry was stored (server ms), so stale-if-error can tell its age.
  redis.call('HSET', KEYS[1], 'r', ARGV[1], 'k', ARGV[2], 'v', ARGV[3], 'w', ARGV[5], 't', now)
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
end
if ARGV[8] == '1' or (ARGV[6] ~= '' and holder == ARGV[6]) then
  redis.call('DEL', KEYS[2])
end
local out = {stored, 0}
if ARGV[9] == '1' then
  local hold_arg, unseal_arg = 10, 11
""" + _COLLECT_LUA + """
end
return out
"""

# KEYS: entry, lease, holders[, epoch]. ARGV: hold ms. Before a write reaches the system of
# record: collect the live read leases (like a write), and count the write as sealing the
# key, so that no read lease is granted until it has replaced the entry (its write-through
# unseals: FILL_LUA's and EVICT_LUA's `unseal`) or one hold has passed after the longest
# lease collected: the writer waits that lease out when its holder does not answer (paused),
# and the seal must still hold when the writer goes on. Returns {1, wait ms, holder,
# remaining ms, ...} like FILL_LUA.
SEAL_LUA = _NOW_LUA + """
local out = {1, 0}
local hold_arg, unseal_arg = 1, 2
""" + _COLLECT_LUA + """
local hold = tonumber(ARGV[1])
local longest = out[2]  -- a young Redis's wait, which the writer also waits out
for i = 4, #out, 2 do
  if out[i] > longest then longest = out[i] end
end
local seal = redis.call('HMGET', KEYS[3], '!seals', '!until')
local seals, sealed_until = tonumber(seal[1] or 0), tonumber(seal[2] or 0)
if sealed_until <= now then seals = 0 end
if sealed_until < now + longest + hold then sealed_until = now + longest + hold end
redis.call('HSET', KEYS[3], '!seals', seals + 1, '!until', sealed_until)
redis.call('PEXPIRE', KEYS[3], sealed_until - now)
return out
"""

# KEYS: lease. ARGV: token.
RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: entry, lease, holders[, epoch]. ARGV: hold ms, unseal (0/1). One script rather than DEL with
# several keys: redis-py's cluster client would split a multi-key DEL into one command per
# key. Returns {existed 0/1, wait ms, holder, remaining ms, ...} like FILL_LUA.
EVICT_LUA = _NOW_LUA + """
local existed = redis.call('DEL', KEYS[1])
redis.call('DEL', KEYS[2])
local out = {existed, 0}
local hold_arg, unseal_arg = 1, 2
""" + _COLLECT_LUA + """
return out
"""

_FAILURES = (RedisError, RedisClusterException, OSError, TimeoutError)
_Queued = tuple[list[str], list[str | int], "asyncio.Future[Any]"]  # keys, args, the answer


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def _bytes(raw: Any) -> bytes:
    if raw is None:
        return b""
    return raw if isinstance(raw, bytes) else str(raw).encode()


def _written(reply: Any) -> Written:
    """FILL_LUA's or EVICT_LUA's answer: {stored, wait ms, holder, remaining ms, ...}."""
    holders = tuple(
        Holder(_text(reply[i]), int(reply[i + 1])) for i in range(2, len(reply) - 1, 2)
    )
    return Written(bool(int(reply[0])), holders, int(reply[1]))


class RedisEntryStore:
    """Entries in Redis through Lua scripts, every call bounded by `timeout_s`.

    Args:
        client: a `redis.asyncio` client or cluster client (see `redis_client.create_redis`).
        timeout_s: the most any call may take, connection included; then it fails open.
        epoch_key: where this Redis records when its state began (see `READ_LUA`); not on
            a cluster, whose scripts may touch one hash slot only (there the L1 is off).
    """

    def __init__(
        self, client: RedisClient, *, timeout_s: float = 0.15, epoch_key: str = ""
    ) -> None:
        self._client = client
        self._timeout_s = timeout_s
        self._cluster = isinstance(client, RedisCluster)
        self._epoch = [] if self._cluster or not epoch_key else [epoch_key]
        self._batch: list[_Queued] = []
        self._senders: set[asyncio.Task[None]] = set()
        self._read = client.register_script(READ_LUA)
        self._fill = client.register_script(FILL_LUA)
        self._release = client.register_script(RELEASE_LUA)
        self._evict = client.register_script(EVICT_LUA)
        self._seal = client.register_script(SEAL_LUA)

    async def _run(self, what: str, call: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(self._timeout_s):
                return await call
        except _FAILURES as exc:
            raise CacheUnavailable(f"cache {what} failed: {type(exc).__name__}") from exc
        except Exception as exc:
            # redis-py can also fail with internal errors (an AttributeError on a connection
            # torn down by a concurrent cancellation was seen under load on Cluster). Any
            # failure of the cache is still only a cache failure: the request fails open.
            logger.warning("unexpected redis-py error in cache {}: {!r}", what, exc)
            raise CacheUnavailable(f"cache {what} failed: {type(exc).__name__}") from exc

    async def warm_up(self, timeout_s: float) -> None:
        """Connect, learn the cluster's slots and load the scripts, once, at start.

        The first command of a fresh client does all of that (a cluster client asks every
        node for its slots); under a burst of first requests it would exceed the per-call
        timeout and open the breaker of a healthy Redis.

        Raises:
            CacheUnavailable: Redis did not answer within `timeout_s` (the cache still works
                and fails open until it does).
        """
        scripts = (self._read, self._fill, self._release, self._evict, self._seal)
        try:
            async with asyncio.timeout(timeout_s):
                if isinstance(self._client, RedisCluster):
                    await self._client.initialize()
                for script in scripts:
                    await self._client.script_load(script.script)
                if self._epoch:  # a new Redis: its state begins now
                    await self._client.set(self._epoch[0], await self._server_ms(), nx=True)
        except Exception as exc:
            raise CacheUnavailable(f"cache warm-up failed: {type(exc).__name__}") from exc

    async def _server_ms(self) -> int:
        seconds, micros = await self._client.time()
        return int(seconds) * 1000 + int(micros) // 1000

    @property
    def holds(self) -> bool:
        """Whether this store can record L1 read leases safely (not on a cluster)."""
        return bool(self._epoch)

    def _keys(self, key: CacheKey) -> list[str]:
        return [key.entry, key.lease, key.holders, *self._epoch]

    async def read(
        self,
        key: CacheKey,
        *,
        token: str,
        lease_ms: int,
        min_revision: int,
        holder: str = "",
        hold_ms: int = 0,
    ) -> Lookup:
        """See `EntryStore.read`.

        Raises:
            CacheUnavailable: Redis failed or did not answer in time.
        """
        args: list[str | int] = [token, lease_ms, min_revision, holder, hold_ms]
        if self._cluster:
            reply = await self._run("read", self._read(keys=self._keys(key), args=args))
        else:
            reply = await self._run("read", self._queue_read(self._keys(key), args))
        status, lease = int(reply[0]), bool(int(reply[1]))
        if status == 0:
            return Lookup(None, lease=lease, now_ms=int(reply[2]))
        entry = Entry(Kind(_text(reply[3])), int(reply[2]), _bytes(reply[4]))
        return Lookup(
            entry, stale=status == 2, lease=lease, held=bool(int(reply[5])), now_ms=int(reply[6])
        )

    def _queue_read(self, keys: list[str], args: list[str | int]) -> asyncio.Future[Any]:
        """The answer to one read, sent with every other read queued in this loop tick."""
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Any] = loop.create_future()
        self._batch.append((keys, args, answer))
        if len(self._batch) == 1:
            loop.call_soon(self._flush)
        return answer

    def _flush(self) -> None:
        batch, self._batch = self._batch, []
        sender = asyncio.get_running_loop().create_task(self._send(batch))
        self._senders.add(sender)
        sender.add_done_callback(self._senders.discard)

    async def _send(self, batch: list[_Queued]) -> None:
        """Run the batch's reads in one pipeline; each reader gets its own reply or error."""
        try:
            replies = await self._pipeline(batch)
        except asyncio.CancelledError:
            for _, _, answer in batch:
                answer.cancel()
            raise
        except Exception as exc:
            replies = [exc] * len(batch)
        for (_, _, answer), reply in zip(batch, replies, strict=True):
            if answer.done():  # its reader timed out meanwhile
                continue
            if isinstance(reply, Exception):
                answer.set_exception(reply)
            else:
                answer.set_result(reply)

    async def _pipeline(self, batch: list[_Queued]) -> list[Any]:
        if len(batch) == 1:
            keys, args, _ = batch[0]
            return [await self._read(keys=keys, args=args)]
        pipe = self._client.pipeline(transaction=False)
        for keys, args, _ in batch:
            # EVALSHA directly: a pipeline given the Script object would first ask
            # SCRIPT EXISTS, one more round trip per batch.
            pipe.evalsha(self._read.sha, len(keys), *keys, *args)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        for index, reply in enumerate(replies):
            if isinstance(reply, NoScriptError):  # a restarted Redis: load it, send again
                keys, args, _ = batch[index]
                replies[index] = await self._read(keys=keys, args=args)
        return replies

    async def fill(
        self,
        key: CacheKey,
        entry: Entry,
        *,
        ttl_ms: int,
        stale_ms: int = 0,
        token: str = "",
        need_lease: bool = False,
        drop_lease: bool = False,
        collect: bool = False,
        hold_ms: int = 0,
        unseal: bool = False,
        not_after_ms: int = 0,
    ) -> Written:
        """See `EntryStore.fill`.

        Raises:
            CacheUnavailable: Redis failed or did not answer in time.
        """
        args = [
            entry.revision, entry.kind.value, entry.value, ttl_ms, stale_ms, token,
            int(need_lease), int(drop_lease), int(collect), hold_ms, int(unseal), not_after_ms,
        ]
        return _written(await self._run("fill", self._fill(keys=self._keys(key), args=args)))

    async def evict(self, key: CacheKey, *, hold_ms: int = 0, unseal: bool = False) -> Written:
        """See `EntryStore.evict`.

        Raises:
            CacheUnavailable: Redis failed or did not answer in time.
        """
        args = [hold_ms, int(unseal)]
        reply = await self._run("evict", self._evict(keys=self._keys(key), args=args))
        return _written(reply)

    async def seal(self, key: CacheKey, *, hold_ms: int) -> Written:
        """See `EntryStore.seal`.

        Raises:
            CacheUnavailable: Redis failed or did not answer in time.
        """
        reply = await self._run("seal", self._seal(keys=self._keys(key), args=[hold_ms, 0]))
        return _written(reply)

    async def release(self, key: CacheKey, token: str) -> None:
        """See `EntryStore.release`.

        Raises:
            CacheUnavailable: Redis failed or did not answer in time.
        """
        await self._run("release", self._release(keys=[key.lease], args=[token]))
