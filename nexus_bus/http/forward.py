"""`POST /v1/{op}/{action}`: one HTTP request becomes one NATS request, and its reply the answer.

The hot path. The body is passed through as bytes (workers decode and validate it, the same
for HTTP and NATS callers), the reply body is passed back untouched, and the answer status is
the reply's `Nexus-Status`. With `Prefer: respond-async` the request becomes a job instead.
"""

from __future__ import annotations

import time
from typing import Final

from nexus_bus.bus import codec
from nexus_bus.bus.metadata import is_ascii_digits, parse_traceparent
from nexus_bus.client.gateway import Gateway
from nexus_bus.config import Settings
from nexus_bus.constants import (
    CT_JSON,
    CT_MSGPACK,
    H_AUTHORIZATION,
    H_CLIENT_IP,
    H_CONTENT_TYPE,
    H_RETRY_AFTER,
    H_SERVICE_ERROR,
    H_TRACEPARENT,
    H_TRACESTATE,
    PREFER_ASYNC,
    T_HTTP,
)
from nexus_bus.errors import (
    InternalError,
    InvalidRequest,
    InvalidToken,
    NexusError,
    PayloadTooLarge,
    UpstreamTimeout,
)
from nexus_bus.http.authz import credentials
from nexus_bus.http.cached_reads import ACTION as CACHED_ACTION
from nexus_bus.http.cached_reads import OP as CACHED_OP
from nexus_bus.http.cached_reads import CachedReads
from nexus_bus.http.deadlines import ReadDeadlines
from nexus_bus.http.jobs import JobRoutes
from nexus_bus.http.labels import OperationLabels
from nexus_bus.http.problems import Answer, ClientGone, retry_after_of, status_headers
from nexus_bus.http.request import (
    Receive,
    RequestHead,
    declared_length,
    discard_body,
    read_body,
)
from nexus_bus.observability import METRICS
from nexus_bus.observability.tracing import TRACING
from nexus_bus.policies.headers import passed_headers

_UNKNOWN_OPERATION: Final = "unknown_operation"
CLIENT_CLOSED: Final = 499  # nginx's convention, for metrics and logs only: nobody gets it


def budget_s(raw: str | None, *, default_ms: int, max_ms: int) -> float:
    """The request's time budget in seconds, from the client's `Nexus-Timeout-Ms`.

    Raises:
        InvalidRequest: a value that is not a non-negative integer.
        UpstreamTimeout: 0, a budget spent before the request was sent: it is not forwarded
            (a worker would drop it unrun), and the answer is the one a caller whose
            deadline passes gets.
    """
    if raw is None:
        return min(default_ms, max_ms) / 1000
    if not is_ascii_digits(raw) or len(raw) > 16:  # the published schema: 1 to 16 digits
        raise InvalidRequest("Nexus-Timeout-Ms must be an integer of milliseconds")
    budget_ms = int(raw)
    if budget_ms == 0:
        raise UpstreamTimeout("Nexus-Timeout-Ms is 0: the budget was spent; nothing was sent")
    return min(budget_ms, max_ms) / 1000


def prefers_async(prefer: str | None) -> bool:
    """Whether a Prefer header asks for `respond-async` (RFC 7240), among any others."""
    if not prefer:
        return False
    return any(
        p.split(";", 1)[0].split("=", 1)[0].strip().lower() == PREFER_ASYNC
        for p in prefer.split(",")
    )


def bus_headers(
    gateway: Gateway,
    head: RequestHead,
    request_id: str,
    client_ip: str,
    timeout_s: float,
    media: str = "json",
) -> dict[str, str]:
    """The NATS request headers for an HTTP request: identity, trace, budget and metadata.

    The traceparent they carry is also kept in `head.sent_traceparent`, so the shim's access
    line names the trace the worker continues.
    """
    extra: dict[str, str] = {}
    if head.authorization:
        extra[H_AUTHORIZATION] = head.authorization
    if client_ip:
        extra[H_CLIENT_IP] = client_ip
    headers = gateway.build_headers(
        timeout_s=timeout_s,
        request_id=request_id,
        traceparent=head.traceparent,
        idempotency_key=head.idempotency_key,
        content_type=CT_MSGPACK if media == "msgpack" else None,
        extra=extra,
    )
    sent = head.sent_traceparent = headers.get(H_TRACEPARENT)  # None: the span writes it
    # tracestate belongs to the caller's trace; it travels only when that trace was kept
    # (re-written as version 00 when the caller's is a later version). Tabs are the list's
    # optional whitespace (W3C Trace Context), which a NATS header cannot carry: as spaces.
    if head.tracestate and sent is not None:
        kept = parse_traceparent(head.traceparent)
        if kept is not None and kept.traceparent == sent:
            headers[H_TRACESTATE] = head.tracestate.replace("\t", " ")
    return headers


def check_authorization(value: str, max_bytes: int) -> None:
    """Refuse an `Authorization` value here, as a worker would refuse its token.

    A value that cannot travel in a NATS header (not printable ASCII) or is over the header
    value limit would fail the gateway's header check with 400 or 431, and no worker would
    see it. It is a malformed token all the same: the answer is the 401 `invalid_token` (with
    its challenge) that a worker and the shim's own routes give one.

    Raises:
        InvalidToken: the value is not printable ASCII or longer than `max_bytes`.
    """
    if not (value.isascii() and value.isprintable()):
        raise InvalidToken("malformed token")
    if len(value) > max_bytes:
        raise InvalidToken(f"Authorization header longer than {max_bytes} bytes")


class OperationRoute:
    """Forwards operation requests to the bus and answers with the reply."""

    def __init__(
        self,
        gateway: Gateway,
        settings: Settings,
        jobs: JobRoutes | None,
        *,
        deadlines: ReadDeadlines | None,
        cached: CachedReads | None = None,
    ) -> None:
        """Args: deadlines: the body read timeout, None when the server enforces it;
        cached: answers hot `data.get` from the cache (None: workers answer every call)."""
        self._gateway = gateway
        self._cached = cached
        self._jobs = jobs
        self._max_body = settings.limits.max_body_bytes
        self._max_header_value = settings.limits.max_header_value_bytes
        self._deadlines = deadlines
        self._default_ms = settings.client.default_timeout_ms
        self._max_ms = settings.http.max_timeout_ms
        self._retry_after = settings.http.retry_after_s
        self._labels = OperationLabels()
        self._content_types: dict[str, bytes] = {CT_JSON: CT_JSON.encode()}
        # A plain counter read at scrape time: no lock per request on the hot path.
        self.inflight = 0
        METRICS.inflight.labels(T_HTTP).set_function(lambda: self.inflight)

    async def handle(
        self,
        op: str,
        action: str,
        head: RequestHead,
        request_id: str,
        client_ip: str,
        receive: Receive,
    ) -> Answer:
        """Serve one operation request.

        Raises:
            NexusError: a request the shim refuses itself (415, 413, 408, 400, 431) or a
                transport failure (503 no responders or unavailable, 504 timeout).
            ClientGone: the client left before its body was read.
        """
        started = time.perf_counter()
        status = 500
        served = False
        self.inflight += 1
        try:
            answer, served = await self._forward(op, action, head, request_id, client_ip, receive)
            status = answer.status
            return answer
        except NexusError as exc:
            status = exc.http_status
            # What the shim refuses itself (415, 413, 503 no responders...) is counted here;
            # a worker's error replies are counted by that worker, the process producing them.
            METRICS.count_error(self._labels.of(op, action, served=served)[0], exc.code)
            raise
        except ClientGone:
            status = CLIENT_CLOSED
            raise
        finally:
            self.inflight -= 1
            op_label, action_label = self._labels.of(op, action, served=served)
            METRICS.observe(
                op_label, action_label, status, T_HTTP, time.perf_counter() - started,
                TRACING.current_trace_id(),
            )

    async def _forward(
        self,
        op: str,
        action: str,
        head: RequestHead,
        request_id: str,
        client_ip: str,
        receive: Receive,
    ) -> tuple[Answer, bool]:
        content_type = head.content_type
        media = "json"
        if content_type is not None and content_type != CT_JSON:
            media = codec.media_type(content_type)  # 415 for anything but JSON or MessagePack
        try:
            declared_length(head, self._max_body)  # 413 before buffering a byte
        except PayloadTooLarge:
            await discard_body(receive)  # so that the client reads the 413
            raise
        body = await read_body(receive, self._max_body, self._deadlines)
        if head.authorization is not None:
            check_authorization(head.authorization, self._max_header_value)
        timeout_s = budget_s(head.timeout_ms, default_ms=self._default_ms, max_ms=self._max_ms)
        cached = self._cached
        if (
            cached is not None
            and action == CACHED_ACTION
            and op == CACHED_OP
            and media == "json"
            and head.idempotency_key is None
            and head.prefer is None
        ):
            # As `bus_headers` forwards it: an empty Authorization reaches no worker.
            caller = credentials(head.authorization or None, client_ip)
            local = await cached.answer(body, caller)
            if local is not None:
                return local, True
        headers = bus_headers(self._gateway, head, request_id, client_ip, timeout_s, media)
        if self._jobs is not None and prefers_async(head.prefer):
            answer = await self._jobs.submit(op, action, body, headers)
            # Any name is accepted (its job waits for a worker to come), so only a declared
            # operation's job counts as served: invented names must not become labels.
            declared = await self._gateway.registry.declares(op, action, within_s=timeout_s)
            return answer, declared is True
        reply = await self._gateway.request_raw(op, action, body, headers, timeout_s=timeout_s)
        status = reply.status
        if status > 599:
            raise InternalError(f"{op}.{action} replied with status {status}")
        reply_headers = reply.headers
        extra_headers = (
            status_headers(
                status,
                token_sent=head.authorization is not None,
                retry_after=retry_after_of(reply_headers.get(H_RETRY_AFTER)),
                default_retry_after=self._retry_after,
            )
            if status >= 400
            else []
        )
        if len(reply_headers) > 2:  # a bare success has only status and request id
            extra_headers += passed_headers(reply_headers)
        served = not (
            status == 404 and reply_headers.get(H_SERVICE_ERROR, "").startswith(_UNKNOWN_OPERATION)
        )
        content_type_bytes = self._content_type(reply_headers.get(H_CONTENT_TYPE))
        return Answer(status, content_type_bytes, extra_headers, reply.body), served

    def _content_type(self, value: str | None) -> bytes:
        if value is None:
            value = CT_JSON
        found = self._content_types.get(value)
        if found is None:
            found = value.encode("latin-1", "replace")
            if len(self._content_types) < 64:  # a few distinct types in practice; stay bounded
                self._content_types[value] = found
        return found
