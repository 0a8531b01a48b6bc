"""The registry as a shim or a gateway client sees it: a KV watch kept in memory.

Consulted only when a request found no responders (a request that reaches a worker never
costs a lookup), to tell `404 unknown_operation` (nobody declared `op.action`) from
`503 no_responders` (declared, no worker now). A worker registers before it subscribes, so a
just-started op is in the bucket before it can be reached; on a miss the view first catches
up with the bucket (it waits until it has applied the stream's last sequence, asked after the
miss) and only then says 404. When the registry cannot answer — no JetStream, the watch
behind or broken — the answer is "unknown" and callers keep the retryable 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Iterable
from typing import Any, Final

import nats.errors
from nats.aio.client import Client
from nats.js.kv import KeyValue

from nexus_bus.config import Settings
from nexus_bus.errors import NexusError, Unavailable
from nexus_bus.jetstream import ensure_ops_bucket
from nexus_bus.observability import logger
from nexus_bus.operations import Operations
from nexus_bus.registry.core import OperationsListing, RegistryView
from nexus_bus.registry.policies import gateway_policies
from nexus_bus.store import translate_nats_errors

_DELETES: Final = frozenset({"DEL", "PURGE"})
_INITIAL_READ_S: Final = 5.0  # reading the whole bucket at start
_MIN_SYNC_SPACING_S: Final = 0.05  # a flood of made-up names costs at most 20 syncs a second


class OpsRegistry:
    """Which operations are declared, and which are served now, from the `nexus_ops` bucket."""

    def __init__(
        self,
        nc: Client,
        settings: Settings,
        known: Iterable[Operations] = (),
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Create the registry view; nothing is read until `start` (or the first question).

        Args:
            known: groups this process declares itself (the shim's `--app` and built-in
                groups): declared even before any worker registered them.
            clock: wall-clock seconds, compared with the entries' server timestamps.
        """
        self._nc = nc
        self._settings = settings.registry
        self._jetstream = settings.jetstream
        self._groups = list(known)
        self._known = {(o.op, o.action) for g in self._groups for o in g}
        # The listing's gateway half: what a gateway built from these settings applies.
        self._gateway = gateway_policies(settings.resilience)
        self.view = RegistryView(forget_after_s=settings.registry.forget_after_s, clock=clock)
        self._kv: KeyValue | None = None
        self._watcher: KeyValue.KeyWatcher | None = None
        self._task: asyncio.Task[None] | None = None
        self._seq = 0  # the highest stream sequence applied to the view
        self._advanced = asyncio.Event()
        self._start_lock = asyncio.Lock()
        self._starting: asyncio.Task[None] | None = None
        self._sync_lock = asyncio.Lock()
        self._synced_at = -math.inf  # monotonic time the last completed sync began
        self._ready = False

    @property
    def enabled(self) -> bool:
        """Whether the registry is consulted at all (`registry.enabled`)."""
        return self._settings.enabled

    async def start(self) -> None:
        """Open (or create) the bucket, read it to its end, and follow it from then on.

        Raises:
            Unavailable / UpstreamTimeout: JetStream cannot be reached or read in time.
        """
        async with self._start_lock:
            if self._ready:
                return
            kv = await ensure_ops_bucket(
                self._nc.jetstream(), self._jetstream,
                forget_after_s=self._settings.forget_after_s,
            )
            async with translate_nats_errors("watch the operation registry"):
                watcher = await kv.watchall()
            self._kv, self._watcher = kv, watcher
            self.view.clear()
            self._seq = 0
            initial = asyncio.Event()
            self._task = asyncio.create_task(self._follow(watcher, initial))
            try:
                async with translate_nats_errors("read the operation registry"):
                    async with asyncio.timeout(_INITIAL_READ_S):
                        await initial.wait()
            except NexusError:
                await self._stop_watch()
                raise
            self._ready = True

    async def _follow(self, watcher: KeyValue.KeyWatcher, initial: asyncio.Event) -> None:
        """Apply every entry to the view; `initial` is set once the entries present at the
        start are in: at the entry nothing was pending after (`delta` 0), or at nats-py's
        end marker, which is trusted only when entries came first or the bucket is empty
        (nats-py counts what is pending after subscribing, and when the server has sent
        every entry already, it marks the end before they arrive: docs/registry.md)."""
        seen = False
        async for entry in watcher:
            if entry is None:
                if seen or await self._bucket_is_empty():
                    initial.set()
                continue
            seen = True
            value = None if entry.operation in _DELETES else entry.value
            at = entry.created.timestamp() if entry.created is not None else time.time()
            if not self.view.apply(entry.key, value, at):
                logger.warning("ignored a malformed registry entry {!r}", entry.key[:200])
            self._seq = max(self._seq, entry.revision or 0)
            self._advanced.set()
            if entry.delta == 0:
                initial.set()

    async def _bucket_is_empty(self) -> bool:
        """Whether the bucket holds no entry (False when JetStream cannot say: the start
        then waits for entries, within its own timeout)."""
        assert self._kv is not None
        try:
            async with translate_nats_errors("read the operation registry"):
                return (await self._kv.status()).values == 0
        except NexusError:
            return False

    async def declares(
        self, op: str, action: str, *, within_s: float | None = None
    ) -> bool | None:
        """Whether `op.action` is a declared operation; None when the registry cannot say
        within `registry.sync_timeout_s` (or `within_s`, the caller's budget, if shorter):
        a request never waits longer on the registry than on the answer it asks about."""
        if (op, action) in self._known:
            return True
        if not self.enabled:
            return None
        limit = self._settings.sync_timeout_s
        try:
            async with asyncio.timeout(limit if within_s is None else min(limit, within_s)):
                # One start for every asker, and never cancelled by one giving up: a start
                # that outlives this question serves the next.
                await asyncio.shield(self._start_task())
                if self.view.declares(op, action):
                    return True
                # Shielded too: a catch-up that finds the watch broken restarts it even when
                # the question that asked has stopped waiting.
                catch_up = asyncio.create_task(self._catch_up())
                catch_up.add_done_callback(_retrieve)
                if not await asyncio.shield(catch_up):
                    return None
                return self.view.declares(op, action)
        except NexusError as exc:
            logger.warning("operation registry unavailable: {}", exc)
            return None
        except TimeoutError:
            return None

    def _start_task(self) -> asyncio.Task[None]:
        task = self._starting
        if task is None or task.done():
            task = self._starting = asyncio.create_task(self.start())
            task.add_done_callback(_retrieve)  # a failure is reported to whoever awaits it
        return task

    async def _catch_up(self) -> bool:
        """Apply everything the bucket held when this was asked; False when that fails."""
        asked = time.monotonic()
        async with self._sync_lock:
            if self._synced_at >= asked:
                return True  # a sync that began after we asked has finished meanwhile
            await asyncio.sleep(max(0.0, self._synced_at + _MIN_SYNC_SPACING_S - asked))
            began = time.monotonic()
            try:
                await self._wait_for_last_sequence()
            except (NexusError, TimeoutError) as exc:
                # The watch is behind or broken (a consumer lost with a server): start over
                # on the next question, and answer "unknown" to this one.
                logger.warning("operation registry out of date; re-reading it: {!r}", exc)
                await self._stop_watch()
                return False
            self._synced_at = began
            return True

    async def _wait_for_last_sequence(self) -> None:
        assert self._kv is not None
        async with asyncio.timeout(self._settings.sync_timeout_s):
            async with translate_nats_errors("read the operation registry's state"):
                status = await self._kv.status()
            state = status.stream_info.state
            if state.last_seq < self._seq:
                # Sequences never go back: this is a bucket created again since the watch
                # began (a memory-storage nats-server restarted, an operator), which the
                # watch does not follow. Read it anew.
                raise Unavailable("the operation registry's bucket was created again")
            target = state.last_seq if state.messages else 0
            while self._seq < target:
                self._advanced.clear()
                await self._advanced.wait()

    async def listing(self) -> OperationsListing:
        """Every declared op with its actions, schemas, policies and whether it is served now.

        Each action's `policy` pairs this process's gateway policy (what a call through it
        gets: timeout, retries, breaker, stale answers) with what the workers declared they
        enforce (rate limit, idempotency keys); see `policies.py`.

        Raises:
            Unavailable / UpstreamTimeout: the registry cannot be read.
        """
        if self.enabled:
            await self.start()
            # What was registered before the question is listed; a broken watch is read anew.
            if not await self._catch_up():
                await self.start()
        return self.view.listing(self._groups, gateway=self._gateway)

    async def _stop_watch(self) -> None:
        self._ready = False
        task, watcher = self._task, self._watcher
        self._task = self._watcher = None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if watcher is not None:
            with contextlib.suppress(nats.errors.Error, OSError):
                await watcher.stop()  # type: ignore[no-untyped-call]

    async def close(self) -> None:
        """Stop following the bucket (and a start still under way)."""
        starting, self._starting = self._starting, None
        if starting is not None and not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, NexusError):
                await starting
        await self._stop_watch()


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Mark a background start's outcome as seen (asyncio warns about unread exceptions)."""
    if not task.cancelled():
        task.exception()
