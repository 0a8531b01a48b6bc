"""Idempotent replay on the synchronous path, enforced by workers, stored in Redis.

Why in the worker and not the shim: NATS callers reach workers without any shim, NGINX may
send a keyed POST to a second shim, and only the worker knows when the effect has been
applied. The worker writes the reply next to the key before it publishes the reply, so a
worker killed after that write and before replying still has its result replayed.

One Redis hash per (token subject, op, action, key) (`resilience.idempotency.record_name`):

- absent: the first request claims it (`s=p`, its fingerprint and an owner token) with a
  lease of `idempotency_lease_ms`, and runs;
- `s=p` (running): a repeat with the same fingerprint waits for it (polling, within its own
  deadline) instead of running; when the lease expires (the first worker died before
  recording), the next repeat claims it and runs. A claim that ends without a reply to
  record (an exception, a cancellation, or the claim's own answer lost to a timeout) is
  dropped at once, by its owner token, and a record whose write got no answer is written
  again in the background: only a worker that died leaves its repeats waiting for the lease;
- `s=d` (done): the recorded reply (status, content type, body) is replayed with
  `Idempotent-Replayed: true`, for `idempotency_retention_s` (24 h);
- a different fingerprint: `422 idempotency_mismatch`.

Replies with status 500 and above, and 429, are not recorded (the key is released), so a
retry after a server failure, or after the Retry-After of a rate limit, runs again. When
Redis cannot be reached a keyed request is refused with 503 (retryable): running it without
the record could run it twice.

The record is written after the handler's effect, so a worker dying in between leaves the
claim to expire and the next repeat runs the handler again. Its writes through
`ctx.services.records` are therefore journaled under the key's scope (`effect_scope`, the
same digest as the record's name, with the request's fingerprint): each committed with an
effect record in one JetStream atomic batch, and skipped on a rerun, which returns the first
outcome (`nexus_bus/effects/journal.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final

from nexus_bus.bus.replies import Reply, error_of, service_error_headers
from nexus_bus.constants import (
    CT_JSON,
    EFFECTS_IDEMPOTENCY_TOKEN,
    H_CONTENT_TYPE,
    H_IDEMPOTENT_REPLAYED,
    H_REQUEST_ID,
    H_STATUS,
    IDEMPOTENCY_KEY_PREFIX,
)
from nexus_bus.effects.journal import effect_scope
from nexus_bus.errors import IdempotencyMismatch, RateLimited, Unavailable, UpstreamTimeout
from nexus_bus.observability import METRICS, logger
from nexus_bus.policies.shared import StoreHealth
from nexus_bus.redis_client import RedisClient
from nexus_bus.resilience.idempotency import check_key, fingerprint, scope_digest

# KEYS: record. ARGV: fingerprint, owner, lease ms.
# Returns {'run'} | {'mismatch'} | {'wait'} | {'done', status, content type, body}.
BEGIN_LUA: Final = """
local cur = redis.call('HMGET', KEYS[1], 's', 'f', 'st', 'ct', 'b')
if not cur[1] then
  redis.call('HSET', KEYS[1], 's', 'p', 'f', ARGV[1], 'o', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return {'run'}
end
if cur[2] ~= ARGV[1] then return {'mismatch'} end
if cur[1] == 'p' then return {'wait'} end
return {'done', cur[3], cur[4], cur[5]}
"""

# KEYS: record. ARGV: owner, status, content type, body, retention ms, fingerprint. Written
# only while this owner still holds the claim (or nobody does: Redis lost it in a restart or
# flush, or the lease ran out), always with the fingerprint, which a lost claim took along:
# without it every repeat of the same request would be a mismatch. Returns 1 when recorded.
COMPLETE_LUA: Final = """
local owner = redis.call('HGET', KEYS[1], 'o')
if owner and owner ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 's', 'd', 'st', ARGV[2], 'ct', ARGV[3], 'b', ARGV[4], 'f', ARGV[6])
redis.call('HDEL', KEYS[1], 'o')
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
"""

# KEYS: record. ARGV: owner. Drops a claim that ends without a recordable reply.
RELEASE_LUA: Final = """
if redis.call('HGET', KEYS[1], 'o') == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_POLL_S: Final = 0.02
_CALL_TIMEOUT_S: Final = 0.5
_RECORD_RETRIES_S: Final = (0.05, 0.25, 1.0, 4.0)  # pauses before writing a lost record again

Produce = Callable[[], Awaitable[Reply]]


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


class IdempotencyStore:
    """Runs keyed requests at most once per scope and replays their first reply.

    Args:
        redis: where records live.
        retention_s: how long a recorded reply is replayed.
        lease_ms: how long a running first execution holds its key.
        clock: wall-clock seconds (deadlines are epoch milliseconds).
    """

    def __init__(
        self,
        redis: RedisClient,
        *,
        retention_s: float,
        lease_ms: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._begin = redis.register_script(BEGIN_LUA)
        self._complete = redis.register_script(COMPLETE_LUA)
        self._release = redis.register_script(RELEASE_LUA)
        self._retention_ms = int(retention_s * 1000)
        self._lease_ms = lease_ms
        self._clock = clock
        self.health = StoreHealth("idempotency")
        self._background: set[asyncio.Task[None]] = set()  # claims dropped, records retried

    async def run(
        self,
        *,
        subject: str | None,
        op: str,
        action: str,
        key: str,
        content_type: str | None,
        body: bytes,
        request_id: str,
        deadline_ms: int,
        produce: Produce,
    ) -> Reply:
        """The reply of the first request with this key: produced now, or replayed.

        Raises:
            InvalidRequest: a key over 255 characters or not printable ASCII (400).
            IdempotencyMismatch: the key was used with a different request (422).
            UpstreamTimeout: the first request is still running at this one's deadline.
            Unavailable: Redis cannot be reached (503, retryable).
        """
        check_key(key)
        digest = scope_digest(subject, op, action, key)
        name = IDEMPOTENCY_KEY_PREFIX + digest
        print_ = fingerprint(content_type, body)
        owner = uuid.uuid4().hex
        while True:
            try:
                found = await self._call(
                    self._begin(keys=[name], args=[print_, owner, self._lease_ms])
                )
            except BaseException:
                # The script may have claimed the key though its answer never came back (the
                # call timed out behind a stalled event loop, or the request was cancelled):
                # a claim nobody runs would make every repeat wait out the whole lease.
                self._drop_claim(name, owner)
                raise
            verdict = _text(found[0])
            if verdict == "run":
                with effect_scope(f"{EFFECTS_IDEMPOTENCY_TOKEN}.{digest}", request=print_):
                    return await self._produce(name, owner, print_, produce)
            if verdict == "mismatch":
                raise IdempotencyMismatch(
                    "this Idempotency-Key was used with a different request"
                )
            if verdict == "done":
                METRICS.idempotent_replays.labels(op).inc()
                return _replay(found, request_id)
            if self._clock() * 1000 + _POLL_S * 1000 >= deadline_ms:
                raise UpstreamTimeout("the first request with this Idempotency-Key is running")
            await asyncio.sleep(_POLL_S)  # the first one is running: wait for its reply

    async def _produce(self, name: str, owner: str, print_: str, produce: Produce) -> Reply:
        try:
            reply = await produce()
        except BaseException:
            self._drop_claim(name, owner)
            raise
        if not kept(reply.status):
            await self._forget(name, owner)
            return reply
        content_type = reply.headers.get(H_CONTENT_TYPE, CT_JSON)
        args: list[str | int | bytes] = [
            owner, reply.status, content_type, reply.body, self._retention_ms, print_
        ]
        try:
            await self._call(self._complete(keys=[name], args=args))
        except Unavailable:
            # The effect happened: answer it. The record is tried again in the background, so
            # that repeats get this reply rather than wait out the lease (the script may have
            # run already: writing the same record twice is harmless). Never written, a repeat
            # after the lease runs again, and the effect journal skips what was done.
            logger.warning("idempotency record not written; trying again")
            self._spawn(self._record_again(name, args))
        return reply

    async def _record_again(self, name: str, args: list[str | int | bytes]) -> None:
        for pause_s in _RECORD_RETRIES_S:
            await asyncio.sleep(pause_s)
            try:
                await self._call(self._complete(keys=[name], args=args))
            except Unavailable:
                continue
            return
        logger.warning("idempotency record not written; a repeat after the lease runs again")

    def _drop_claim(self, name: str, owner: str) -> None:
        """Release `owner`'s claim on `name` (if it holds one) in a task of its own.

        Not awaited in the request's task: a request cancelled at its deadline is cancelled
        again by the worker on every tick until it ends, which would cut the release short
        and leave the claim to hold repeats off for the lease.
        """
        self._spawn(self._forget(name, owner))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)  # referenced until it ends
        task.add_done_callback(self._background.discard)

    async def _forget(self, name: str, owner: str) -> None:
        with contextlib.suppress(Unavailable):  # the lease expires on its own; a repeat runs
            await self._call(self._release(keys=[name], args=[owner]))

    async def _call(self, call: Awaitable[Any]) -> Any:
        try:
            async with asyncio.timeout(_CALL_TIMEOUT_S):
                result = await call
        except Exception as exc:  # every redis-py failure: refuse rather than run twice
            self.health.failed(exc)
            raise Unavailable("the idempotency store cannot be reached; retry") from exc
        self.health.succeeded()
        return result


def kept(status: int) -> bool:
    """Whether a reply with `status` is recorded and replayed: not a server failure, nor a
    429, whose Retry-After invites the same request again (replayed, the retry it asked
    for would get the same 429 for the whole retention)."""
    return status < 500 and status != RateLimited.http_status


def _replay(found: list[Any], request_id: str) -> Reply:
    status = int(_text(found[1]))
    content_type = _text(found[2])
    body = found[3] if isinstance(found[3], bytes) else _text(found[3]).encode()
    headers = {H_STATUS: str(status), H_REQUEST_ID: request_id, H_IDEMPOTENT_REPLAYED: "true"}
    if content_type != CT_JSON:
        headers[H_CONTENT_TYPE] = content_type
    if status >= 400:
        # The record keeps status, content type and body; the micro error headers every
        # error reply carries (docs/contract.md) come back from its problem document.
        headers.update(service_error_headers(error_of(status, body)))
    return Reply(status, headers, body)
