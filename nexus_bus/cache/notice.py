"""The message workers exchange about cache writes on `nexus.sys.cache.*`.

The same notice is broadcast on `nexus.sys.cache.invalidate` after every write (other
workers drop the key from their L1, and remember a floor when `floor` is set), and sent as
a request on `nexus.sys.cache.fence` when the writer could not update Redis itself.
"""

from __future__ import annotations

from typing import Final, Protocol

import msgspec


class Notice(msgspec.Struct, frozen=True, kw_only=True):
    """A write to one cache entry.

    Attributes:
        key: the Redis entry name (see `keys.build_key`).
        revision: the write's revision; 0 for an unversioned write (an eviction).
        origin: the id of the cache that wrote it (workers ignore their own notices).
        floor: nobody could fence the entry in Redis; receivers keep a revision floor.
        fence_ttl_ms: the TTL of the fence to write (and of the floor's repair fence).
        lifetime_ms: how long an entry older than the write may still live in Redis.
        scope: which Redis the entry lives in; workers on another Redis ignore the notice.
        hold_ms: the L1 read lease of the key's policy (a fencing peer waits out a young
            Redis's unknown holders for this long).
        distrust_ms: the system of record of a whole namespace was replaced (the data
            bucket created again): receivers serve nothing cached from it for this long,
            every entry of the old one's lifetime. `key` is then `<prefix>:<namespace>`.
    """

    key: str
    revision: int
    origin: str = ""
    scope: str = ""
    floor: bool = False
    fence_ttl_ms: int = 60_000
    lifetime_ms: int = 0
    hold_ms: int = 0
    distrust_ms: int = 0


class FenceReply(msgspec.Struct, frozen=True, kw_only=True):
    """A peer's answer to a fence request (sent only when it fenced the entry)."""

    fenced: bool


encode: Final = msgspec.json.Encoder().encode
_notice_decoder: Final = msgspec.json.Decoder(Notice)
_reply_decoder: Final = msgspec.json.Decoder(FenceReply)


def decode_notice(data: bytes) -> Notice:
    """Decode a notice.

    Raises:
        msgspec.ValidationError / msgspec.DecodeError: not a notice (the caller drops it).
    """
    return _notice_decoder.decode(data)


def decode_reply(data: bytes) -> FenceReply:
    """Decode a fence reply.

    Raises:
        msgspec.ValidationError / msgspec.DecodeError: not a fence reply.
    """
    return _reply_decoder.decode(data)


class Peers(Protocol):
    """The other workers, reached over NATS (`invalidation.CacheBus`)."""

    async def fence(self, notice: Notice) -> bool:
        """Ask a worker that reaches Redis to fence `notice.key`; whether one did."""
        ...

    async def announce(self, notice: Notice) -> None:
        """Tell every worker about a write (best effort)."""
        ...

    async def revoke(self, origin: str, notice: Notice, timeout_s: float) -> bool:
        """Ask the worker `origin` to drop `notice.key` from its L1; whether it acknowledged
        within `timeout_s`."""
        ...

    async def close(self) -> None:
        """Stop listening to the other workers."""
        ...
