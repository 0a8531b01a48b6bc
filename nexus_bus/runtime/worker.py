"""The worker runtime: a FastStream application, one NATS subscriber per op.

Each op group is a FastStream NATS subscriber on `nexus.<op>.*` in queue group `nexus.<op>`
(so FastStream documents it in AsyncAPI, and `faststream run nexus_bus.runtime.app:app`
serves the same app as `nexus-bus worker`). The subscriber's handler is a thin admission
layer: nats-py runs a subscription's callback serially, so it admits the message into a
bounded set of tasks (a semaphore of `worker.concurrency` per op) and returns; when the set
is full it waits, and backpressure reaches nats-py's pending limits instead of our memory.
Each task runs `Dispatcher.dispatch` (deadline, auth, validation, handler, metrics, tracing,
error mapping) and replies only on an inbox-shaped subject. On drain the subscriptions are
drained first (no new work), then in-flight tasks finish within the grace period.

Only public API of FastStream and nats-py is used: the broker's `connect()`, `connection`,
`subscriber()` and `subscribers`, the app's hooks, and a subscriber's `subscription`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable
from typing import Any

import nats.errors
from faststream import AckPolicy, FastStream
from faststream.nats import NatsBroker, NatsMessage
from faststream.nats.subscriber.usecases import CoreSubscriber
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from nexus_bus.auth import Authenticator, create_authenticator
from nexus_bus.bus.connection import (
    broker_options,
    describe,
    install_speedups,
    round_trip,
)
from nexus_bus.bus.metadata import deadline_ms, headers_size, request_id_of
from nexus_bus.bus.replies import Expired, Reply, error_reply
from nexus_bus.bus.subjects import is_inbox, operation_wildcard, queue_group
from nexus_bus.cache.declare import declaration_problems
from nexus_bus.cache.service import recheck_a_renewed_bucket
from nexus_bus.config import Settings
from nexus_bus.constants import H_REQUEST_ID, T_NATS
from nexus_bus.discovery import WorkerDiscovery
from nexus_bus.effects import journaled_services
from nexus_bus.errors import ConfigError, PayloadTooLarge, Unavailable, UpstreamTimeout
from nexus_bus.observability import METRICS, logger
from nexus_bus.operations import Operations, check_distinct
from nexus_bus.registry import Registration, register
from nexus_bus.runtime.dispatch import Dispatcher
from nexus_bus.runtime.jobs import JobRunner
from nexus_bus.services import Services, close_services, create_services

_NO_HEADERS: dict[str, str] = {}
# More than a reply's headers can take (status, ids, content type, a truncated error detail).
_HEADROOM = 8 * 1024
# A reaper tick this much later than due means the event loop was blocked (synchronous code in
# a handler): every request of this worker waited, and the log says which ops ran meanwhile.
_BLOCKED_S = 0.5
# How long handlers cancelled at the end of a drain get to unwind before it goes on without
# them (one that catches CancelledError and carries on would otherwise hold the drain forever).
_UNWIND_S = 1.0


async def _parse(msg: Msg) -> NatsMessage:
    """FastStream parser: the message as FastStream carries it, without what the default
    parser adds for handlers we do not have (subject path parameters, a generated uuid4 as
    correlation id): the reply inbox identifies the exchange, the request id the request."""
    headers = msg.headers or _NO_HEADERS
    return NatsMessage(
        raw_message=msg,
        body=msg.data,
        reply_to=msg.reply,
        headers=headers,
        correlation_id=msg.reply or msg.subject,
        message_id=headers.get(H_REQUEST_ID),
    )


async def _raw_message(msg: NatsMessage) -> Msg:
    """FastStream decoder that hands our runtime the nats-py message untouched."""
    raw: Msg = msg.raw_message
    return raw


class Worker:
    """Serves registered operations over NATS core request/reply, as a FastStream app.

    `start()`/`drain()` (or `run()`) drive it from a program or a test; `app` is the same
    worker as a FastStream application, whose hooks do the same steps.

    Raises:
        ConfigError: (on creation) a cache namespace read with `revision=` is written or
            invalidated without it (docs/cache.md).
        DeclarationError: two of `groups` have the same op.
    """

    def __init__(
        self,
        settings: Settings,
        groups: Iterable[Operations],
        *,
        authenticator: Authenticator | None = None,
    ) -> None:
        self.settings = settings
        self.groups = [g for g in groups if len(g)]
        check_distinct(self.groups)  # two subscribers in one queue group: one group's 404s
        if settings.cache.enabled:
            # Users' declarations of one namespace must agree (docs/cache.md).
            handlers = ((f"{o.op}.{o.action}", o.handler) for g in self.groups for o in g)
            problems = declaration_problems(handlers)
            if problems:
                raise ConfigError("cache declarations: " + "; ".join(problems))
        self._authenticator = authenticator
        self._inbox_prefix = settings.nats.inbox_prefix
        # In-flight tasks with their op and absolute deadline (epoch ms), for the reaper.
        self._tasks: dict[asyncio.Task[None], tuple[str, int]] = {}
        self._ended_ops: set[str] = set()  # ops of requests ended since the reaper's last tick
        self._reaper: asyncio.Task[None] | None = None
        self.lost = asyncio.Event()  # set when the NATS connection is closed for good
        self._draining = False
        self._refusing = False  # the drain's grace ran out: requests still waiting get 503
        self._grace_s = settings.worker.drain_grace_s
        self.stuck = 0  # handlers still running after the drain cancelled them (`drain`)
        self._nc: Client | None = None
        self._connect_error: Exception | None = None  # the first connect's last failed attempt
        self.services: Services | None = None
        self.dispatcher: Dispatcher | None = None
        self.jobs: JobRunner | None = None
        self.registration: Registration | None = None
        self.discovery: WorkerDiscovery | None = None  # $SRV and Consul (docs/discovery.md)
        self._subscribers: list[CoreSubscriber] = []
        self.broker = self._create_broker()
        self.app = FastStream(
            self.broker,
            logger=None,
            on_startup=[self._on_startup],
            after_startup=[self._after_startup],
            on_shutdown=[self._on_shutdown],
            after_shutdown=[self._after_shutdown],
        )

    def _reconnected(self) -> None:
        """NATS is back: a data bucket created again meanwhile was announced to nobody here
        (`recheck_a_renewed_bucket`, in the background)."""
        services = self.services
        if services is None or services.cache is None:
            return
        services.cache.spawn(
            recheck_a_renewed_bucket(services.cache, services.js, self.settings.cache)
        )

    def _create_broker(self) -> NatsBroker:
        name = f"{self.settings.service}-worker"
        opts = broker_options(self.settings.nats, name=name, reconnected=self._reconnected)
        connected_error_cb = opts["error_cb"]

        async def on_error(exc: Exception) -> None:
            # The first connect's failed attempts, as `connect_nats` has them: at INFO (not
            # the WARNING of a connection that was up), the last one kept for the error.
            if self._nc is None:
                self._connect_error = exc
                logger.info("nats connect attempt failed: {}", exc)
                return
            await connected_error_cb(exc)

        opts["error_cb"] = on_error
        broker = NatsBroker(
            **opts,
            parser=_parse,
            decoder=_raw_message,
            apply_types=False,
            logger=None,
            graceful_timeout=self.settings.worker.drain_grace_s,
        )
        for group in self.groups:
            subscriber = broker.subscriber(
                operation_wildcard(group.op),
                queue=queue_group(group.op),
                no_reply=True,  # replies only to inbox subjects, by `_serve`
                # Core NATS has no acks; MANUAL leaves FastStream's ack middleware out.
                ack_policy=AckPolicy.MANUAL,
                title=f"nexus.{group.op}",
                description=group.description or None,
            )
            subscriber(self._admitter(group.op))
            self._subscribers.append(subscriber)
        return broker

    @property
    def nc(self) -> Client:
        """The worker's NATS connection (after `start`)."""
        if self._nc is None:
            raise Unavailable("worker is not started")
        return self._nc

    @property
    def authenticator(self) -> Authenticator | None:
        """The authenticator requests pass (after `start`, the one built from settings)."""
        return self._authenticator

    @property
    def inflight(self) -> int:
        """Requests being handled now."""
        return len(self._tasks)

    async def start(self) -> None:
        """Connect, create streams and buckets, and start serving every op.

        Raises:
            Unavailable: NATS or JetStream cannot be reached.
            ConfigError: auth is enabled but no signing or verification keys are configured,
                or the Consul address or token file is unusable.
        """
        await self.app.start()

    async def _on_startup(self) -> None:
        """Before the subscribers: connection, services, auth, dispatcher, jobs, registry."""
        if self.settings.worker.micro or self.settings.consul.enabled:  # docs/discovery.md
            self.discovery = WorkerDiscovery(self.settings, self.groups, unhealthy=self._unhealthy)
        try:
            async with asyncio.timeout(self.settings.nats.initial_connect_timeout_s):
                # nats-py would otherwise retry the first connect forever.
                self._nc = await self.broker.connect()
        except (OSError, TimeoutError) as exc:
            url, cause = self.settings.nats.url, self._connect_error or exc
            raise Unavailable(f"cannot connect to NATS at {url}: {describe(cause)}") from cause
        install_speedups(self.nc, self.settings.nats)  # opt-in, off by default
        self.services = await create_services(self.nc, self.settings)
        try:
            if self._authenticator is None:
                # Workers are the auth boundary (NATS clients reach them directly): unless
                # given one, they enforce the token service from settings, failing here
                # without keys.
                self._authenticator = await create_authenticator(self.settings, self.services)
            keyed = None
            if self.settings.resilience.enabled and self.groups:
                # Requests with an Idempotency-Key journal their writes, so a worker dying
                # before it recorded the reply cannot make the retry write twice; the records
                # are kept as long as the reply would be (docs/resilience.md).
                keyed = await journaled_services(
                    self.services,
                    record_ttl_s=self.settings.resilience.idempotency_retention_s,
                )
            self.dispatcher = Dispatcher(
                self.settings,
                self.groups,
                self.services,
                authenticator=self._authenticator,
                transport=T_NATS,
                enforce_deadline=False,  # the reaper below does it for the whole worker
                keyed_services=keyed,
            )
            if self.settings.jobs.enabled and self.groups:
                # Same ops, same handlers, on JetStream: the durable job consumers
                # (docs/jobs.md, and docs/runtime.md for why not a FastStream subscriber).
                self.jobs = JobRunner(
                    self.nc, self.settings, self.groups, self.services,
                    authenticator=self._authenticator,
                )
                await self.jobs.start()
            # Declared before subscribing: a request in between is a 503, never a 404.
            self.registration = await register(self.nc, self.settings, self.groups)
        except BaseException:
            await self._release()
            raise
        self._reaper = asyncio.create_task(self._reap_expired())
        # Read at scrape time: no per-request cost on the hot path.
        METRICS.inflight.labels(T_NATS).set_function(lambda: self.inflight)

    async def _after_startup(self) -> None:
        """The subscribers are up (FastStream subscribed them last): answer from now on."""
        await round_trip(self.nc)  # requests reach us from now
        if self.discovery is not None:
            await self.discovery.start(self.nc)  # registers in the background
        logger.info("worker serving ops {}", ",".join(g.op for g in self.groups))

    async def _release(self) -> None:
        """Undo a start that failed half way: jobs, services and the connection."""
        if self.jobs is not None:
            await self.jobs.drain(0)
        if self.services is not None:
            await close_services(self.services)
            self.services = None
        with contextlib.suppress(nats.errors.Error, RuntimeError, OSError):
            await self.broker.stop()

    def _unhealthy(self) -> str | None:
        """Why this worker cannot serve now (None: it can); its Consul TTL check follows it."""
        if self._draining:
            return "draining"
        if self.lost.is_set() or not self.nc.is_connected:
            return "NATS disconnected"
        if self._reaper is None or self._reaper.done():
            return "the deadline reaper stopped"
        return None

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
            if self._refusing:
                limit.release()
                await self._refuse(msg)
                return
            task = asyncio.create_task(self._serve(op, msg, deadline))
            self._tasks[task] = (op, deadline)
            task.add_done_callback(release)

        def release(task: asyncio.Task[None]) -> None:
            self._tasks.pop(task, None)
            self._ended_ops.add(op)  # a handler that blocked the loop has ended by the next tick
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
        try:
            result = await self.dispatcher.dispatch(
                op, action, msg.headers, msg.data, deadline=deadline
            )
        except asyncio.CancelledError:
            if self._refusing and reply_to:
                await self._abandoned(reply_to, msg)
            raise
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
        loop = asyncio.get_running_loop()
        while True:
            self._ended_ops.clear()
            due = loop.time() + interval_s
            await asyncio.sleep(interval_s)
            if loop.time() - due >= _BLOCKED_S:
                self._blocked(loop.time() - due)
            if self._nc is not None and self._nc.is_closed and not self._draining:
                # nats-py closes for good on some server errors: exit, so a supervisor
                # restarts us, instead of idling as a worker nobody can reach.
                logger.error("NATS connection closed for good; stopping the worker")
                self.lost.set()
                self.app.exit()  # ends `FastStream.run` (and so `run()`) when it runs us
                return
            now_ms = time.time() * 1000
            for task, (op, deadline) in list(self._tasks.items()):
                if now_ms > deadline + skew and not task.done():
                    task.cancel()
                    METRICS.expired.labels(op).inc()

    def _blocked(self, late_s: float) -> None:
        """Say that the event loop was blocked, and which ops ran meanwhile."""
        ops = sorted(self._ended_ops | {op for op, _ in self._tasks.values()})
        logger.warning(
            "the event loop was blocked for {:.1f} s (synchronous code in a handler?); every"
            " request of this worker waited; ops running meanwhile: {}",
            late_s, ",".join(ops) or "none",
        )  # fmt: skip

    async def _stop_delivery(self, grace: float) -> None:
        """Drain every op's subscription at once: no new requests reach this worker, and
        those already delivered to it are still admitted (unsubscribe() would discard them,
        and their callers would wait out their timeouts)."""
        drains = [
            self._drain_subscription(subscriber, grace) for subscriber in self._subscribers
        ]
        await asyncio.gather(*drains)

    async def _drain_subscription(self, subscriber: CoreSubscriber, grace: float) -> None:
        subscription = subscriber.subscription
        if not isinstance(subscription, Subscription):
            return
        try:
            await asyncio.wait_for(subscription.drain(), grace)  # type: ignore[no-untyped-call]
        except (TimeoutError, nats.errors.Error):
            self._refusing = True  # the ones still waiting for a slot: 503
            with contextlib.suppress(nats.errors.Error):
                await subscription.unsubscribe()
        # FastStream has no drain of its own: its stop() would unsubscribe the drained
        # (closed) subscription again, and fail. Handing it back as "none" makes its stop()
        # only mark the subscriber stopped (after waiting for admissions in progress).
        subscriber.subscription = None

    async def _finish_in_flight(self, deadline: float) -> None:
        """Let in-flight requests finish until `deadline` (the loop's clock); then refuse the
        rest and cancel what still runs, which frees every slot an admission may be waiting
        for. A cancelled request's caller is answered at once (`_serve`)."""
        while self._tasks:
            logger.info("draining {} in-flight requests", len(self._tasks))
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            # Tasks admitted meanwhile (requests delivered before the drain) are waited for
            # too, within the same grace.
            await asyncio.wait(set(self._tasks), timeout=remaining)
        self._refusing = True
        pending = [task for task in self._tasks if not task.done()]
        for task in pending:
            task.cancel()
        if not pending:
            return
        _, stuck = await asyncio.wait(pending, timeout=_UNWIND_S)
        if stuck:
            self.stuck = len(stuck)
            ops = sorted({self._tasks[task][0] for task in stuck if task in self._tasks})
            logger.error(
                "{} handlers of ops {} ignored their cancellation; stopping without them",
                len(stuck), ",".join(ops),
            )  # fmt: skip

    async def _abandoned(self, reply_to: str, msg: Msg) -> None:
        """Answer the caller of a request the drain cancelled when its grace ran out, rather
        than leave it to its timeout: 504 `upstream_timeout`, as the timeout would have
        said. Not 503: the handler may have done part of its work, so only an idempotent
        request (or one with an Idempotency-Key) may be retried."""
        error = UpstreamTimeout("the worker shut down before the request finished")
        reply = error_reply(error, request_id_of(msg.headers or _NO_HEADERS))
        with contextlib.suppress(nats.errors.Error):
            await self.nc.publish(reply_to, reply.body, headers=reply.headers)

    async def _refuse(self, msg: Msg) -> None:
        """Answer a delivered request this draining worker will not start: 503, retryable."""
        if not msg.reply or not is_inbox(msg.reply, self._inbox_prefix):
            return
        error = Unavailable("the worker is shutting down; retry", retry_after=1)
        reply = error_reply(error, request_id_of(msg.headers or _NO_HEADERS))
        with contextlib.suppress(nats.errors.Error):
            await self.nc.publish(msg.reply, reply.body, headers=reply.headers)

    async def drain(self, grace_s: float | None = None) -> None:
        """Stop taking requests, let in-flight ones finish within `grace_s`, then disconnect.

        Handlers still running then are cancelled; those that ignore it (they catch
        CancelledError and carry on) are left running after a second, and counted in
        `stuck`: a process should exit without waiting for them (`nexus-bus worker` does).
        """
        if self._draining or self._nc is None:
            return
        if grace_s is not None:
            self._grace_s = grace_s
        try:
            await self.app.stop()  # the shutdown hooks below, around the broker's stop
        except nats.errors.Error as exc:
            await self._stopped_without_nats(exc)

    async def _stopped_without_nats(self, exc: nats.errors.Error) -> None:
        """The broker could not drain its connection: NATS is down (reconnecting) or closed,
        and nothing can be flushed any more. Close it, and finish the shutdown."""
        logger.warning("NATS unavailable while stopping ({!r}); closing", exc)
        # nats-py's close() writes its pending buffer even onto a dead transport; uvloop
        # refuses with RuntimeError. The connection is gone either way.
        with contextlib.suppress(nats.errors.Error, RuntimeError, OSError):
            await self.nc.close()
        await self._after_shutdown()

    async def _on_shutdown(self) -> None:
        """Before the broker stops: out of discovery, no new requests, in-flight finish.

        Each step is bounded by the grace period, and none waits on a later one: the
        subscribers are stopped last, because FastStream's stop waits for every admission
        in progress, and an admission waiting for a concurrency slot is released only once
        the in-flight requests holding the slots have finished or been cancelled.
        """
        if self._draining:
            return
        self._draining = True
        if self.discovery is not None:
            await self.discovery.stop()  # out of Consul and $SRV before anything else stops
        # One grace for all the steps, not one each: a supervisor that kills after the grace
        # would otherwise kill a worker still finishing (each step took up to all of it).
        loop = asyncio.get_running_loop()
        end = loop.time() + self._grace_s
        if self.registration is not None:
            await self.registration.stop()  # still declared, no longer served
        await self._stop_delivery(max(0.0, end - loop.time()))
        if self.jobs is not None:
            # Stop fetching jobs; unfinished ones are handed back.
            await self.jobs.drain(max(0.0, end - loop.time()))
        await self._finish_in_flight(end)
        for subscriber in self._subscribers:
            await subscriber.stop()  # no admission is waiting any more: returns at once
        if self._reaper is not None:
            self._reaper.cancel()

    async def _after_shutdown(self) -> None:
        """After the broker drained its connection (queued replies flushed): services."""
        if self.services is not None:
            await close_services(self.services)
            self.services = None
            logger.info("worker stopped")

    async def run(self) -> None:
        """Serve as a FastStream app until SIGTERM or SIGINT (or the connection is lost for
        good), draining on the way out.

        Raises:
            Unavailable: the NATS connection was closed by the server.
        """
        try:
            await self.app.run()
        except nats.errors.Error as exc:
            await self._stopped_without_nats(exc)
        except Unavailable as exc:
            if self._nc is None and self._connect_error is not None:
                # The first connect failed; FastStream's app re-raises the startup error
                # without its cause, which says what the attempts met (the CLI names a
                # refusal: nothing listens there).
                raise exc from self._connect_error
            raise
        if self.lost.is_set():
            raise Unavailable("the NATS connection was closed by the server")
