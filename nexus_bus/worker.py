"""The worker runtime: FastStream subscribers in one queue group per op.

nats-py runs a subscription's callback serially, so the FastStream handler only admits the
message into a bounded set of tasks (a semaphore of `worker.concurrency` per op) and returns.
When the set is full the callback waits, and backpressure reaches nats-py's pending limits
instead of our memory. On drain the subscriptions are closed first (no new work), then
in-flight tasks finish within the grace period.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterable
from typing import Any

from faststream.nats import NatsBroker, NatsMessage
from nats.aio.client import Client
from nats.aio.msg import Msg

from nexus_bus.auth.base import Authenticator
from nexus_bus.config import Settings
from nexus_bus.connection import nats_options
from nexus_bus.constants import T_NATS
from nexus_bus.dispatch import Dispatcher, Expired
from nexus_bus.errors import Unavailable
from nexus_bus.observability import METRICS, logger
from nexus_bus.operations import Operations
from nexus_bus.services import Services, close_services, create_services
from nexus_bus.subjects import is_inbox, operation_wildcard, queue_group


async def _raw_message(msg: NatsMessage) -> Msg:
    """FastStream decoder that hands our runtime the nats-py message untouched."""
    raw: Msg = msg.raw_message
    return raw


class Worker:
    """Serves registered operations over NATS core request/reply."""

    def __init__(
        self,
        settings: Settings,
        groups: Iterable[Operations],
        *,
        authenticator: Authenticator | None = None,
    ) -> None:
        self.settings = settings
        self.groups = [g for g in groups if len(g)]
        self._authenticator = authenticator
        self._inbox_prefix = settings.nats.inbox_prefix
        self._tasks: set[asyncio.Task[None]] = set()
        self._draining = False
        self.broker: NatsBroker | None = None
        self.services: Services | None = None
        self.dispatcher: Dispatcher | None = None

    @property
    def nc(self) -> Client:
        """The worker's NATS connection (after `start`)."""
        if self.broker is None or self.broker._connection is None:
            raise Unavailable("worker is not started")
        return self.broker._connection

    @property
    def inflight(self) -> int:
        """Requests being handled now."""
        return len(self._tasks)

    async def start(self) -> None:
        """Connect, create streams and buckets, and start serving every op.

        Raises:
            Unavailable: NATS or JetStream cannot be reached.
        """
        opts = nats_options(self.settings.nats, name=f"{self.settings.service}-worker")
        broker = NatsBroker(
            **opts,
            decoder=_raw_message,
            apply_types=False,
            logger=None,
            graceful_timeout=self.settings.worker.drain_grace_s,
        )
        for group in self.groups:
            subscriber = broker.subscriber(
                operation_wildcard(group.op),
                queue=queue_group(group.op),
                no_reply=True,
                title=f"nexus.{group.op}",
                description=group.description or None,
            )
            subscriber(self._admitter(group.op))
        await broker.connect()
        self.broker = broker
        self.services = await create_services(self.nc, self.settings)
        self.dispatcher = Dispatcher(
            self.settings,
            self.groups,
            self.services,
            authenticator=self._authenticator,
            transport=T_NATS,
        )
        await broker.start()
        logger.info("worker serving ops {}", ",".join(g.op for g in self.groups))

    def _admitter(self, op: str) -> Any:
        limit = asyncio.Semaphore(self.settings.worker.concurrency)

        async def admit(msg: Msg) -> None:
            await limit.acquire()
            task = asyncio.create_task(self._serve(op, msg))
            self._tasks.add(task)
            METRICS.inflight.labels(T_NATS).inc()

            def done(t: asyncio.Task[None]) -> None:
                self._tasks.discard(t)
                limit.release()
                METRICS.inflight.labels(T_NATS).dec()

            task.add_done_callback(done)

        return admit

    async def _serve(self, op: str, msg: Msg) -> None:
        reply_to = msg.reply
        if reply_to and not is_inbox(reply_to, self._inbox_prefix):
            # Answering would let any publisher make us publish onto a command subject.
            logger.warning("refused request with a non-inbox reply subject on {}", msg.subject)
            METRICS.count_error(op, "invalid_reply_subject")
            return
        action = msg.subject.rsplit(".", 1)[-1]
        assert self.dispatcher is not None
        result = await self.dispatcher.dispatch(op, action, msg.headers, msg.data)
        if isinstance(result, Expired):
            logger.debug("dropped expired request {}", result.request_id)
            return
        if reply_to:
            try:
                await self.nc.publish(reply_to, result.body, headers=result.headers)
            except Exception as exc:  # noqa: BLE001 - the caller is gone or NATS is down
                logger.warning("could not send reply: {}", exc)

    async def drain(self, grace_s: float | None = None) -> None:
        """Stop taking requests, let in-flight ones finish within `grace_s`, then disconnect."""
        if self._draining or self.broker is None:
            return
        self._draining = True
        grace = self.settings.worker.drain_grace_s if grace_s is None else grace_s
        for subscriber in self.broker.subscribers:
            await subscriber.stop()  # unsubscribes: no new requests reach this worker
        if self._tasks:
            logger.info("draining {} in-flight requests", len(self._tasks))
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in pending:
                task.cancel()
        await self.broker.stop()
        if self.services is not None:
            await close_services(self.services)
        logger.info("worker stopped")

    async def run(self) -> None:
        """Start, serve until SIGTERM or SIGINT, then drain."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.drain()
