"""Serving a subscription with bounded concurrency, without a task per message.

nats-py calls a subscription's callback serially, so a server must start a task per request
to overlap them. Most requests of a gateway never wait on I/O (a cache hit, an echo, a
refused token): for those the task (creating it, scheduling its step, its done-callback)
was 11% of a worker's instructions per request (docs/runtime.md).

A `Lane` reads a subscription's queue in one consumer task and runs each request inline,
in a context of its own (as a task would). If the request completes without waiting, the
consumer takes the next message. If it waits, the consumer task *stays with that request*
and drives it to the end, and a new consumer task takes over the queue. The task that
starts a request is therefore the one that finishes it: `asyncio.current_task()`,
`asyncio.timeout()` and task groups behave exactly as in a task of its own, and cancelling
that task (the worker's deadline reaper does) cancels the request. This is what Python
3.12's eager tasks do, without creating a task for requests that never wait.

At most `concurrency` requests are in flight per lane; when all slots are taken the
consumer stops reading, and backpressure reaches nats-py's pending limits (slow consumer),
as with a semaphore.

nats-py has no public way to consume a subscription without either a callback task or an
iterator that starts a task per message, so the lane reads the subscription's pending
queue and keeps its byte count and `task_done()` accounting (which `drain()` waits on)
exactly as nats-py's own consumer (`Subscription._wait_for_msgs`) does. `supported()` checks
for those names; without them the worker falls back to a task per request.
"""

from __future__ import annotations

import asyncio
import contextvars
import types
from collections.abc import Callable, Coroutine, Generator
from typing import Any, Generic, TypeVar

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from nexus_bus.observability import logger

Tag = TypeVar("Tag")
# A subject's requests get a task each once this many in a row waited when run inline (one
# that waits now and then, say on a cache refresh, stays inline), and are tried inline again
# after this many (handlers change: a cache warms up). At most this many subjects are
# remembered: clients choose the action token, so the set must be bounded; the rest simply
# run inline.
_STREAK = 3
_PROBE_EVERY = 64
_MAX_SUBJECTS = 256
_DONE: Any = object()
# Builds the coroutine serving one message, and what the lane records while it waits.
Starter = Callable[[Msg], tuple[Coroutine[Any, Any, None], Tag]]


def supported(sub: Subscription) -> bool:
    """Whether this nats-py subscription has the queue and counters a lane keeps."""
    queue = getattr(sub, "_pending_queue", None)
    return isinstance(queue, asyncio.Queue) and isinstance(getattr(sub, "_pending_size", None), int)


@types.coroutine
def _drive(
    coro: Coroutine[Any, Any, None], ctx: contextvars.Context, pending: Any
) -> Generator[Any, None, None]:
    """Finish `coro`, which has yielded `pending`, from the awaiting task, each step in `ctx`.

    The delegation `yield from` does, starting after a first step taken elsewhere: what the
    coroutine yields goes to the task, what the task sends or throws goes to the coroutine.
    """
    send, throw = coro.send, coro.throw
    while True:
        thrown: BaseException | None = None
        value = None
        try:
            value = yield pending
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:  # cancellation and the rest: the coroutine decides
            thrown = exc
        try:
            if thrown is None:
                pending = ctx.run(send, value)
            else:
                pending, thrown = ctx.run(throw, thrown), None
        except StopIteration:
            return


class Lane(Generic[Tag]):
    """Serves one subscription (subscribed without a callback): see the module docstring."""

    def __init__(self, sub: Subscription, start: Starter[Tag], *, concurrency: int) -> None:
        self.sub = sub
        self._start = start
        self._queue: asyncio.Queue[Msg] = sub._pending_queue
        self._free = concurrency
        self._slot_freed: asyncio.Future[None] | None = None
        self._consumer: asyncio.Task[None] | None = None
        self._held: Msg | None = None  # taken off the queue, waiting for a slot
        self._stopped = False
        # Requests that waited, by the task driving each: what the worker's reaper scans.
        self.waiting: dict[asyncio.Task[None], Tag] = {}
        # Per subject: inline runs in a row that waited (below _STREAK), then _STREAK plus the
        # requests since given a task directly.
        self._waits: dict[str, int] = {}

    def start(self) -> None:
        """Start consuming."""
        self._consumer = asyncio.create_task(self._consume(), name=f"lane {self.sub.subject}")

    def stop(self) -> list[Msg]:
        """Stop taking messages; requests already started go on.

        Returns:
            The messages delivered but never started (the subscription's drain timed out
            with every slot busy), for the caller to refuse: they are taken off the queue,
            or the connection's own drain would wait on them.
        """
        self._stopped = True
        if self._consumer is not None and self._consumer is not asyncio.current_task():
            self._consumer.cancel()
        left: list[Msg] = [] if self._held is None else [self._held]
        self._held = None
        while True:
            try:
                msg = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                break
            self.sub._pending_size -= len(msg.data)
            self._queue.task_done()
            left.append(msg)
        return left

    def _release(self) -> None:
        self._free += 1
        waiter = self._slot_freed
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _acquire(self) -> None:
        while self._free <= 0:
            self._slot_freed = asyncio.get_running_loop().create_future()
            await self._slot_freed
        self._free -= 1

    def _spawn(self, coro: Coroutine[Any, Any, None], tag: Tag) -> None:
        task = asyncio.create_task(coro)
        self.waiting[task] = tag
        task.add_done_callback(self._finished)  # also when cancelled before it started

    def _finished(self, task: asyncio.Task[None]) -> None:
        del self.waiting[task]
        self._release()
        if not task.cancelled() and task.exception() is not None:
            logger.opt(exception=task.exception()).error("request failed outside its handling")

    async def _wait_for_slot(self, msg: Msg, coro: Coroutine[Any, Any, None]) -> None:
        self._held = msg  # stop() hands it back to be refused, not lost
        try:
            await self._acquire()
        except BaseException:
            coro.close()
            raise
        finally:
            self._held = None

    def _first_step(self, coro: Coroutine[Any, Any, None], ctx: contextvars.Context) -> Any:
        """Run `coro` until it first waits: what it waits on, or `_DONE` (slot released)."""
        try:
            return ctx.run(coro.send, None)
        except StopIteration:
            pass  # done without waiting: the common case
        except asyncio.CancelledError:
            pass  # as a task of its own would end: cancelled
        except Exception:
            logger.exception("request failed outside its handling")
        self._release()
        return _DONE

    async def _consume(self) -> None:
        queue = self._queue
        waits = self._waits
        while True:
            if self._stopped:
                return
            msg = await queue.get()
            self.sub._pending_size -= len(msg.data)
            try:
                try:
                    coro, tag = self._start(msg)
                except Exception:
                    logger.exception("request failed outside its handling")
                    continue
                if self._free > 0:
                    self._free -= 1
                else:
                    await self._wait_for_slot(msg, coro)
                subject = msg.subject
                seen = waits.get(subject, 0)
                if _STREAK <= seen < _STREAK + _PROBE_EVERY:
                    # This subject's requests wait on I/O: a task each, at once, so that a
                    # burst starts together instead of one per turn of the event loop.
                    waits[subject] = seen + 1
                    self._spawn(coro, tag)
                    continue
                ctx = contextvars.copy_context()
                pending = self._first_step(coro, ctx)
                if pending is _DONE:
                    if seen:
                        del waits[subject]  # it completes without waiting (again)
                    continue
                if seen or len(waits) < _MAX_SUBJECTS:
                    waits[subject] = min(seen + 1, _STREAK)  # a probe that waited: tasks again
            finally:
                queue.task_done()  # admitted (or failed): what the subscription's drain waits on
            # The request waits on I/O: this task stays with it, a new one takes the queue.
            if not self._stopped:
                self.start()
            task: asyncio.Task[None] = asyncio.current_task()  # type: ignore[assignment]
            self.waiting[task] = tag
            try:
                await _drive(coro, ctx, pending)
            except Exception:
                logger.exception("request failed outside its handling")
            finally:
                del self.waiting[task]
                self._release()
            return
