"""Streams and buckets that go missing while a process runs, re-created without a restart.

A process creates the streams and buckets it needs when it starts (`nexus_bus/jetstream.py`,
`jobs/streams.py`, `effects/stream.py`). They can disappear under it: a nats-server with
`jetstream.storage = "memory"` restarted, an operator deleting a stream or bucket. nats-py
reconnects, but every call on a missing stream then fails for good: a publish finds no stream
(`NoStreamResponseError`), an API call names none (404, err_code 10059), a pull consumer has
nothing behind it (503).

Every process keeps, per NATS connection, how it created each stream (`assets_of(nc).track`).
A call that fails because a stream is missing asks `restore()`, which runs every tracked step
again (each is idempotent: it creates what is absent and brings the rest up to date), logs
one WARNING naming the streams it found missing, and the call is made once more
(`again_if_missing`). Concurrent callers share one restore, and a restore that found
nothing missing holds the next one off for `_MIN_INTERVAL_S`, so an outage cannot turn every
failing request into a round of stream checks. What a memory stream held is lost; only the
empty streams come back.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

import nats.errors
import nats.js.errors as jserr
from nats.aio.client import Client
from nats.js import JetStreamContext

from nexus_bus.errors import NexusError
from nexus_bus.observability import logger

T = TypeVar("T")
Step = Callable[[JetStreamContext], Awaitable[object]]

STREAM_NOT_FOUND: Final = 10059  # JetStream's err_code for an API call naming no stream
_MIN_INTERVAL_S: Final = 1.0


def stream_missing(exc: BaseException | None) -> bool:
    """Whether a failure (a nats-py exception, or the NexusError it became) says that the
    stream or bucket the call addressed does not exist.

    A publish that no stream takes gets no responders (`NoStreamResponseError` from the
    JetStream API, `NoRespondersError` for a core request such as an atomic batch), an API
    call naming no stream 404 with err_code 10059, a bucket lookup `BucketNotFoundError`, and
    a pull request whose consumer (or stream) is gone 503.
    """
    while isinstance(exc, NexusError):
        exc = exc.__cause__
    if isinstance(exc, jserr.NotFoundError) and exc.err_code == STREAM_NOT_FOUND:
        return True
    return isinstance(
        exc,
        jserr.NoStreamResponseError
        | jserr.BucketNotFoundError
        | jserr.ServiceUnavailableError
        | nats.errors.NoRespondersError,
    )


class JetStreamAssets:
    """The streams and buckets one connection's process created, and how to create them."""

    def __init__(self, nc: Client) -> None:
        # Held weakly, and steps get the JetStream context when they run: the registry of
        # connections (`assets_of`) must not keep a closed connection alive.
        self._nc = weakref.ref(nc)
        # (stream, step name) -> the step; in order, so a bucket comes before its settings.
        self._steps: dict[tuple[str, str], Step] = {}
        self._running: asyncio.Task[list[str]] | None = None
        self._last = float("-inf")  # when the last restore ended (the loop's clock)

    def track(self, stream: str, step: str, ensure: Step) -> None:
        """Remember how `stream` is created (`ensure`, given a JetStream context on the
        connection), under a name; the same name again replaces the step it had."""
        self._steps[(stream, step)] = ensure

    @property
    def streams(self) -> list[str]:
        """The streams tracked, in the order they are restored."""
        return list(dict.fromkeys(stream for stream, _ in self._steps))

    async def restore(self) -> list[str]:
        """Run every tracked step again; the streams that were missing and are back.

        Never raises: a stream JetStream cannot be asked about, or cannot create, stays
        missing, and the caller's call fails as it would have.
        """
        if self._running is None:
            loop = asyncio.get_running_loop()
            if loop.time() - self._last < _MIN_INTERVAL_S or not self._steps:
                return []
            self._running = asyncio.ensure_future(self._restore())
            self._running.add_done_callback(self._ended)
        return await asyncio.shield(self._running)

    def _ended(self, task: asyncio.Task[list[str]]) -> None:
        self._running = None
        if task.cancelled() or task.exception() is not None or not task.result():
            # Nothing was missing: the failures that asked were something else (JetStream
            # unreachable), and asking again at once would only find the same.
            self._last = asyncio.get_running_loop().time()

    async def _restore(self) -> list[str]:
        nc = self._nc()
        if nc is None:
            return []
        js = nc.jetstream()
        recreated: list[str] = []
        for stream in self.streams:
            steps = [ensure for (name, _), ensure in list(self._steps.items()) if name == stream]
            exists: bool | None = None
            try:
                exists = await _exists(js, stream)
                for ensure in steps:
                    await ensure(js)
            except (NexusError, nats.errors.Error, OSError, TimeoutError) as exc:
                detail = exc.detail if isinstance(exc, NexusError) else repr(exc)
                # Unreachable JetStream is the caller's error to report; a stream found
                # missing and not created is worth a line of its own.
                log = logger.warning if recreated or exists is False else logger.debug
                log("could not restore JetStream stream {}: {}", stream, detail)
                break
            if not exists:
                recreated.append(stream)
        if recreated:
            logger.warning(
                "JetStream streams were missing (a nats-server with memory storage restarted,"
                " or they were deleted): recreated {}; what they held is lost",
                ", ".join(recreated),
            )
        return recreated



async def _exists(js: JetStreamContext, stream: str) -> bool:
    """Whether JetStream has `stream`.

    Raises:
        nats.errors.Error: JetStream did not answer, or answered something else.
    """
    try:
        await js.stream_info(stream)
    except jserr.NotFoundError as exc:
        if exc.err_code == STREAM_NOT_FOUND:
            return False
        raise
    return True


_assets: Final[weakref.WeakKeyDictionary[Client, JetStreamAssets]] = (
    weakref.WeakKeyDictionary()
)


def assets_of(nc: Client) -> JetStreamAssets:
    """The streams and buckets created on `nc` (one set per connection)."""
    assets = _assets.get(nc)
    if assets is None:
        assets = _assets[nc] = JetStreamAssets(nc)
    return assets


async def again_if_missing(nc: Client | None, call: Callable[[], Awaitable[T]]) -> T:
    """`call()`; when it fails because a stream or bucket is missing, restore what `nc`'s
    process tracks and call once more (whose failure is then the caller's)."""
    try:
        return await call()
    except NexusError as exc:
        if nc is None or not stream_missing(exc):
            raise
    await assets_of(nc).restore()
    return await call()
