"""Micro-batching of embedding requests: texts asked for at about the same time go upstream
in one call.

A caller adds its texts and awaits their vectors. The first text of an empty batch schedules
a flush on the next turn of the event loop, so everything asked during the current turn
(the texts of one request, the cache misses of concurrent requests) shares one call; a batch
that reaches `max_batch` is flushed at once. With `max_running`, at most that many calls run
at once and texts arriving meanwhile wait for one to end, then go together: for an
in-process model, which uses every core for one batch, 1 gives the batching where it pays.
One failed call fails every caller in it with the same error. Batches of one model only: a
batcher serves one (backend, model) pair.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

EmbedCall = Callable[[list[str]], Awaitable[list[list[float]]]]


class EmbedBatcher:
    """Collects texts and embeds them together.

    Args:
        call: embeds a batch (guards included), one vector per text.
        max_batch: texts per call at most.
        max_running: calls at once at most (0: no bound beyond the backend's bulkhead).
    """

    def __init__(self, call: EmbedCall, max_batch: int, max_running: int = 0) -> None:
        self._call = call
        self._max_batch = max_batch
        self._max_running = max_running
        self._running = 0
        self._texts: list[str] = []
        self._futures: list[asyncio.Future[list[float]]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.calls = 0  # upstream calls made (the batch effect, for metrics and tests)

    async def embed(self, texts: list[str]) -> list[list[float]]:
        """The vectors of `texts`, in order, embedded with whatever else is pending."""
        loop = asyncio.get_running_loop()
        futures = []
        for text in texts:
            if not self._texts:
                loop.call_soon(self._flush)
            future: asyncio.Future[list[float]] = loop.create_future()
            self._texts.append(text)
            self._futures.append(future)
            futures.append(future)
            if len(self._texts) >= self._max_batch:
                self._flush()
        return list(await asyncio.gather(*futures))

    def _flush(self) -> None:
        while self._texts and not (self._max_running and self._running >= self._max_running):
            texts, futures = self._texts[: self._max_batch], self._futures[: self._max_batch]
            del self._texts[: self._max_batch], self._futures[: self._max_batch]
            self._running += 1
            task = asyncio.get_running_loop().create_task(self._run(texts, futures))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, texts: list[str], futures: list[asyncio.Future[list[float]]]) -> None:
        self.calls += 1
        try:
            vectors = await self._call(texts)
        except Exception as exc:  # handed to every caller of the batch, which re-raise it
            for future in futures:
                if not future.done():
                    future.set_exception(exc)
            return
        finally:
            self._running -= 1
            self._flush()  # what waited for this call goes now
        for future, vector in zip(futures, vectors, strict=True):
            if not future.done():
                future.set_result(vector)


class MissCollector:
    """Gathers the cache misses of one request into one batch.

    Each of a request's `expected` texts ends in exactly one of: a cache hit (`settle()`)
    or a miss whose loader calls `load(text)`. Once all have ended, the missed texts go to
    the batcher together, so a request's misses cost one upstream call however long each
    cache lookup took.
    """

    def __init__(self, batcher: EmbedBatcher, expected: int) -> None:
        self._batcher = batcher
        self._waiting = expected
        self._texts: list[str] = []
        self._futures: list[asyncio.Future[list[float]]] = []
        self._task: asyncio.Task[None] | None = None

    def settle(self) -> None:
        """One text was answered without loading."""
        self._waiting -= 1
        if self._waiting == 0 and self._texts:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def load(self, text: str) -> list[float]:
        """The vector of a missed text, embedded with the request's other misses."""
        if self._waiting <= 0:  # a load after the request's batch left (a late refresh)
            return (await self._batcher.embed([text]))[0]
        future: asyncio.Future[list[float]] = asyncio.get_running_loop().create_future()
        self._texts.append(text)
        self._futures.append(future)
        self.settle()
        return await future

    async def _run(self) -> None:
        try:
            vectors = await self._batcher.embed(self._texts)
        except Exception as exc:  # every miss of the request fails with it
            for future in self._futures:
                if not future.done():
                    future.set_exception(exc)
            return
        for future, vector in zip(self._futures, vectors, strict=True):
            if not future.done():
                future.set_result(vector)
