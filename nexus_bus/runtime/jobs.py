"""The job runner: durable pull consumers on `NEXUS_JOBS`, one per op, inside the worker.

Each delivery runs the same registered handler as the synchronous path, through the same
`Dispatcher` (auth, decode, handler, error mapping); only the deadline differs (the job
timeout) and the handler's record store journals its writes (`nexus_bus/effects/`). Then:

- success → status `succeeded` with the result, then a confirmed ack (`ack_sync`); a result
  too large for the status document → status `failed` with 413 `payload_too_large`, then an
  ack;
- a retryable error with attempts left → status `pending` with the error, `nak(delay)` on the
  backoff schedule (a bare nak would redeliver at once);
- a permanent client error (4xx but 401) → status `failed` with its problem, then an ack: the
  operation answered, and the dead-letter queue is for work that could not be done;
- any other permanent error → dead-letter at once, status `failed`, `term`;
- a retryable error on the last attempt → dead-letter, status `dead`, `term`.

The consumer itself has no `max_deliver`: the runner counts attempts, so a job that kills its
worker on every attempt is still dead-lettered (by the next live worker) instead of being
abandoned in the stream once the server stops redelivering it. Long jobs send `in_progress`
every `heartbeat_s` so `ack_wait` only expires when the worker is really gone. Every status
write happens before the ack, and a finished job's later deliveries are acked unrun.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Iterable
from typing import Any, Final

import msgspec
import nats.errors
import nats.js.errors as jserr
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from nexus_bus.auth.base import Authenticator
from nexus_bus.bus import codec
from nexus_bus.bus.assets import again_if_missing, assets_of, stream_missing
from nexus_bus.bus.connection import round_trip
from nexus_bus.bus.metadata import LazyTrace, request_id_of
from nexus_bus.bus.replies import Expired, Reply, error_of, problem_of
from nexus_bus.config import Settings
from nexus_bus.constants import (
    DLQ_STREAM,
    H_CONTENT_TYPE,
    H_JOB_ID,
    JOBS_CONSUMER_PREFIX,
    JOBS_PREFIX,
    JOBS_STREAM,
    RESERVED_OPS,
    T_JOBS,
)
from nexus_bus.effects import effect_scope, journaled_services
from nexus_bus.errors import InvalidRequest, NexusError, PayloadTooLarge, Unavailable
from nexus_bus.jobs.dlq import Stored, dead_letter, dead_letter_headers
from nexus_bus.jobs.envelope import job_id_of_message, parse_job_subject, run_headers
from nexus_bus.jobs.metrics import JOBS_COMPLETED, JOBS_DEAD_LETTERED, JOBS_REDELIVERED
from nexus_bus.jobs.retry import Verdict, backoff_of, decide, is_client_error
from nexus_bus.jobs.status import JobRecord, JobStore, advance, write_outcome
from nexus_bus.jobs.streams import ensure_tracked_job_streams
from nexus_bus.observability import log_context, logger
from nexus_bus.operations import Operations
from nexus_bus.runtime.dispatch import Dispatcher
from nexus_bus.schemas.jobs import JobStatus
from nexus_bus.services import Services

_FETCH_WAIT_S: Final = 2.0  # one pull request's lifetime; bounds how long drain waits on it
_IDLE_AFTER_ERROR_S: Final = 0.5
_ACK_TIMEOUT_S: Final = 2.0
# The consumer of reserved ops' jobs: no op is named so (an op starts with a letter).
_RESERVED: Final = "_reserved"
_TERMINAL_STATUS: Final = {Verdict.FAILED: JobStatus.FAILED, Verdict.DEAD: JobStatus.DEAD}


def consumer_name(op: str) -> str:
    """The durable consumer of an op's jobs."""
    return f"{JOBS_CONSUMER_PREFIX}{op}"


class JobRunner:
    """Runs the jobs of the given ops with bounded concurrency, retries and dead-lettering."""

    def __init__(
        self,
        nc: Client,
        settings: Settings,
        groups: Iterable[Operations],
        services: Services,
        *,
        authenticator: Authenticator | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._nc = nc
        self._settings = settings
        self._conf = settings.jobs
        # Reserved ops (the token service) never run as jobs: submissions refuse them.
        self._groups = [g for g in groups if len(g) and g.op not in RESERVED_OPS]
        self._services = services
        self._authenticator = authenticator
        self._rng = rng or random.Random()
        self._clock = clock
        self._backoff = backoff_of(settings.jobs)
        self._js: JetStreamContext = nc.jetstream()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._subs: list[JetStreamContext.PullSubscription] = []
        self._consumers: dict[str, ConsumerConfig] = {}  # by label, to create them again
        self._stopping = False
        self._store: JobStore | None = None
        self._dispatcher: Dispatcher | None = None

    @property
    def inflight(self) -> int:
        """Jobs being run now."""
        return len(self._tasks)

    @property
    def ops(self) -> list[str]:
        """The ops whose jobs this runner consumes."""
        return [g.op for g in self._groups]

    async def start(self) -> None:
        """Create streams, bucket and consumers, and start consuming.

        Raises:
            Unavailable: JetStream cannot be reached or refuses a configuration.
        """
        self._store = JobStore(
            await ensure_tracked_job_streams(self._nc, self._settings),
            nc=self._nc,
            clock=self._clock,
        )
        self._dispatcher = Dispatcher(
            self._settings,
            self._groups,
            await journaled_services(self._services, record_ttl_s=self._conf.effect_ttl_s),
            authenticator=self._authenticator,
            transport=T_JOBS,
        )
        # Any NATS client can publish a job of a reserved op, which no worker serves as jobs:
        # taken by no consumer it would stay in the work queue for good. One consumer, shared
        # by every worker, fails them unrun (the dispatcher does not serve those ops: 404).
        consumers = [(group.op, [f"{JOBS_PREFIX}.{group.op}.*"]) for group in self._groups]
        consumers.append((_RESERVED, [f"{JOBS_PREFIX}.{op}.*" for op in sorted(RESERVED_OPS)]))
        for label, filters in consumers:
            sub = await self._subscribe(label, filters)
            self._subs.append(sub)
            self._loops.append(asyncio.create_task(self._consume(label, sub)))
        if self._groups:
            logger.info("job consumers for ops {}", ",".join(self.ops))

    async def _subscribe(
        self, label: str, filters: list[str]
    ) -> JetStreamContext.PullSubscription:
        name = consumer_name(label)
        config = ConsumerConfig(
            name=name,
            durable_name=name,
            description=f"nexus-bus jobs of op {label}",
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self._conf.ack_wait_s,
            max_deliver=-1,  # the runner counts attempts itself (see the module docstring)
            # One filter as `filter_subject`: the consumers of earlier versions, unchanged.
            filter_subject=filters[0] if len(filters) == 1 else None,
            filter_subjects=filters if len(filters) > 1 else None,
            max_ack_pending=max(1000, self._conf.concurrency * 4),
        )
        self._consumers[label] = config
        try:
            await self._js.add_consumer(JOBS_STREAM, config)
            return await self._js.pull_subscribe_bind(durable=name, stream=JOBS_STREAM)
        except nats.errors.Error as exc:
            raise Unavailable(f"cannot create the job consumer {name}: {exc}") from exc

    async def _consume(self, op: str, sub: JetStreamContext.PullSubscription) -> None:
        """Fetch as many jobs as there are free slots, run each in its own task."""
        slots = asyncio.Semaphore(self._conf.concurrency)
        while not self._stopping:
            await slots.acquire()
            taken = 1
            while taken < self._conf.concurrency and not slots.locked():
                await slots.acquire()  # free slots: returns at once
                taken += 1
            msgs: list[Msg] = []
            try:
                msgs = await sub.fetch(taken, timeout=_FETCH_WAIT_S)
            except TimeoutError:
                pass  # nothing to do right now
            except (nats.errors.Error, OSError) as exc:
                logger.warning("job fetch for {} failed: {}", op, exc)
                if stream_missing(exc):
                    await self._recreate_consumer(op)
                await asyncio.sleep(_IDLE_AFTER_ERROR_S)
            for _ in range(taken - len(msgs)):
                slots.release()
            for msg in msgs:
                task = asyncio.create_task(self._handle(op, msg))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                task.add_done_callback(lambda _t: slots.release())

    async def _recreate_consumer(self, label: str) -> None:
        """The consumer (or its stream) is gone (a memory-storage nats-server restarted, an
        operator deleted it): restore the streams (bus/assets.py), then create the consumer
        again. The pull subscription names it, so the next fetch reaches the new one."""
        await assets_of(self._nc).restore()
        config = self._consumers[label]
        try:
            await self._js.consumer_info(JOBS_STREAM, consumer_name(label))
        except jserr.NotFoundError:
            with contextlib.suppress(nats.errors.Error, OSError, TimeoutError):
                await self._js.add_consumer(JOBS_STREAM, config)
                logger.warning("job consumer {} was missing: recreated", config.durable_name)
        except (nats.errors.Error, OSError, TimeoutError):
            pass  # JetStream unreachable: the next fetch fails, and asks again

    async def _handle(self, op: str, msg: Msg) -> None:
        """Run one delivery; never raises (a failure leaves the message to be redelivered)."""
        try:
            await self._run(msg)
        except asyncio.CancelledError:
            # Drain ran out of grace: hand the job back now instead of after ack_wait. The short
            # delay outlives any pull request this process may still have open on the server.
            with contextlib.suppress(nats.errors.Error, OSError):
                await msg.nak(delay=_FETCH_WAIT_S)
            raise
        except NexusError as exc:
            logger.warning("job bookkeeping failed on {}: {}; it will be redelivered", op, exc)
            await self._hand_back(msg)
        except Exception:
            logger.exception("unexpected error running a job of {}", op)
            await self._hand_back(msg)

    async def _hand_back(self, msg: Msg) -> None:
        """Redeliver later, on the backoff schedule (capped: the outage may be long over)."""
        delay = self._backoff.compute(msg.metadata.num_delivered, self._rng)
        with contextlib.suppress(nats.errors.Error, OSError):
            await msg.nak(delay=min(delay, self._conf.ack_wait_s))

    async def _run(self, msg: Msg) -> None:
        assert self._store is not None
        meta = msg.metadata
        headers = dict(msg.headers or {})
        # A consumer's filters (`nexus.jobs.<op>.*`) leave an op and exactly one token.
        op, _, action = msg.subject[len(JOBS_PREFIX) + 1 :].partition(".")
        try:
            parse_job_subject(msg.subject, JOBS_PREFIX)
        except InvalidRequest as exc:
            await self._refuse_subject(op, action, msg, headers, exc)
            return
        job_id = job_id_of_message(op, action, headers, meta.sequence.stream)
        headers[H_JOB_ID] = job_id
        if meta.num_delivered > 1:
            JOBS_REDELIVERED.labels(op).inc()
        # The job's own ids on every line about it, the dead-letter line included: a failed
        # job is followed back to the request that submitted it by trace or request id.
        trace, request_id = LazyTrace(headers), request_id_of(headers)
        with log_context(
            op=op, action=action, job_id=job_id, trace_id=trace, correlation_id=request_id
        ):
            record, loaded = await self._load(job_id, op, action, meta.timestamp.timestamp())
            if record.finished:
                await self._ack(msg)  # a duplicate delivery of a finished job
                return
            # Attempts are handler runs, counted in the status document when each starts: a
            # delivery that failed on bookkeeping (JetStream briefly away) does not use one up.
            attempt = record.attempts + 1
            if attempt > self._conf.max_deliver:
                # The last runs ended without an outcome: the worker died or timed out.
                error = Unavailable(
                    f"no outcome after {record.attempts} attempts (crash or timeout)"
                )
                await self._bury(
                    msg, op, action, record, loaded, headers, error, Verdict.DEAD, record.attempts
                )
                return
            running = advance(record, JobStatus.RUNNING, now=self._clock(), attempts=attempt)
            revision = await self._store.write_unless_finished(running, loaded)
            if revision is None:
                await self._ack(msg)  # a twin delivery finished it meanwhile
                return
            reply = await self._attempt(op, action, job_id, headers, msg, attempt)
            await self._settle(msg, op, action, running, revision, headers, reply, attempt)

    async def _refuse_subject(
        self, op: str, action: str, msg: Msg, headers: dict[str, str], error: InvalidRequest
    ) -> None:
        """End a job whose action is no valid token (published by another NATS client) as
        `failed` with 400, unrun: a client error, not dead-lettered. Terminated without a
        status, its publisher would wait for the id it derives (docs/jobs.md) for ever."""
        assert self._store is not None
        job_id = job_id_of_message(op, action, headers, msg.metadata.sequence.stream)
        request_id = request_id_of(headers)  # made up when absent: drawn once
        with log_context(op=op, job_id=job_id, correlation_id=request_id):
            record, loaded = await self._load(
                job_id, op, action, msg.metadata.timestamp.timestamp()
            )
            if not record.finished:
                problem = _problem(error, request_id)
                failed = advance(record, JobStatus.FAILED, now=self._clock(), error=problem)
                await self._store.write_unless_finished(failed, loaded)
                JOBS_COMPLETED.labels(op, Verdict.REJECTED.value).inc()
            logger.warning("job on a malformed subject {!r} failed unrun", msg.subject[:80])
            await self._ack(msg)

    async def _load(
        self, job_id: str, op: str, action: str, enqueued_at: float
    ) -> tuple[JobRecord, int | None]:
        """The job's status and its revision (None: no document yet)."""
        assert self._store is not None
        try:
            return await self._store.get(job_id)
        except LookupError:  # published by another client, or its status expired
            record = JobRecord(
                id=job_id,
                op=op,
                action=action,
                status=JobStatus.PENDING,
                created_at=enqueued_at,
                updated_at=self._clock(),
            )
            return record, None

    async def _attempt(
        self, op: str, action: str, job_id: str, headers: dict[str, str], msg: Msg, attempt: int
    ) -> Reply | Expired:
        assert self._dispatcher is not None
        beat = asyncio.create_task(self._heartbeat(msg))
        try:
            hdrs = run_headers(
                headers, now_ms=int(self._clock() * 1000), timeout_s=self._conf.timeout_s
            )
            with effect_scope(job_id):
                return await self._dispatcher.dispatch(op, action, hdrs, msg.data, attempt=attempt)
        finally:
            beat.cancel()

    async def _heartbeat(self, msg: Msg) -> None:
        while True:
            await asyncio.sleep(self._conf.heartbeat_s)
            try:
                await msg.in_progress()
            except (nats.errors.Error, OSError) as exc:
                logger.debug("in_progress failed: {}", exc)

    async def _settle(
        self,
        msg: Msg,
        op: str,
        action: str,
        running: JobRecord,
        revision: int,
        headers: dict[str, str],
        reply: Reply | Expired,
        attempt: int,
    ) -> None:
        assert self._store is not None
        if isinstance(reply, Expired):  # cannot happen with a job-long deadline; retry anyway
            error: NexusError | None = Unavailable("the job's deadline passed before it started")
            status, retryable = 503, True
        else:
            status = reply.status
            error = error_of(status, reply.body) if status >= 400 else None
            retryable = error.retryable if error is not None else False
        decision = decide(
            status=status,
            retryable=retryable,
            attempt=attempt,
            max_deliver=self._conf.max_deliver,
            backoff=self._backoff,
            rng=self._rng,
        )
        if decision.verdict is Verdict.SUCCEEDED:
            assert isinstance(reply, Reply)
            await self._succeed(msg, op, running, revision, reply)
            return
        JOBS_COMPLETED.labels(op, decision.verdict.value).inc()
        assert error is not None
        if decision.verdict is Verdict.REJECTED:
            await self._reject(msg, running, revision, error)
            return
        if decision.verdict is Verdict.RETRY:
            problem = _problem(error, running.request_id)
            retry = advance(running, JobStatus.PENDING, now=self._clock(), error=problem)
            if await self._store.write_unless_finished(retry, revision) is None:
                await self._ack(msg)  # a twin delivery finished the job: nothing to retry
                return
            logger.info(
                "job attempt {} failed ({}); retry in {:.3f}s",
                attempt,
                error.code,
                decision.delay_s,
            )
            await msg.nak(delay=decision.delay_s)
            return
        await self._bury(
            msg, op, action, running, revision, headers, error, decision.verdict, attempt
        )

    async def _succeed(
        self, msg: Msg, op: str, running: JobRecord, revision: int, reply: Reply
    ) -> None:
        """Store the result in the status document, then ack.

        The document is a KV message, held to the server's max_payload with its header. A
        result that does not fit would not fit on any rerun either, and handing the message
        back would only run the handler again until the job is dead-lettered as "no outcome":
        the job ends `failed` with 413 `payload_too_large`, the result dropped (its writes
        stay committed), as a synchronous call gets a 413 for a reply too large to send.
        """
        assert self._store is not None
        done = advance(running, JobStatus.SUCCEEDED, now=self._clock(), result=_result_of(reply))
        try:
            # A twin that finished first keeps its status; the job succeeded either way.
            await write_outcome(
                self._store, done, revision, keepalive=msg.in_progress, sleep=asyncio.sleep
            )
        except PayloadTooLarge as exc:
            JOBS_COMPLETED.labels(op, Verdict.REJECTED.value).inc()
            too_large = PayloadTooLarge(f"the result does not fit the job's status: {exc.detail}")
            await self._reject(msg, running, revision, too_large)
            return
        JOBS_COMPLETED.labels(op, Verdict.SUCCEEDED.value).inc()
        await self._ack(msg)

    async def _reject(
        self, msg: Msg, running: JobRecord, revision: int, error: NexusError
    ) -> None:
        """End the job as `failed` with the client error its operation answered; no DLQ."""
        assert self._store is not None
        failed = advance(
            running, JobStatus.FAILED, now=self._clock(), error=_problem(error, running.request_id)
        )
        # The handler ran (its writes are committed): write the outcome through a brief
        # JetStream outage rather than hand the message back, as for a success.
        await write_outcome(
            self._store, failed, revision, keepalive=msg.in_progress, sleep=asyncio.sleep
        )
        logger.info("job failed: {} {}: {}", error.http_status, error.code, error.detail)
        await self._ack(msg)

    async def _bury(
        self,
        msg: Msg,
        op: str,
        action: str,
        record: JobRecord,
        revision: int | None,
        headers: dict[str, str],
        error: NexusError,
        verdict: Verdict,
        attempts: int,
    ) -> None:
        """Dead-letter the message, record the final status, then `term` it.

        The entry is stored before the status: a crash in between redelivers the job, and the
        entry's msg id keeps it single, whereas the other order could lose the entry.
        """
        assert self._store is not None
        meta = msg.metadata
        now = self._clock()
        entry_headers = dead_letter_headers(
            headers,
            error=error,
            attempts=attempts,
            subject=msg.subject,
            stream_seq=meta.sequence.stream,
            enqueued_at=meta.timestamp.timestamp(),
            failed_at=now,
        )

        async def store_entry() -> Stored:
            return await dead_letter(
                self._js, op=op, action=action, data=msg.data,
                max_payload=self._nc.max_payload, headers=entry_headers,
            )  # fmt: skip

        # A DLQ stream gone since start is created again, and the entry stored there.
        entry = await again_if_missing(self._nc, store_entry)
        status = _TERMINAL_STATUS[verdict]
        final = advance(
            record, status, now=now, attempts=attempts, error=_problem(error, record.request_id)
        )
        if await self._store.write_unless_finished(final, revision) is None:
            # A twin delivery finished the job meanwhile. Its entry and this one are the same
            # (one per delivered message, `dlq-<seq>`): it goes only if this delivery stored it
            # and the twin's outcome was not dead-lettered too. A deduplicated publish names
            # the entry another delivery stored, and the twin that dead-lettered and won may
            # well be the one whose publish was deduplicated onto this delivery's entry.
            if not entry.duplicate and not await self._dead_lettered(record.id):
                with contextlib.suppress(NexusError, nats.errors.Error):
                    await self._js.delete_msg(DLQ_STREAM, entry.seq)
            await self._ack(msg)
            return
        JOBS_DEAD_LETTERED.labels(op, status.value).inc()
        logger.warning(
            "job dead-lettered after {} attempts: {}: {}", attempts, error.code, error.detail
        )
        await msg.term()

    async def _dead_lettered(self, job_id: str) -> bool:
        """Whether the job's final status is one that went through the DLQ (`dead`, or
        `failed` with a server error or 401), so its entry must stay.

        When the status cannot be read the answer is yes: a spurious entry can be purged,
        a deleted one cannot be brought back.
        """
        assert self._store is not None
        try:
            record, _ = await self._store.get(job_id)
        except NexusError:
            return True
        if record.status is JobStatus.DEAD:
            return True
        if record.status is not JobStatus.FAILED:
            return False
        status = record.error.get("status") if isinstance(record.error, dict) else None
        return not (isinstance(status, int) and is_client_error(status))

    async def _ack(self, msg: Msg) -> None:
        # A confirmed ack; if it is lost the job is redelivered and acked unrun as finished.
        try:
            await msg.ack_sync(timeout=_ACK_TIMEOUT_S)
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            logger.warning("job ack not confirmed ({}); a redelivery will be skipped", exc)

    async def drain(self, grace_s: float | None = None) -> None:
        """Stop fetching, let running jobs finish within `grace_s`, hand back the rest."""
        if self._stopping:
            return
        self._stopping = True
        for loop in self._loops:
            loop.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        # Cancelling a fetch does not withdraw its pull request from the server: without the
        # inbox's interest, the server cannot hand a job back to this process while it stops.
        for sub in self._subs:
            with contextlib.suppress(nats.errors.Error, OSError):
                await sub.unsubscribe()
        grace = self._settings.worker.drain_grace_s if grace_s is None else grace_s
        if self._tasks:
            logger.info("draining {} running jobs", len(self._tasks))
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        # The naks and acks above are buffered publishes: send them before the worker closes
        # the connection, or handed-back jobs wait out their ack_wait instead.
        with contextlib.suppress(nats.errors.Error, OSError, TimeoutError):
            await round_trip(self._nc, timeout_s=2)


def _problem(error: NexusError, request_id: str | None) -> Any:
    return msgspec.to_builtins(problem_of(error, request_id))


def _result_of(reply: Reply) -> Any:
    """The reply body as plain data for the status document (JSON or MessagePack)."""
    try:
        return codec.decode(
            reply.body,
            Any,
            media=codec.media_type(reply.headers.get(H_CONTENT_TYPE)),
            max_bytes=len(reply.body) + 1,
            max_depth=1024,
        )
    except NexusError:
        return reply.body.decode(errors="replace")
