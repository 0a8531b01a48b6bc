"""From a received request to its reply: deadline, auth, decode, handler, error mapping.

Transport-free: the worker runtime (core request/reply) and the job runner (JetStream) both
call `Dispatcher.dispatch`, so an operation behaves the same on either path.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine, Iterable, Mapping
from typing import Any, Final

from nexus_bus.auth.base import Authenticator, NoAuthentication
from nexus_bus.bus import codec
from nexus_bus.bus.metadata import LazyTrace, deadline_ms, request_id_of
from nexus_bus.bus.replies import Expired, Reply, error_reply, success_reply
from nexus_bus.config import Settings
from nexus_bus.constants import H_CONTENT_TYPE, H_IDEMPOTENCY_KEY, T_NATS, UNKNOWN_LABEL
from nexus_bus.context import Principal, RequestContext
from nexus_bus.errors import (
    IdempotencyMismatch,
    InternalError,
    NexusError,
    UnknownOperation,
    UpstreamTimeout,
)
from nexus_bus.observability import METRICS, bind_request, logger, release
from nexus_bus.observability.access import access_log_enabled, log_served
from nexus_bus.observability.tracing import TRACING, SpanKind, mark_error
from nexus_bus.operations import Operation, Operations
from nexus_bus.policies.admission import Admission, create_admission
from nexus_bus.policies.ratelimit import RateLimitExceeded
from nexus_bus.services import Services

_EMPTY: Final[Mapping[str, str]] = {}


class Dispatcher:
    """Runs registered operations for requests from any transport.

    Args:
        settings: limits, deadlines, and the policy layer's settings.
        groups: the operations served.
        services: what handlers reach through `ctx.services`.
        authenticator: checks tokens (None: no authentication).
        transport: the metric label; core request/reply (`T_NATS`) also gets admission (rate
            limits, idempotent replay).
        enforce_deadline: bound each handler by its request's deadline here.
        keyed_services: the services handed to requests with an `Idempotency-Key`, whose
            record store journals their writes (`effects.journaled_services`); None: every
            request gets `services`.
    """

    def __init__(
        self,
        settings: Settings,
        groups: Iterable[Operations],
        services: Services,
        *,
        authenticator: Authenticator | None = None,
        transport: str = T_NATS,
        enforce_deadline: bool = True,
        keyed_services: Services | None = None,
    ) -> None:
        self._settings = settings
        self._limits = settings.limits
        self._skew_ms = settings.worker.clock_skew_ms
        self._default_ms = settings.worker.default_timeout_ms
        self._groups = {g.op: g for g in groups}
        self._services = services
        self._keyed_services = keyed_services
        self._auth = authenticator or NoAuthentication()
        self._transport = transport
        # The core request path enforces deadlines with one reaper task per worker instead:
        # an asyncio.timeout per request costs more than the rest of the dispatch.
        self._enforce_deadline = enforce_deadline
        # Decided once: building an access line costs even when the level drops it.
        self._access_log = access_log_enabled(settings.log)
        # Rate limits and idempotent replay (docs/resilience.md) on the core request path;
        # jobs have their own (JetStream dedup and the job-scoped effect journal, docs/jobs.md).
        self._admission: Admission | None = (
            create_admission(settings, services.redis) if transport == T_NATS else None
        )

    @property
    def ops(self) -> list[str]:
        """The ops this dispatcher serves."""
        return list(self._groups)

    def operation(self, op: str, action: str) -> Operation:
        """The registered operation.

        Raises:
            UnknownOperation: no such op or action here.
        """
        found = self._lookup(op, action)
        if found is None:
            raise UnknownOperation(f"unknown operation {op}.{action}")
        return found

    def _lookup(self, op: str, action: str) -> Operation | None:
        group = self._groups.get(op)
        return group.get(action) if group is not None else None

    async def dispatch(
        self,
        op: str,
        action: str,
        headers: Mapping[str, str] | None,
        data: bytes,
        *,
        attempt: int = 1,
        now: float | None = None,
        deadline: int | None = None,
    ) -> Reply | Expired:
        """Serve one request and build its reply; never raises for a request's own failure."""
        started = time.perf_counter()
        hdrs = headers or _EMPTY
        request_id = request_id_of(hdrs)
        now_ms = int((time.time() if now is None else now) * 1000)
        if deadline is None:
            deadline = deadline_ms(hdrs, now_ms, self._default_ms)
        if now_ms > deadline + self._skew_ms:
            # nats-py's reconnect buffer can deliver a request long after its caller gave up.
            METRICS.expired.labels(op).inc()
            return Expired(request_id)
        trace = LazyTrace(hdrs)  # parsed only if a line is logged or the handler asks
        log_token = bind_request(trace_id=trace, correlation_id=request_id, op=op, action=action)
        run = self._run(op, action, hdrs, data, request_id, trace, deadline, attempt)
        try:
            if TRACING.enabled:
                reply = await self._traced(run, op, action, hdrs, request_id, trace, attempt)
            else:
                reply = await run
        except NexusError as exc:
            reply = self._fail(op, exc, request_id)
        except (KeyboardInterrupt, SystemExit):
            raise
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # this request was cancelled (its deadline, the drain): no reply
            # A handler let a CancelledError out that was not its own (it awaited a task
            # someone else cancelled): a failure of that handler, which its caller hears of.
            reply = self._unexpected(op, action, request_id)
        except BaseException:  # Exception, or a handler's own BaseException subclass
            reply = self._unexpected(op, action, request_id)
        finally:
            release(log_token)
        elapsed = time.perf_counter() - started
        # Labels only from registered names: a client can send any action token, and
        # every distinct label value would be a new time series forever.
        # A success ran a registered handler; only failures need the lookup.
        known = reply.status < 400 or self._lookup(op, action) is not None
        label_op, label_action = (op, action) if known else (UNKNOWN_LABEL, UNKNOWN_LABEL)
        # With tracing on, the recorded trace is this request's exemplar.
        METRICS.observe(
            label_op, label_action, reply.status, self._transport, elapsed, trace.recorded
        )
        if self._access_log:
            log_served(
                transport=self._transport,
                op=op,
                action=action,
                status=reply.status,
                duration_s=elapsed,
                request_id=request_id,
                trace_id=trace.resolve(),
            )
        return reply

    async def _traced(
        self,
        run: Coroutine[Any, Any, Reply],
        op: str,
        action: str,
        hdrs: Mapping[str, str],
        request_id: str,
        trace: LazyTrace,
        attempt: int,
    ) -> Reply:
        """`run` (a `_run`) in a server span, a child of the caller's `traceparent`."""
        # Application code (an authenticator, a handler) runs in it: current for the API too.
        with TRACING.span(
            f"process nexus.{op}.{action}", kind=SpanKind.SERVER, parent_headers=hdrs,
            application=True,
        ) as span:  # fmt: skip
            if span is not None:  # recorded: its attributes (none made for the others)
                trace.recorded = TRACING.current_trace_id()
                span.set_attributes(
                    {
                        "messaging.system": "nats",
                        "messaging.operation.type": "process",
                        "messaging.destination.name": f"nexus.{op}.{action}",
                        "messaging.message.id": request_id,
                        "nexus.op": op,
                        "nexus.action": action,
                        "nexus.transport": self._transport,
                        "nexus.attempt": attempt,
                    }
                )
            try:
                return await run
            except NexusError as exc:
                mark_error(span, exc.http_status, exc.code)
                raise

    async def _run(
        self,
        op: str,
        action: str,
        hdrs: Mapping[str, str],
        data: bytes,
        request_id: str,
        trace: LazyTrace,
        deadline: int,
        attempt: int,
    ) -> Reply:
        operation = self.operation(op, action)
        with TRACING.mark("authenticate"):
            principal = await self._auth.authenticate(hdrs, operation)
        admission = self._admission
        if admission is not None and admission.applies(op, action, principal, hdrs):
            services = self._services
            if self._keyed_services is not None and H_IDEMPOTENCY_KEY in hdrs:
                services = self._keyed_services  # writes journaled under the key's scope

            async def produce() -> Reply:
                try:
                    return await self._serve(
                        operation, hdrs, data, request_id, trace, deadline, attempt, principal,
                        services,
                    )
                except IdempotencyMismatch:
                    raise  # the journal's verdict on this request: never this key's reply
                except NexusError as exc:  # recorded and replayed like a success
                    return self._fail(op, exc, request_id)

            return await admission.admit(
                op, action, principal, hdrs, data, request_id, deadline, produce
            )
        return await self._serve(
            operation, hdrs, data, request_id, trace, deadline, attempt, principal,
            self._services,
        )

    async def _serve(
        self,
        operation: Operation,
        hdrs: Mapping[str, str],
        data: bytes,
        request_id: str,
        trace: LazyTrace,
        deadline: int,
        attempt: int,
        principal: Principal | None,
        services: Services,
    ) -> Reply:
        op, action = operation.op, operation.action
        media = codec.media_type(hdrs.get(H_CONTENT_TYPE))
        with TRACING.mark("validate"):
            request = codec.decode(
                data,
                operation.request_type,
                media=media,
                max_bytes=self._limits.max_body_bytes,
                max_depth=self._limits.max_depth,
                json_only=True,
            )
        ctx = RequestContext(
            op=op,
            action=action,
            request_id=request_id,
            trace=trace,
            deadline_ms=deadline,
            services=services,
            headers=hdrs,
            principal=principal,
            idempotency_key=hdrs.get(H_IDEMPOTENCY_KEY),
            attempt=attempt,
        )
        with TRACING.step("handle", application=True):
            result = await self._call(operation, request, ctx)
        return success_reply(codec.encode(result, media), codec.content_type_of(media), request_id)

    async def _call(self, operation: Operation, request: Any, ctx: RequestContext) -> Any:
        """The handler, within the operation's own timeout and the request's deadline."""
        op, action = ctx.op, ctx.action
        if operation.timeout_ms is None and not self._enforce_deadline:
            return await operation.handler(request, ctx)
        budget_s = ctx.remaining_s()
        if operation.timeout_ms is not None:
            budget_s = min(budget_s, operation.timeout_ms / 1000)
        try:
            async with asyncio.timeout(budget_s):
                return await operation.handler(request, ctx)
        except TimeoutError as exc:
            if isinstance(exc, NexusError):
                raise
            raise UpstreamTimeout(f"{op}.{action} did not finish within its budget") from None

    def _unexpected(self, op: str, action: str, request_id: str) -> Reply:
        """The 500 reply for an exception no NexusError names (logged with its traceback):
        every failure becomes a reply, so no caller waits out its timeout for it."""
        logger.exception("unexpected error in {}.{}", op, action)
        error = InternalError(f"internal error; request id {request_id}")
        return self._fail(op, error, request_id)

    def _fail(self, op: str, error: NexusError, request_id: str) -> Reply:
        if not 400 <= error.http_status <= 599:
            # A handler's own NexusError subclass with a status that is no error's: sent as
            # it is, a 2xx or 3xx would read as a success to every client.
            logger.error(
                "{} ({}) declares http_status {}, not an error status (400-599): answered 500",
                type(error).__name__, error.code, error.http_status,
            )  # fmt: skip
            error = InternalError(f"internal error; request id {request_id}")
        METRICS.count_error(op if op in self._groups else UNKNOWN_LABEL, error.code)
        if error.http_status >= 500:
            logger.warning("{} {}: {}", error.http_status, error.code, error.detail)
        reply = error_reply(error, request_id)
        if isinstance(error, RateLimitExceeded):
            reply.headers.update(error.headers)
        return reply
