"""The body read timeout of every request in flight, kept by one loop timer.

`asyncio.timeout` arms a loop timer for each request and cancels it when the body is in:
with uvloop 25,000 instructions a request, a tenth of what the shim's app spends on a
cached `data.get` (`python -m benchmarks.shim_instructions`). Nearly every body arrives
with its head, so that timer almost never fires. Here a read only notes its deadline in a
dict; one timer, armed while reads are pending, looks at them every eighth of the timeout
and cancels those past their deadline.
A body that has not arrived within `timeout_s` is refused (408) within `timeout_s * 9 / 8`.

    deadlines = ReadDeadlines(10.0)
    body = await deadlines.run(read(receive))   # RequestTimeout once the deadline passed
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, Final, TypeVar

from nexus_bus.http.problems import RequestTimeout

_TICKS: Final = 8  # sweeps per timeout: how late past its deadline a read may be cancelled
T = TypeVar("T")


class ReadDeadlines:
    """Deadlines for body reads: each refused with `RequestTimeout` once it passed.

    Args:
        timeout_s: how long a read may take, from when it begins.
    """

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._tick_s = timeout_s / _TICKS
        self._pending: dict[asyncio.Task[Any], float] = {}  # the reading task: its deadline
        self._expired: set[asyncio.Task[Any]] = set()  # cancelled by a sweep
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the timer's

    async def run(self, step: Awaitable[T]) -> T:
        """Await `step` under this deadline (one at a time per task).

        Raises:
            RequestTimeout: `step` was still running `timeout_s` after it began.
        """
        task = asyncio.current_task()
        assert task is not None and task not in self._pending, "one deadline per task"
        loop = asyncio.get_running_loop()
        pending = self._pending
        pending[task] = loop.time() + self.timeout_s
        if self._timer is None or self._loop is not loop:  # a new loop: the old timer is dead
            self._loop = loop
            self._timer = loop.call_later(self._tick_s, self._sweep, loop)
        cancelling = task.cancelling()
        try:
            return await step
        except asyncio.CancelledError:
            # Ours only if a sweep cancelled it and nobody else did too (as asyncio.timeout).
            if task in self._expired and task.uncancel() <= cancelling:
                raise RequestTimeout(
                    f"request body not received within {self.timeout_s:g}s"
                ) from None
            raise
        finally:
            del pending[task]
            self._expired.discard(task)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        for task, deadline in list(self._pending.items()):
            if task.get_loop() is not loop:  # left by a loop closed under it (tests)
                del self._pending[task]
            elif deadline <= now and task not in self._expired:
                self._expired.add(task)
                task.cancel()
        # Re-armed only while reads are pending: an idle shim keeps no timer.
        self._timer = loop.call_later(self._tick_s, self._sweep, loop) if self._pending else None

    def close(self) -> None:
        """Stop the timer (the reads still pending keep no deadline)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
