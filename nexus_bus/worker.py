"""The worker runtime: FastStream subscribers in one queue group per op.

nats-py runs a subscription's callback serially, so the FastStream handler only admits the
message into a bounded set of tasks (a semaphore of `worker.concurrency` per op) and returns.
When the set is full the callback waits, and backpressure reaches nats-py's pending limits
instead of our memory. On drain the subscriptions are closed first (no new work), then
in-flight tasks finish within the grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Iterable
from typing import Any

import nats.errors
from faststream.nats import NatsBroker, NatsMessage
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from nexus_bus.auth import Authenticator, create_authenticator
from nexus_bus.config import Settings
from nexus_bus.connection import broker_options, flush_subscriptions, install_speedups
from nexus_bus.constants import H_REQUEST_ID, T_NATS
from nexus_bus.discovery import WorkerDiscovery
from nexus_bus.dispatch import Dispatcher, Expired
from nexus_bus.errors import PayloadTooLarge, Unavailable
from nexus_bus.jobs.runner import JobRunner
from nexus_bus.metadata import deadline_ms, headers_size, request_id_of
from nexus_bus.observability import METRICS, logger
from nexus_bus.operations import Operations
from nexus_bus.registry import Registration, register
from nexus_bus.replies import Reply, error_reply
from nexus_bus.services import Services, close_services, create_services
from nexus_bus.subjects import is_inbox, operation_wildcard, queue_group

_NO_HEADERS: dict[str, str] = {}
# More than a reply's headers can take (status, ids, content type, a truncated error detail).
_HEADROOM = 8 * 1024


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
        # In-flight tasks with their op and absolute deadline (epoch ms), for the reaper.
        self._tasks: dict[asyncio.Task[None], tuple[str, int]] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._subscriptions: list[Subscription] = []
        self.lost = asyncio.Event()  # set when the NATS connection is closed for good
        self._draining = False
        self.broker: NatsBroker | None = None
        self.services: Services | None = None
        self.dispatcher: Dispatcher | None = None
        self.jobs: JobRunner | None = None
        self.registration: Registration | None = None
        self.discovery: WorkerDiscovery | None = None  # $SRV and Consul (docs/discovery.md)

    @property
    def nc(self) -> Client:
        """The worker's NATS connection (after `start`)."""
        if self.broker is None or self.broker._connection is None:
            raise Unavailable("worker is not started")
        return self.broker._connection

    @property
    def authenticator(self) -> Authenticator | None:
        """The authenticator requests pass (after `start`, the one built from settings)."""
        return self._authenticator

    @property
    def inflight(self) -> int:
        """Requests being handled now (that are waiting on something)."""
        return len(self._tasks)

    async def start(self) -> None:
        """Connect, create streams and buckets, and start serving every op.

        Raises:
            Unavailable: NATS or JetStream cannot be reached.
            ConfigError: auth is enabled but no signing or verification keys are configured,
                or the Consul address or token file is unusable.
        """
        if self.settings.worker.micro or self.settings.consul.enabled:  # docs/discovery.md
            self.discovery = WorkerDiscovery(self.settings, self.groups, unhealthy=self._unhealthy)
        opts = broker_options(self.settings.nats, name=f"{self.settings.service}-worker")
        broker = NatsBroker(
            **opts,
            decoder=_raw_message,
            apply_types=False,
            logger=None,
            graceful_timeout=self.settings.worker.drain_grace_s,
        )
        for group in self.groups if self.settings.worker.faststream_subscribers else ():
            subscriber = broker.subscriber(
                operation_wildcard(group.op),
                queue=queue_group(group.op),
                no_reply=True,
                title=f"nexus.{group.op}",
                description=group.description or None,
            )
            subscriber(self._admitter(group.op))
        try:
            async with asyncio.timeout(self.settings.nats.initial_connect_timeout_s):
                await broker.connect()  # nats-py would otherwise retry the first connect forever
        except (OSError, TimeoutError) as exc:
            url = self.settings.nats.url
            raise Unavailable(f"cannot connect to NATS at {url}: {exc!r}") from exc
        self.broker = broker
        install_speedups(self.nc, self.settings.nats)  # opt-in, off by default
        self.services = await create_services(self.nc, self.settings)
        if self._authenticator is None:
            # Workers are the auth boundary (NATS clients reach them directly): unless given
            # one, they enforce the token service from settings, failing here without keys.
            try:
                self._authenticator = await create_authenticator(self.settings, self.services)
            except BaseException:
                await close_services(self.services)
                await broker.stop()
                raise
        self.dispatcher = Dispatcher(
            self.settings,
            self.groups,
            self.services,
            authenticator=self._authenticator,
            transport=T_NATS,
            enforce_deadline=False,  # the reaper below does it for the whole worker
        )
        # Declared before subscribing: a request in between is a 503 (declared), never a 404.
        self.registration = await register(self.nc, self.settings, self.groups)
        await broker.start()
        self._reaper = asyncio.create_task(self._reap_expired())
        # Read at scrape time: no per-request cost on the hot path.
        METRICS.inflight.labels(T_NATS).set_function(lambda: self.inflight)
        if self.settings.jobs.enabled and self.groups:
            # Same ops, same handlers, on JetStream: the durable job consumers (docs/jobs.md).
            self.jobs = JobRunner(
                self.nc, self.settings, self.groups, self.services,
                authenticator=self._authenticator,
            )
            try:
                await self.jobs.start()
            except BaseException:
                await self.drain(0)  # release the broker and services this start opened
                raise
        if not self.settings.worker.faststream_subscribers:
            # Last, so answering requests means fully started. The fast path
            # (docs/runtime.md): the same admission on the broker's own connection, without
            # FastStream's per-message pipeline, which halves throughput.
            for group in self.groups:
                sub = await self.nc.subscribe(
                    operation_wildcard(group.op),
                    queue=queue_group(group.op),
                    cb=self._admitter(group.op),
                )
                self._subscriptions.append(sub)
            await flush_subscriptions(self.nc)  # requests reach us from now
        if self.discovery is not None:
            await self.discovery.start(self.nc)  # registers in the background
        logger.info("worker serving ops {}", ",".join(g.op for g in self.groups))

    def _unhealthy(self) -> str | None:
        """Why this worker cannot serve now (None: it can); its Consul TTL check follows it."""
        if self._draining:
            return "draining"
        if self.lost.is_set() or not self.nc.is_connected:
            return "NATS disconnected"
        if self._reaper is None or self._reaper.done():
            return "the deadline reaper stopped"
        return None

    def _in_flight(self) -> list[tuple[asyncio.Task[None], tuple[str, int]]]:
        """Requests being served that are waiting (the others finish without yielding)."""
        return list(self._tasks.items())

    def _deadline_of(self, msg: Msg) -> int:
        """When a request received now must be answered by (epoch ms), counted from receipt."""
        default_ms = self.settings.worker.default_timeout_ms
        return deadline_ms(msg.headers or _NO_HEADERS, int(time.time() * 1000), default_ms)

    def _admitter(self, op: str) -> Any:
        limit = asyncio.Semaphore(self.settings.worker.concurrency)

        async def admit(msg: Msg) -> None:
            # Everything that could raise comes before the slot is taken: a slot is released
            # only by its task's done-callback.
            deadline = self._deadline_of(msg)
            await limit.acquire()
            task = asyncio.create_task(self._serve(op, msg, deadline))
            self._tasks[task] = (op, deadline)
            task.add_done_callback(release)

        def release(task: asyncio.Task[None]) -> None:
            self._tasks.pop(task, None)
            limit.release()

        return admit

    async def _serve(self, op: str, msg: Msg, deadline: int) -> None:
        reply_to = msg.reply
        if reply_to and not is_inbox(reply_to, self._inbox_prefix):
            # Answering would let any publisher make us publish onto a command subject.
            logger.warning("refused request with a non-inbox reply subject on {}", msg.subject)
            METRICS.count_error(op, "invalid_reply_subject")
            return
        action = msg.subject.rsplit(".", 1)[-1]
        assert self.dispatcher is not None
        started = time.perf_counter_ns()
        result = await self.dispatcher.dispatch(
            op, action, msg.headers, msg.data, deadline=deadline
        )
        if self.discovery is not None:
            self.discovery.count(op, action, started, result)  # what $SRV.STATS reports
        if isinstance(result, Expired):
            logger.debug("dropped expired request {}", result.request_id)
            return
        if reply_to:
            result = self._fit(op, result)
            try:
                await self.nc.publish(reply_to, result.body, headers=result.headers)
            except Exception as exc:
                logger.warning("could not send reply: {}", exc)

    def _fit(self, op: str, reply: Reply) -> Reply:
        """The reply, or a small error reply when it would exceed the server's max_payload.

        The server answers an oversized publish (headers count) by closing the connection,
        which would take this worker off the bus for every other request.
        """
        limit = self.nc.max_payload
        if len(reply.body) + _HEADROOM <= limit:
            return reply  # the common case, without adding up the headers
        size = len(reply.body) + headers_size(reply.headers)
        if size <= limit:
            return reply
        METRICS.count_error(op, PayloadTooLarge.code)
        request_id = reply.headers.get(H_REQUEST_ID, "")
        detail = f"the reply of {size} bytes exceeds the server's max_payload of {limit}"
        return error_reply(PayloadTooLarge(detail), request_id)

    async def _reap_expired(self, interval_s: float = 0.1) -> None:
        """Cancel handlers still running past their caller's deadline (plus clock skew).

        Nobody waits for their answer any more; cancelling frees the concurrency slot.
        """
        skew = self.settings.worker.clock_skew_ms
        while True:
            await asyncio.sleep(interval_s)
            connection = self.broker._connection if self.broker is not None else None
            if connection is not None and connection.is_closed and not self._draining:
                # nats-py closes for good on some server errors: exit, so a supervisor
                # restarts us, instead of idling as a worker nobody can reach.
                logger.error("NATS connection closed for good; stopping the worker")
                self.lost.set()
                return
            now_ms = time.time() * 1000
            for task, (op, deadline) in self._in_flight():
                if now_ms > deadline + skew and not task.done():
                    task.cancel()
                    METRICS.expired.labels(op).inc()

    async def _stop_taking_requests(self, grace: float) -> None:
        """Unsubscribe every op; what was already delivered to this process is still served."""
        for subscription in self._subscriptions:
            # drain(): no new requests reach us, and those already delivered to this process
            # are still admitted (unsubscribe() would discard them, and their callers would
            # wait out their timeouts).
            try:
                await asyncio.wait_for(subscription.drain(), grace)  # type: ignore[no-untyped-call]
            except (TimeoutError, nats.errors.Error):
                with contextlib.suppress(nats.errors.Error):
                    await subscription.unsubscribe()
        assert self.broker is not None
        for subscriber in self.broker.subscribers:
            await subscriber.stop()

    async def _refuse(self, msg: Msg) -> None:
        """Answer a delivered request this draining worker will not start: 503, retryable."""
        if not msg.reply or not is_inbox(msg.reply, self._inbox_prefix):
            return
        error = Unavailable("the worker is shutting down; retry", retry_after=1)
        reply = error_reply(error, request_id_of(msg.headers or _NO_HEADERS))
        with contextlib.suppress(nats.errors.Error):
            await self.nc.publish(msg.reply, reply.body, headers=reply.headers)

    async def drain(self, grace_s: float | None = None) -> None:
        """Stop taking requests, let in-flight ones finish within `grace_s`, then disconnect."""
        if self._draining or self.broker is None:
            return
        self._draining = True
        if self.discovery is not None:
            await self.discovery.stop()  # out of Consul and $SRV before anything else stops
        grace = self.settings.worker.drain_grace_s if grace_s is None else grace_s
        if self.registration is not None:
            await self.registration.stop()  # still declared, no longer served
        await self._stop_taking_requests(grace)
        if self.jobs is not None:
            await self.jobs.drain(grace)  # stop fetching jobs; unfinished ones are handed back
        in_flight = {task for task, _ in self._in_flight()}
        if in_flight:
            logger.info("draining {} in-flight requests", len(in_flight))
            _, pending = await asyncio.wait(in_flight, timeout=grace)
            for task in pending:
                task.cancel()
        if self._reaper is not None:
            self._reaper.cancel()
        try:
            await self.broker.stop()  # drains the connection: queued replies are flushed
        except nats.errors.Error as exc:
            # NATS is down (reconnecting) or already closed: nothing can be flushed any more.
            logger.warning("NATS unavailable while stopping ({!r}); closing", exc)
            if self.broker._connection is not None:
                # nats-py's close() writes its pending buffer even onto a dead transport;
                # uvloop refuses with RuntimeError. The connection is gone either way.
                with contextlib.suppress(nats.errors.Error, RuntimeError, OSError):
                    await self.broker._connection.close()
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
            stopped = asyncio.create_task(stop.wait())
            lost = asyncio.create_task(self.lost.wait())
            await asyncio.wait({stopped, lost}, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            lost.cancel()
        finally:
            await self.drain()
        if self.lost.is_set():
            raise Unavailable("the NATS connection was closed by the server")
