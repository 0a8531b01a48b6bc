"""A worker's side of the operation registry: declare at start, refresh, say when stopped.

A worker registers before it subscribes, so an op is declared before anyone can reach it
(a request that finds no responders in between is answered 503, not 404). A registry that
cannot be written does not stop the worker from serving: the heartbeat keeps trying, and
a request that does reach the worker never asks the registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import Sequence
from typing import Final

import msgspec.structs
from nats.aio.client import Client
from nats.js.kv import KeyValue

from nexus_bus.bus.assets import again_if_missing, assets_of
from nexus_bus.config import Settings
from nexus_bus.constants import KV_STREAM_PREFIX, OPS_BUCKET
from nexus_bus.errors import NexusError
from nexus_bus.jetstream import ensure_ops_bucket
from nexus_bus.observability import logger
from nexus_bus.operations import Operations
from nexus_bus.registry.core import Declaration, State, declare, encode, entry_key, instance_id
from nexus_bus.registry.policies import worker_policies
from nexus_bus.specs.base import package_version
from nexus_bus.store import translate_nats_errors

_STOP_TIMEOUT_S: Final = 2.0


class Registration:
    """One worker's entries in the `nexus_ops` bucket, refreshed until `stop`."""

    def __init__(
        self, nc: Client, settings: Settings, declarations: Sequence[Declaration]
    ) -> None:
        """Args: declarations: one per op the worker serves (see `core.declare`)."""
        self._nc = nc
        self._jetstream = settings.jetstream
        self._forget_after_s = settings.registry.forget_after_s
        self._heartbeat_s = settings.registry.heartbeat_s
        self.declarations = list(declarations)
        self._kv: KeyValue | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Put every entry now (a failure is logged, and retried at each heartbeat)."""
        try:
            await self.put("serving")
        except NexusError as exc:
            logger.warning("could not register ops in the registry (will retry): {}", exc)
        self._task = asyncio.create_task(self._beat())

    async def put(self, state: State) -> None:
        """Write every entry with `state`.

        Raises:
            Unavailable / UpstreamTimeout: JetStream cannot be reached.
        """
        if self._kv is None:
            settings, forget_after_s = self._jetstream, self._forget_after_s
            self._kv = await ensure_ops_bucket(
                self._nc.jetstream(), settings, forget_after_s=forget_after_s
            )
            # Gone while the worker runs, the bucket is created again by the next put that
            # finds it missing (bus/assets.py): the heartbeat declares the ops again.
            assets_of(self._nc).track(
                f"{KV_STREAM_PREFIX}{OPS_BUCKET}", "bucket",
                lambda js: ensure_ops_bucket(js, settings, forget_after_s=forget_after_s),
            )  # fmt: skip
        kv = self._kv
        for declaration in self.declarations:
            entry = msgspec.structs.replace(declaration, state=state)

            async def put(entry: Declaration = entry) -> None:
                async with translate_nats_errors(f"register {entry.op}"):
                    await kv.put(entry_key(entry.op, entry.instance), encode(entry))

            await again_if_missing(self._nc, put)

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_s)
            try:
                await self.put("serving")
            except NexusError as exc:
                logger.warning("registry heartbeat failed (will retry): {}", exc)

    async def stop(self) -> None:
        """Stop refreshing and mark every entry `stopped` (declared, no longer served)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            async with asyncio.timeout(_STOP_TIMEOUT_S):
                await self.put("stopped")
        except (NexusError, TimeoutError) as exc:
            # The entry goes stale by itself after three missed heartbeats.
            logger.warning("could not mark ops stopped in the registry: {}", exc)


async def register(
    nc: Client, settings: Settings, groups: Sequence[Operations]
) -> Registration | None:
    """Declare `groups` for this worker and keep them fresh; None when the registry is off."""
    if not settings.registry.enabled or not groups:
        return None
    instance = instance_id(socket.gethostname(), os.getpid(), uuid.uuid4().hex[:8])
    heartbeat_s = settings.registry.heartbeat_s
    version = package_version()
    policies = worker_policies(settings.resilience)  # what this worker enforces, declared
    declarations = [
        declare(g, instance, heartbeat_s=heartbeat_s, version=version, policies=policies)
        for g in groups
    ]
    registration = Registration(nc, settings, declarations)
    await registration.start()
    return registration
