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

A call runs in a task of its own, not the callers', so the callers' deadlines must reach it
explicitly: each caller says how long it waits, a call is given the time of the latest
caller in its batch, and it is cancelled as soon as every caller stopped waiting (a text
whose caller left before its batch went is dropped). Otherwise a call would outlive its
callers, holding a bulkhead slot and an upstream connection that nobody wanted any more.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

# (texts, seconds the latest of their callers still waits) -> one vector per text
EmbedCall = Callable[[list[str], float], Awaitable[list[list[float]]]]


class EmbedBatcher:
    """Collects texts and embeds them together.

    Args:
        call: embeds a batch (guards included) within the time given, one vector per text;
            cancelled when no caller waits for it any more.
        max_batch: texts per call at most.
        max_running: calls at once at most (0: no bound beyond the backend's bulkhead).
    """

    def __init__(self, call: EmbedCall, max_batch: int, max_running: int = 0) -> None:
        self._call = call
        self._max_batch = max_batch
        self._max_running = max_running
        self._running = 0
        # Texts not yet sent: (text, its caller's future, the caller's deadline in loop time).
        self._queue: list[tuple[str, asyncio.Future[list[float]], float]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.calls = 0  # upstream calls made (the batch effect, for metrics and tests)

    async def embed(self, texts: list[str], remaining_s: float) -> list[list[float]]:
        """The vectors of `texts`, in order, embedded with whatever else is pending; the
        caller waits at most `remaining_s` (its call is given at least that long)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + remaining_s
        futures = []
        for text in texts:
            if not self._queue:
                loop.call_soon(self._flush)
            future: asyncio.Future[list[float]] = loop.create_future()
            self._queue.append((text, future, deadline))
            futures.append(future)
            if len(self._queue) >= self._max_batch:
                self._flush()
        return list(await asyncio.gather(*futures))

    def _flush(self) -> None:
        self._queue = [entry for entry in self._queue if not entry[1].done()]  # callers gone
        while self._queue and not (self._max_running and self._running >= self._max_running):
            batch = self._queue[: self._max_batch]
            del self._queue[: self._max_batch]
            texts, futures = [text for text, _, _ in batch], [f for _, f, _ in batch]
            deadline = max(d for _, _, d in batch)
            self._running += 1
            task = asyncio.get_running_loop().create_task(self._run(texts, futures, deadline))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            _cancel_when_abandoned(task, futures)

    async def _run(
        self, texts: list[str], futures: list[asyncio.Future[list[float]]], deadline: float
    ) -> None:
        self.calls += 1
        try:
            vectors = await self._call(texts, deadline - asyncio.get_running_loop().time())
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


def _cancel_when_abandoned(task: asyncio.Task[Any], futures: list[asyncio.Future[Any]]) -> None:
    """Cancel `task`, which works for the callers awaiting `futures`, once every one of
    those futures is cancelled (a caller that stops waiting cancels what it awaits)."""
    waiting = len(futures)

    def left(future: asyncio.Future[Any]) -> None:
        nonlocal waiting
        if future.cancelled():
            waiting -= 1
            if waiting == 0:
                task.cancel()

    for future in futures:
        future.add_done_callback(left)


class MissCollector:
    """Gathers the cache misses of one request into one batch.

    Each of a request's `expected` texts ends in exactly one of: a cache hit (`settle()`)
    or a miss whose loader calls `load(text)`. Once all have ended, the missed texts go to
    the batcher together, so a request's misses cost one upstream call however long each
    cache lookup took. `remaining_s` tells the request's time left when they go; once every
    miss stopped waiting, the batch is given up.
    """

    def __init__(
        self, batcher: EmbedBatcher, expected: int, remaining_s: Callable[[], float]
    ) -> None:
        self._batcher = batcher
        self._waiting = expected
        self._remaining_s = remaining_s
        self._texts: list[str] = []
        self._futures: list[asyncio.Future[list[float]]] = []
        self._task: asyncio.Task[None] | None = None

    def settle(self) -> None:
        """One text was answered without loading."""
        self._waiting -= 1
        if self._waiting == 0 and self._texts:
            pending = [(t, f) for t, f in zip(self._texts, self._futures, strict=True)
                       if not f.done()]
            if not pending:  # every miss stopped waiting before the last lookup ended
                return
            self._texts, self._futures = [t for t, _ in pending], [f for _, f in pending]
            self._task = asyncio.get_running_loop().create_task(self._run())
            _cancel_when_abandoned(self._task, self._futures)

    async def load(self, text: str) -> list[float]:
        """The vector of a missed text, embedded with the request's other misses."""
        if self._waiting <= 0:  # a load after the request's batch left (a late refresh)
            return (await self._batcher.embed([text], self._remaining_s()))[0]
        future: asyncio.Future[list[float]] = asyncio.get_running_loop().create_future()
        self._texts.append(text)
        self._futures.append(future)
        self.settle()
        return await future

    async def _run(self) -> None:
        try:
            vectors = await self._batcher.embed(self._texts, self._remaining_s())
        except Exception as exc:  # every miss of the request fails with it
            for future in self._futures:
                if not future.done():
                    future.set_exception(exc)
            return
        for future, vector in zip(self._futures, vectors, strict=True):
            if not future.done():
                future.set_result(vector)
