"""Workers telling each other about cache writes, over NATS `nexus.sys.cache.*`.

- `nexus.sys.cache.invalidate` (broadcast, every worker): sent after every write. Receivers
  drop the key from their L1, and keep a revision floor when the notice says nobody could
  fence the entry.
- `nexus.sys.cache.fence` (request to every worker, first answer wins): sent by a writer
  whose own write-through failed. Workers that reach Redis fence the entry and answer;
  the others, and the writer itself, stay silent, so the writer waits at most
  `fence_timeout_s` and then falls back to floors.
- `nexus.sys.cache.revoke.<origin>` (request to one worker): a writer revokes that worker's
  L1 read lease on a key; the worker drops the key and answers. No answer within the rest
  of the lease, and the writer waits the lease out instead (`core.Cache._revoke`).

nats exceptions are translated here: a lost notice or an unanswered fence is logged and
reported as "not fenced", never raised into a request.
"""

from __future__ import annotations

import contextlib
import re
from typing import Final

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from nexus_bus.bus.connection import round_trip
from nexus_bus.bus.subjects import is_inbox
from nexus_bus.cache.core import Cache
from nexus_bus.cache.notice import FenceReply, Notice, decode_notice, decode_reply, encode
from nexus_bus.constants import (
    CACHE_FENCE_SUBJECT,
    CACHE_INVALIDATE_SUBJECT,
    CACHE_REVOKE_SUBJECT,
    DEFAULT_INBOX_PREFIX,
)
from nexus_bus.errors import Unavailable
from nexus_bus.observability import logger

_NATS_FAILURES = (nats.errors.Error, TimeoutError, OSError)
_BAD_MESSAGE = (msgspec.DecodeError, msgspec.ValidationError)
_FENCED = encode(FenceReply(fenced=True))
# A cache's origin becomes the last token of its revocation subject: safe characters only.
_ORIGIN: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")


class CacheBus:
    """The cache's `Peers` on a NATS connection.

    Args:
        nc: the worker's NATS connection.
        cache: the cache whose notices this bus carries.
        fence_timeout_s: how long a writer waits for a peer's fence.
        inbox_prefix: fence answers go only to subjects under this prefix.
        scope: names the Redis this worker's cache uses. Workers of another deployment (or a
            test) may share the NATS server with another Redis; their notices are ignored,
            since a fence in the wrong Redis would protect nothing.
    """

    def __init__(
        self,
        nc: Client,
        cache: Cache,
        *,
        fence_timeout_s: float = 0.2,
        inbox_prefix: str = DEFAULT_INBOX_PREFIX,
        scope: str = "",
    ) -> None:
        self._nc = nc
        self._scope = scope
        self._cache = cache
        self._timeout_s = fence_timeout_s
        self._inbox_prefix = inbox_prefix
        self._subscriptions: list[Subscription] = []

    async def start(self) -> None:
        """Subscribe to both subjects and attach to the cache.

        Raises:
            Unavailable: NATS refused the subscriptions.
            ValueError: the cache's origin cannot be a subject token.
        """
        if not _ORIGIN.fullmatch(self._cache.origin):
            raise ValueError(f"cache origin {self._cache.origin!r} is not a subject token")
        subjects = [
            (CACHE_INVALIDATE_SUBJECT, self._on_invalidate),
            (CACHE_FENCE_SUBJECT, self._on_fence),
            (f"{CACHE_REVOKE_SUBJECT}.{self._cache.origin}", self._on_revoke),
        ]
        try:
            for subject, callback in subjects:
                self._subscriptions.append(await self._nc.subscribe(subject, cb=callback))
            # Make sure the server has every interest before the first write relies on them.
            await round_trip(self._nc)
        except BaseException as exc:
            # Not left half subscribed (a round trip that timed out, a start cancelled): a caller
            # that carries on without this bus, or starts another, must not have this one
            # answer revocations and fences for a cache nobody attached it to.
            await self.close()
            if isinstance(exc, _NATS_FAILURES):
                raise Unavailable(f"cannot subscribe to cache notices: {exc}") from exc
            raise
        self._cache.attach(self)

    async def fence(self, notice: Notice) -> bool:
        """Ask every worker to fence `notice.key`; whether one did within the timeout."""
        try:
            reply = await self._nc.request(
                CACHE_FENCE_SUBJECT, self._encode(notice), timeout=self._timeout_s
            )
            return decode_reply(reply.data).fenced
        except _NATS_FAILURES as exc:
            logger.debug("no worker could fence a cache entry: {}", type(exc).__name__)
            return False
        except _BAD_MESSAGE:
            return False

    async def revoke(self, origin: str, notice: Notice, timeout_s: float) -> bool:
        """Ask the worker `origin` to drop `notice.key` from its L1; whether it answered."""
        if not _ORIGIN.fullmatch(origin):
            return False  # not a subject token: never put it in a subject
        try:
            await self._nc.request(
                f"{CACHE_REVOKE_SUBJECT}.{origin}", self._encode(notice), timeout=timeout_s
            )
        except _NATS_FAILURES as exc:
            logger.debug("an L1 holder did not acknowledge a revocation: {}", type(exc).__name__)
            return False
        return True

    async def announce(self, notice: Notice) -> None:
        """Broadcast a write (best effort: a lost notice only leaves an L1 entry to its TTL)."""
        try:
            await self._nc.publish(CACHE_INVALIDATE_SUBJECT, self._encode(notice))
        except _NATS_FAILURES as exc:
            logger.warning("could not publish a cache invalidation: {}", exc)

    async def close(self) -> None:
        """Unsubscribe (the connection itself belongs to the worker)."""
        for subscription in self._subscriptions:
            # A closed connection raises here; nothing is subscribed any more then.
            with contextlib.suppress(*_NATS_FAILURES):
                await subscription.unsubscribe()
        self._subscriptions = []

    def _encode(self, notice: Notice) -> bytes:
        return encode(msgspec.structs.replace(notice, scope=self._scope))

    def _decode(self, msg: Msg) -> Notice | None:
        try:
            notice = decode_notice(msg.data)
        except _BAD_MESSAGE:
            logger.warning("dropped a malformed cache notice on {}", msg.subject)
            return None
        return notice if notice.scope == self._scope else None

    async def _on_invalidate(self, msg: Msg) -> None:
        if (notice := self._decode(msg)) is not None:
            self._cache.on_notice(notice)

    async def _on_revoke(self, msg: Msg) -> None:
        if (notice := self._decode(msg)) is None:
            return
        self._cache.on_revoke(notice)
        if msg.reply and is_inbox(msg.reply, self._inbox_prefix):
            try:
                await self._nc.publish(msg.reply, b"")
            except _NATS_FAILURES as exc:
                logger.warning("could not acknowledge an L1 revocation: {}", exc)

    async def _on_fence(self, msg: Msg) -> None:
        notice = self._decode(msg)
        if notice is None or notice.origin == self._cache.origin or not msg.reply:
            return  # our own request: this worker is the one that could not reach Redis
        if not is_inbox(msg.reply, self._inbox_prefix):
            logger.warning("refused a cache fence request with a non-inbox reply subject")
            return
        if await self._cache.apply_fence(notice):
            try:
                await self._nc.publish(msg.reply, _FENCED)
            except _NATS_FAILURES as exc:
                logger.warning("could not answer a cache fence request: {}", exc)
