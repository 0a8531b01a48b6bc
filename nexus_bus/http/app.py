"""The HTTP shim as a plain ASGI application: routing, the one error handler, lifespan.

No framework: the shim has a handful of fixed routes, and on the hot path every layer costs
throughput (docs/http.md has the measurements). Any ASGI server can run it; `server.py`
runs it on uvicorn with httptools and uvloop, plus the limits uvicorn lacks.

    app = ShimApp(settings)          # connects on lifespan startup
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from typing import Any, Final

from nats.aio.client import Client

from nexus_bus.config import Settings
from nexus_bus.connection import connect_nats
from nexus_bus.constants import (
    H_HTTP_REQUEST_ID,
    HTTP_API_PREFIX,
    HTTP_HEALTHZ,
    HTTP_METRICS,
    HTTP_OPENAPI,
    HTTP_READYZ,
    JOBS_PREFIX,
)
from nexus_bus.errors import InternalError, InvalidRequest, NexusError, NotFound, Unavailable
from nexus_bus.gateway import Gateway
from nexus_bus.http.authz import ShimAuthorizer, create_shim_authorizer, credentials
from nexus_bus.http.client_ip import TrustedProxies
from nexus_bus.http.forward import OperationRoute, bus_headers
from nexus_bus.http.jobs import JobRoutes
from nexus_bus.http.probes import Probes
from nexus_bus.http.problems import Answer, ClientGone, MethodNotAllowed, problem_answer
from nexus_bus.http.request import RequestHead, parse_head
from nexus_bus.http.sse import EventStreams, encode_gate_request, last_event_id
from nexus_bus.metadata import clean_request_id
from nexus_bus.observability import logger
from nexus_bus.operations import Operations
from nexus_bus.redis_client import RedisClient, create_redis
from nexus_bus.replies import error_of
from nexus_bus.subjects import check_token, client_subject

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_API: Final = HTTP_API_PREFIX + "/"
_EVENTS: Final = "events"
_JOBS: Final = JOBS_PREFIX.rsplit(".", 1)[-1]
_STREAM_OP: Final = ("stream", "read")  # the operation whose authorization SSE borrows
_REQUEST_ID: Final = H_HTTP_REQUEST_ID.lower().encode()
_CLOSE: Final = (b"connection", b"close")
# Answers after which the connection cannot be reused: the body may still be unread.
_CLOSING_STATUSES: Final = frozenset({408, 413, 431})
_MAX_PATH_IN_DETAIL: Final = 120
_STREAMING: Final = "nexus.streaming"  # scope key: the response has started streaming


class ShimApp:
    """The ASGI application of the HTTP shim."""

    def __init__(self, settings: Settings, groups: Iterable[Operations] | None = None) -> None:
        """Create the app; connections open on lifespan startup (or `await app.startup()`).

        Args:
            settings: the whole settings object (the shim reads `http`, `limits`, `nats`,
                `redis`, `client`, `jobs`, `auth`).
            groups: the operations `/openapi.json` describes and whose public actions the
                shim lets through without a token (default: the built-in ones).
        """
        if groups is None:
            from nexus_bus.handlers import BUILTIN

            groups = BUILTIN.values()
        self.settings = settings
        self._groups = list(groups)
        self._max_header = settings.http.max_header_bytes
        self._retry_after = settings.http.retry_after_s
        self._proxies = TrustedProxies(settings.http.trusted_proxies)
        self._draining = False
        self._read_timeout_s: float | None = settings.http.read_timeout_s
        self.nc: Client | None = None
        self._redis: RedisClient | None = None
        self._gateway: Gateway | None = None
        self._authz: ShimAuthorizer | None = None
        self._operations: OperationRoute | None = None
        self._jobs: JobRoutes | None = None
        self._streams: EventStreams | None = None
        self._probes: Probes | None = None
        self._simple: dict[str, Callable[[str], Awaitable[Answer]]] = {}

    def server_enforces_read_timeout(self) -> None:
        """Tell the app its server times out slow requests itself (ours does): no app timer."""
        self._read_timeout_s = None

    @property
    def draining(self) -> bool:
        """Whether the shim was told to stop (readiness is false from then on)."""
        return self._draining

    async def startup(self) -> None:
        """Connect to NATS, create the Redis client and the routes.

        Raises:
            Unavailable: NATS cannot be reached.
            ConfigError: auth is enabled but `auth.keys_dir` holds no usable keys.
        """
        settings = self.settings
        nc = await connect_nats(settings.nats, name=f"{settings.service}-shim")
        self.nc = nc
        self._redis = create_redis(settings.redis)
        # The gateway's policy layer shares breakers through Redis and checks a caller's
        # token with the shim's authorizer before answering stale (docs/resilience.md).
        self._gateway = Gateway(nc, settings, redis=self._redis, authorize=self._authorize)
        if self._gateway.policies is not None:
            self._gateway.policies.start()  # follow the other replicas' breakers from now
        streams = EventStreams(nc.jetstream(), settings.http)
        self._streams = streams
        try:
            # Routes that never reach a worker's request path are authorized here (authz.py).
            self._authz = await create_shim_authorizer(
                settings, self._redis, nc, self._groups, on_revoked=streams.recheck
            )
        except BaseException:
            await self.shutdown()  # the server runs no shutdown after a failed startup
            raise
        self._jobs = JobRoutes(nc, settings, self._authz)
        self._operations = OperationRoute(
            self._gateway, settings, self._jobs, read_timeout_s=self._read_timeout_s
        )
        probes = Probes(
            lambda: nc.is_connected,
            self._redis,
            self._groups,
            draining=lambda: self._draining,
            retry_after_s=self._retry_after,
        )
        self._probes = probes

        async def healthz(_: str) -> Answer:
            return probes.healthz()

        async def metrics(_: str) -> Answer:
            return probes.metrics()

        async def openapi(_: str) -> Answer:
            return probes.openapi()

        self._simple = {
            HTTP_HEALTHZ: healthz,
            HTTP_READYZ: probes.readyz,
            HTTP_METRICS: metrics,
            HTTP_OPENAPI: openapi,
        }

    async def _authorize(self, headers: Mapping[str, str], op: str, action: str) -> None:
        if self._authz is None:
            raise Unavailable("the shim is starting")
        await self._authz.authorize(headers, op, action)

    def begin_drain(self) -> None:
        """Drop readiness and end event streams; in-flight requests carry on."""
        if not self._draining:
            logger.info("shim draining: not ready from now on")
        self._draining = True
        if self._streams is not None:
            self._streams.close_all()

    async def shutdown(self) -> None:
        """Close what `startup` opened (after the server has finished in-flight requests)."""
        self.begin_drain()
        if self._gateway is not None:
            await self._gateway.close()  # its policy layer; the connections are ours
        if self._redis is not None:
            await self._redis.aclose()
        if self.nc is not None and not self.nc.is_closed:
            # Draining needs a live connection; while NATS is away just close.
            await (self.nc.drain() if self.nc.is_connected else self.nc.close())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._serve(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        # Anything else (websocket) is not served; the server closes it.

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except NexusError as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        head: RequestHead | None = None
        request_id = ""
        try:
            head = parse_head(scope["headers"], self._max_header)
            request_id = clean_request_id(head.request_id)
            answer = await self._route(scope, head, request_id, receive, send)
            if answer is None:
                return  # streamed
        except ClientGone:
            return
        except asyncio.CancelledError:
            # The grace period after SIGTERM ran out: say so, rather than a bare reset.
            if self._draining and not scope.get(_STREAMING):
                closing = Unavailable("the server is shutting down; retry elsewhere")
                await self._send(send, self._problem(closing, request_id, head), request_id)
            raise
        except NexusError as exc:
            answer = self._problem(exc, request_id, head)
        except Exception:
            request_id = request_id or clean_request_id(None)
            logger.opt(exception=True).error("unexpected error; request id {}", request_id)
            error = InternalError(f"internal error; request id {request_id}")
            answer = self._problem(error, request_id, head)
        await self._send(send, answer, request_id)

    def _problem(self, error: NexusError, request_id: str, head: RequestHead | None) -> Answer:
        return problem_answer(
            error,
            request_id,
            token_sent=head is not None and head.authorization is not None,
            default_retry_after=self._retry_after,
        )

    async def _send(self, send: Send, answer: Answer, request_id: str) -> None:
        body = answer.body
        headers = [
            (b"content-type", answer.content_type),
            (b"content-length", b"%d" % len(body)),
            (_REQUEST_ID, (request_id or clean_request_id(None)).encode()),
            *answer.headers,
        ]
        if self._draining or answer.status in _CLOSING_STATUSES:
            headers.append(_CLOSE)  # while draining: stop clients reusing this replica
        await send({"type": "http.response.start", "status": answer.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _route(
        self, scope: Scope, head: RequestHead, request_id: str, receive: Receive, send: Send
    ) -> Answer | None:
        path: str = scope["path"]
        method: str = scope["method"]
        if path.startswith(_API):
            parts = path.split("/")
            if len(parts) == 4 and parts[2] and parts[3]:
                first, second = parts[2], parts[3]
                return await self._api(scope, first, second, head, request_id, receive, send)
        else:
            simple = self._simple.get(path)
            if simple is not None:
                if method not in ("GET", "HEAD"):
                    raise MethodNotAllowed(f"{path} answers GET", allow="GET")
                return await simple(request_id)
        raise NotFound(f"no route {method} {path[:_MAX_PATH_IN_DETAIL]}")

    async def _api(
        self,
        scope: Scope,
        first: str,
        second: str,
        head: RequestHead,
        request_id: str,
        receive: Receive,
        send: Send,
    ) -> Answer | None:
        method: str = scope["method"]
        if first == _EVENTS:
            if method != "GET":
                raise MethodNotAllowed("event streams are read with GET", allow="GET")
            await self._events(scope, second, head, request_id, receive, send)
            return None
        if first == _JOBS:
            if method != "GET":
                raise MethodNotAllowed("job status is read with GET", allow="GET")
            assert self._jobs is not None
            caller = credentials(head.authorization, self._client_ip(scope, head))
            return await self._jobs.status(second, caller)
        if method != "POST":
            raise MethodNotAllowed("operations are called with POST", allow="POST")
        try:
            client_subject(first, second)  # validated (and cached) before anything is read
        except InvalidRequest:
            raise NotFound(f"no operation {first[:64]!r}.{second[:64]!r}") from None
        assert self._operations is not None
        client_ip = self._client_ip(scope, head)
        return await self._operations.handle(first, second, head, request_id, client_ip, receive)

    def _client_ip(self, scope: Scope, head: RequestHead) -> str:
        client = scope.get("client")
        peer = client[0] if client else None
        if not self._proxies:
            return peer or ""
        return self._proxies.client_ip(peer, head.forwarded_for)

    async def _events(
        self,
        scope: Scope,
        topic: str,
        head: RequestHead,
        request_id: str,
        receive: Receive,
        send: Send,
    ) -> None:
        assert self._streams is not None and self._gateway is not None
        assert self._authz is not None
        check_token(topic, "topic")
        after = last_event_id(head.last_event_id, scope.get("query_string", b""))
        if self._draining:
            raise Unavailable("this replica is draining; reconnect with Last-Event-ID")
        with self._streams.reserve():
            client_ip = self._client_ip(scope, head)
            # The shim holds the token for the stream's life (re-checked, ended when it is
            # gone); the workers must allow the same token `stream.read` on the topic too.
            lease = await self._authz.lease(
                credentials(head.authorization, client_ip), *_STREAM_OP
            )
            timeout_s = self.settings.client.default_timeout_ms / 1000
            headers = bus_headers(self._gateway, head, request_id, client_ip, timeout_s)
            gate = await self._gateway.request_raw(
                *_STREAM_OP, encode_gate_request(topic, after), headers, timeout_s=timeout_s
            )
            if gate.status >= 400:
                raise error_of(gate.status, gate.body, gate.headers)
            if self._draining:  # drain began while we awaited: close_all() has passed us by
                raise Unavailable("this replica is draining; reconnect with Last-Event-ID")
            scope[_STREAMING] = True
            await self._streams.stream(topic, after, request_id, receive, send, lease)
