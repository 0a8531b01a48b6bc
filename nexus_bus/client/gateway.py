"""The gateway client: call any operation over NATS request/reply.

    async with await Gateway.connect(settings) as gw:
        reply = await gw.request("data", "get", {"key": "k"}, token=token)
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Self, TypeVar

import nats.errors
from nats.aio.client import Client

from nexus_bus.bus import codec
from nexus_bus.bus.connection import connect_nats
from nexus_bus.bus.metadata import (
    check_headers,
    clean_request_id,
    new_traceparent,
    parse_traceparent,
)
from nexus_bus.bus.nats_errors import map_nats_error
from nexus_bus.bus.replies import Reply, error_of, status_of
from nexus_bus.bus.subjects import client_subject
from nexus_bus.client.inbox import Inbox
from nexus_bus.config import Settings
from nexus_bus.constants import (
    H_AUTHORIZATION,
    H_CONTENT_TYPE,
    H_DEADLINE,
    H_IDEMPOTENCY_KEY,
    H_REQUEST_ID,
    H_TIMEOUT_MS,
    H_TRACEPARENT,
    T_CLIENT,
)
from nexus_bus.errors import (
    InternalError,
    NexusError,
    NoResponders,
    PayloadTooLarge,
    UnknownOperation,
    UpstreamTimeout,
)
from nexus_bus.jobs.client import get_job, submit_job
from nexus_bus.observability import METRICS
from nexus_bus.observability.tracing import TRACING, SpanKind, mark_error
from nexus_bus.policies import PolicyLayer, create_policy_layer
from nexus_bus.policies.fallback import Authorize
from nexus_bus.policies.guard import error_code_of
from nexus_bus.redis_client import RedisClient, create_redis
from nexus_bus.registry import OpsRegistry
from nexus_bus.schemas.jobs import Job, JobAccepted

T = TypeVar("T")


class Gateway:
    """Sends operation requests with the contract's headers and maps replies to results."""

    def __init__(
        self,
        nc: Client,
        settings: Settings,
        *,
        owns_connection: bool = False,
        token: str | None = None,
        registry: OpsRegistry | None = None,
        redis: RedisClient | None = None,
        authorize: Authorize | None = None,
    ) -> None:
        """Args: registry: the declared operations (default: this gateway's own view of
        the `nexus_ops` bucket, read only once a request finds no responders);
        redis: shares breaker state and serves stale answers (docs/resilience.md);
        authorize: checks a token before a stale answer (the shim passes its authorizer).
        """
        self.nc = nc
        self.settings = settings
        self._limits = settings.limits
        self._default_timeout_s = settings.client.default_timeout_ms / 1000
        self._owns = owns_connection
        # The bearer token sent when a call passes none. Never taken from settings: a shim's
        # gateway must not lend its own identity to anonymous requests.
        self.token = token
        self._inbox = Inbox(nc)
        self._owns_registry = registry is None
        self.registry = registry if registry is not None else OpsRegistry(nc, settings)
        self._owned_redis: RedisClient | None = None
        # Breakers, retries, stale fallback (docs/resilience.md); None when disabled.
        self.policies: PolicyLayer | None = create_policy_layer(
            settings, redis, authorize=authorize
        )
        if self.policies is not None:
            self.policies.guard.transport_up = lambda: self.nc.is_connected

    @classmethod
    async def connect(cls, settings: Settings, *, token: str | None = None) -> Self:
        """Open a NATS connection of its own.

        Args:
            token: default bearer token for calls that pass none.

        Raises:
            Unavailable: NATS cannot be reached.
        """
        nc = await connect_nats(settings.nats, name=f"{settings.service}-gateway")
        redis = create_redis(settings.redis) if settings.resilience.enabled else None
        gateway = cls(nc, settings, owns_connection=True, token=token, redis=redis)
        gateway._owned_redis = redis
        return gateway

    async def close(self) -> None:
        """Stop the policy layer; drain and close the connections the gateway opened."""
        if self._owns_registry:
            await self.registry.close()
        if self.policies is not None:
            await self.policies.close()
        if self._owned_redis is not None:
            await self._owned_redis.aclose()
            self._owned_redis = None
        if not self._owns or self.nc.is_closed:
            return
        try:
            await self.nc.drain()
        except (nats.errors.Error, OSError, RuntimeError):
            # Disconnected: nothing can be flushed. nats-py's close() may still try to write
            # its buffer onto the dead transport, which asyncio and uvloop refuse.
            with contextlib.suppress(nats.errors.Error, OSError, RuntimeError):
                await self.nc.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def build_headers(
        self,
        *,
        token: str | None = None,
        timeout_s: float,
        request_id: str | None = None,
        traceparent: str | None = None,
        idempotency_key: str | None = None,
        content_type: str | None = None,
        extra: Mapping[str, str] | None = None,
    ) -> dict[str, str]:
        """The request headers of the wire contract (docs/contract.md), with a fresh deadline."""
        trace = parse_traceparent(traceparent) if traceparent else None
        budget_ms = max(1, int(timeout_s * 1000))
        headers = {
            H_REQUEST_ID: clean_request_id(request_id),
            H_TIMEOUT_MS: str(budget_ms),
            H_DEADLINE: str(int(time.time() * 1000) + budget_ms),
        }
        if trace is not None:
            headers[H_TRACEPARENT] = trace.traceparent
        elif not TRACING.enabled:  # with tracing on, the request's span writes it (sampled or not)
            headers[H_TRACEPARENT] = new_traceparent()
        if extra:
            headers.update(extra)
        token = token or self.token
        if token:
            headers[H_AUTHORIZATION] = f"Bearer {token}"
        if idempotency_key:
            headers[H_IDEMPOTENCY_KEY] = idempotency_key
        if content_type:
            headers[H_CONTENT_TYPE] = content_type
        return headers

    async def request_raw(
        self, op: str, action: str, body: bytes, headers: dict[str, str], *, timeout_s: float
    ) -> Reply:
        """Send an already-encoded request; return the reply as received (any status).

        Raises:
            InvalidRequest: a malformed op/action, or header characters that are not allowed.
            PayloadTooLarge / HeadersTooLarge: over the configured or server limits.
            UnknownOperation: no worker serves `op.action` and none declared it (404).
            NoResponders: no worker serves the op (at once, not after the timeout).
            UpstreamTimeout: no reply within `timeout_s`.
            Unavailable: the NATS connection is closed.
            CircuitOpen: the op's breaker is open (nothing was published).
        """
        if self.policies is None:
            return await self._request_once(op, action, body, headers, timeout_s)
        client_subject(op, action)  # validated before `op` keys the breakers
        return await self.policies.call(
            op,
            action,
            body,
            headers,
            timeout_s,
            lambda attempt_s: self._request_once(op, action, body, headers, attempt_s),
        )

    async def _request_once(
        self, op: str, action: str, body: bytes, headers: dict[str, str], timeout_s: float
    ) -> Reply:
        """One attempt of `request_raw`, without the policy layer (traced when tracing)."""
        if TRACING.enabled:
            return await self._traced_request(op, action, body, headers, timeout_s)
        return await self._request(op, action, body, headers, timeout_s)

    async def _traced_request(
        self, op: str, action: str, body: bytes, headers: dict[str, str], timeout_s: float
    ) -> Reply:
        """`_request` in a client span whose context travels in the request's `traceparent`."""
        subject = client_subject(op, action)  # validated before it names a span
        with (
            TRACING.continued(headers),
            TRACING.span(f"request {subject}", kind=SpanKind.CLIENT) as span,
        ):
            if span is not None:  # recorded: its attributes (none made for the others)
                span.set_attributes(
                    {
                        "messaging.system": "nats",
                        "messaging.operation.type": "send",
                        "messaging.operation.name": "request",
                        "messaging.destination.name": subject,
                        "nexus.op": op,
                        "nexus.action": action,
                    }
                )
            TRACING.inject(headers)  # before the size checks: they count this header too
            reply = await self._request(op, action, body, headers, timeout_s)
            if reply.status >= 400:
                mark_error(span, reply.status, error_code_of(reply))
            return reply

    async def _request(
        self, op: str, action: str, body: bytes, headers: dict[str, str], timeout_s: float
    ) -> Reply:
        subject = client_subject(op, action)
        try:
            header_bytes = check_headers(
                headers,
                max_value_bytes=self._limits.max_header_value_bytes,
                max_total_bytes=self._limits.max_header_bytes,
            )
            if len(body) > self._limits.max_body_bytes:
                limit = self._limits.max_body_bytes
                raise PayloadTooLarge(f"body of {len(body)} bytes exceeds {limit}")
            # nats-py checks only the payload; headers count too, and the server drops the
            # whole connection (every in-flight request) when the sum exceeds max_payload.
            if len(body) + header_bytes > self.nc.max_payload:
                raise PayloadTooLarge(
                    f"request exceeds the server's max_payload of {self.nc.max_payload}"
                )
        except NexusError as exc:
            # Refused before publishing: no worker saw it, so the op's breaker counts no
            # outcome (docs/resilience.md).
            exc.unsent = True
            raise
        try:
            msg = await self._inbox.request(subject, body, timeout_s=timeout_s, headers=headers)
        except (nats.errors.Error, OSError) as exc:  # the NATS adapter's one mapping
            error = map_nats_error(exc, f"{op}.{action}")
            if isinstance(error, NoResponders):
                raise await self._no_responders(op, action, timeout_s) from None
            if isinstance(error, UpstreamTimeout):
                raise UpstreamTimeout(
                    f"{op}.{action} did not answer within {timeout_s:g}s"
                ) from None
            raise error from exc
        reply = Reply(status_of(msg.headers), msg.headers or {}, msg.data)
        if reply.status == 404 and error_code_of(reply) == UnknownOperation.code:
            return await self._lacking(op, action, reply, timeout_s)
        return reply

    async def _lacking(self, op: str, action: str, reply: Reply, budget_s: float) -> Reply:
        """A worker answered `unknown_operation`: the reply, unless another worker of the op
        declares the action (a rolling upgrade: the one reached runs an older version).

        Raises:
            NoResponders: the action is declared; `misrouted`, so the request is retried
                (to reach a worker that has it) and the op's breaker counts no outcome.
        """
        if await self.registry.declares(op, action, within_s=budget_s):
            error = NoResponders(
                f"the worker reached lacks {op}.{action}, which another worker of {op}"
                " declares (a rolling upgrade?)"
            )
            error.misrouted = True
            raise error
        return reply

    async def _no_responders(self, op: str, action: str, budget_s: float) -> NexusError:
        """404 for a name nobody declared (a client error), 503 for a declared op with no
        worker now, or when the registry cannot tell within the budget (docs/registry.md)."""
        if await self.registry.declares(op, action, within_s=budget_s) is False:
            return UnknownOperation(f"{op}.{action} is not a declared operation")
        return NoResponders(f"no worker serves {op}.{action}")

    async def request(
        self,
        op: str,
        action: str,
        payload: Any = None,
        *,
        token: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the budget travels to the worker too
        idempotency_key: str | None = None,
        request_id: str | None = None,
        traceparent: str | None = None,
        reply_type: type[T] | Any = Any,
        media: str = "json",
    ) -> T:
        """Call `op.action` with `payload` and return its decoded reply.

        Args:
            payload: a msgspec Struct, anything msgspec encodes, or pre-encoded bytes.
            token: bearer token for the token service.
            timeout: seconds; the worker receives the same budget as a deadline.
            idempotency_key: makes a non-idempotent operation safe to retry.
            reply_type: decode the reply into this type (default: plain JSON types).
            media: "json" or "msgpack".

        Raises:
            NexusError: the error the reply carried, or the transport failure (see
                `request_raw`).
            InternalError: also a success reply whose body does not decode.
        """
        client_subject(op, action)  # validated before `op` becomes a metric label
        timeout_s = self._default_timeout_s if timeout is None else timeout
        body = payload if isinstance(payload, bytes) else codec.encode(payload or {}, media)
        headers = self.build_headers(
            token=token,
            timeout_s=timeout_s,
            request_id=request_id,
            traceparent=traceparent,
            idempotency_key=idempotency_key,
            content_type=codec.content_type_of(media) if media != "json" else None,
        )
        started = time.perf_counter()
        status = 0
        try:
            reply = await self.request_raw(op, action, body, headers, timeout_s=timeout_s)
            status = reply.status
            if status >= 400:
                raise error_of(status, reply.body, reply.headers)
            result: T = self._decode_reply(op, action, reply, reply_type)
            return result
        except NexusError as exc:
            status = status or exc.http_status
            METRICS.count_error(op, exc.code)
            raise
        finally:
            METRICS.observe(op, action, status, T_CLIENT, time.perf_counter() - started)

    def _decode_reply(self, op: str, action: str, reply: Reply, reply_type: type[T] | Any) -> T:
        """The result a success reply carries.

        Raises:
            InternalError: the body does not decode (or not into `reply_type`), or its
                Content-Type is none the codec reads. The codec says 400 or 415, which would
                blame the caller's request for what its responder sent back.
        """
        try:
            result: T = codec.decode(
                reply.body,
                reply_type,
                media=codec.media_type(reply.headers.get(H_CONTENT_TYPE)),
                max_bytes=self.nc.max_payload,
                max_depth=self._limits.max_depth * 2,
            )
        except NexusError as exc:
            raise InternalError(
                f"{op}.{action} replied with a body that does not decode: {exc.detail}"
            ) from None
        return result

    async def submit(
        self,
        op: str,
        action: str,
        payload: Any = None,
        *,
        token: str | None = None,
        idempotency_key: str | None = None,
        request_id: str | None = None,
        traceparent: str | None = None,
        media: str = "json",
    ) -> JobAccepted:
        """Submit `op.action` as a job on JetStream; it runs with retries (docs/jobs.md).

        Args:
            payload: a msgspec Struct, anything msgspec encodes, or pre-encoded bytes.
            token: bearer token; the worker checks it when the job runs.
            idempotency_key: submitting again with the same key returns the same job.
            media: "json" or "msgpack".

        Raises:
            NexusError: a malformed request, or JetStream did not acknowledge the submission
                (see `nexus_bus.jobs.client.submit_job`).
        """
        body = payload if isinstance(payload, bytes) else codec.encode(payload or {}, media)
        headers = self.build_headers(
            token=token,
            timeout_s=self._default_timeout_s,
            request_id=request_id,
            traceparent=traceparent,
            idempotency_key=idempotency_key,
            content_type=codec.content_type_of(media) if media != "json" else None,
        )
        with TRACING.continued(headers):  # the job's spans join the caller's trace
            return await submit_job(self.nc, self.settings, op, action, body, headers)

    async def job(self, job_id: str) -> Job:
        """The status document of a job.

        Raises:
            NotFound: no such job. InvalidRequest: a malformed id. Unavailable: no JetStream.
        """
        return await get_job(self.nc, self.settings, job_id)
