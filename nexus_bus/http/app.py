"""The HTTP shim as an ASGI application: Starlette's router, the one error handler, lifespan.

Routes are Starlette `Route`s whose endpoints answer into the request's `Exchange`; the
shim sends that answer, so every route's errors pass one mapping to a problem document
(routes without a match and wrong methods included). Any ASGI server can run it;
`server.py` runs it on uvicorn with httptools and uvloop.

    app = ShimApp(settings)          # connects on lifespan startup
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from typing import Any, Final

from nats.aio.client import Client
from starlette.routing import Route, Router

from nexus_bus.bus.connection import connect_nats
from nexus_bus.bus.metadata import clean_request_id, parse_traceparent
from nexus_bus.bus.replies import error_of
from nexus_bus.bus.subjects import check_token, client_subject
from nexus_bus.client.gateway import Gateway
from nexus_bus.config import Settings
from nexus_bus.constants import (
    H_HTTP_REQUEST_ID,
    HTTP_ASYNCAPI,
    HTTP_DOCS,
    HTTP_HEALTHZ,
    HTTP_METRICS,
    HTTP_OPENAPI,
    HTTP_OPS,
    HTTP_READYZ,
)
from nexus_bus.errors import InternalError, InvalidRequest, NexusError, NotFound, Unavailable
from nexus_bus.http.authz import (
    ShimAuthorizer,
    StreamLease,
    create_shim_authorizer,
    credentials,
)
from nexus_bus.http.cached_reads import CachedReads, start_cached_reads
from nexus_bus.http.catalog import Catalog, ops_answer
from nexus_bus.http.client_ip import TrustedProxies
from nexus_bus.http.deadlines import ReadDeadlines
from nexus_bus.http.errors import map_http_error
from nexus_bus.http.forward import CLIENT_CLOSED, OperationRoute, bus_headers
from nexus_bus.http.jobs import JobRoutes
from nexus_bus.http.probes import Probes
from nexus_bus.http.problems import Answer, ClientGone, MethodNotAllowed, problem_answer
from nexus_bus.http.request import STREAMING, RequestHead, parse_head
from nexus_bus.http.routes import (
    ASSET_ROUTE,
    EVENTS_ROUTE,
    JOB_ROUTE,
    OPERATION_PATH,
    OPERATION_ROUTE,
    TICKET_ROUTE,
    matched_route,
)
from nexus_bus.http.spans import serve_traced
from nexus_bus.http.sse import EventStreams, encode_gate_request, last_event_id
from nexus_bus.http.tickets import TicketStore, ticket_of
from nexus_bus.observability import bind_request, logger, release
from nexus_bus.observability.access import access_log_enabled, log_http_access
from nexus_bus.observability.tracing import TRACING
from nexus_bus.operations import Operations
from nexus_bus.policies.admission import create_admission
from nexus_bus.redis_client import RedisClient, create_redis
from nexus_bus.registry import OpsRegistry

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_STREAM_OP: Final = ("stream", "read")  # the operation whose authorization SSE borrows
_REQUEST_ID: Final = H_HTTP_REQUEST_ID.lower().encode()
_CLOSE: Final = (b"connection", b"close")
# Answers after which the connection cannot be reused: the body may still be unread.
_CLOSING_STATUSES: Final = frozenset({408, 413, 431})
_MAX_PATH_IN_DETAIL: Final = 120
_EXCHANGE: Final = "nexus.exchange"  # scope key: the request's Exchange
_STREAMED: Final = 200  # the status an event stream started with
_READ: Final = ("GET", "HEAD")


class Exchange:
    """One request on its way through the router: what a route's endpoint reads, and the
    answer it leaves for the shim to send (None: the endpoint streamed its own)."""

    __slots__ = ("answer", "head", "receive", "request_id", "scope", "send")

    def __init__(
        self, scope: Scope, head: RequestHead, request_id: str, receive: Receive, send: Send
    ) -> None:
        self.scope = scope
        self.head = head
        self.request_id = request_id
        self.receive = receive
        self.send = send
        self.answer: Answer | None = None

    def param(self, name: str) -> str:
        """A path parameter of the matched route template."""
        value: str = self.scope["path_params"][name]
        return value


Handler = Callable[[Exchange], Awaitable[Answer | None]]


class _Endpoint:
    """A route's handler, as the ASGI app Starlette's router calls.

    The method check is here rather than in `Route(methods=...)`: Starlette answers a wrong
    method with plain text, and the contract answers every refusal with a problem document.
    """

    __slots__ = ("_allow", "_handle", "_methods", "_refusal")

    def __init__(self, handle: Handler, methods: tuple[str, ...], refusal: str) -> None:
        self._handle = handle
        self._methods = methods
        self._allow = ", ".join(methods)  # RFC 9110 §10.2.1: every method the route answers
        self._refusal = refusal

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] not in self._methods:
            raise MethodNotAllowed(self._refusal, allow=self._allow)
        exchange: Exchange = scope[_EXCHANGE]
        exchange.answer = await self._handle(exchange)


async def _no_route(scope: Scope, receive: Receive, send: Send) -> None:
    raise NotFound(f"no route {scope['method']} {scope['path'][:_MAX_PATH_IN_DETAIL]}")


class HeadTrace:
    """The trace a shim log line names, worked out only when a line is written: the one the
    worker continues (the forwarded `traceparent`), else the client's own if valid, else the
    current span's."""

    __slots__ = ("_head",)

    def __init__(self, head: RequestHead) -> None:
        self._head = head

    def resolve(self) -> str | None:
        """The trace id, for a log line."""
        head = self._head
        trace = parse_traceparent(head.sent_traceparent or head.traceparent)
        return trace.trace_id if trace is not None else TRACING.current_trace_id(sampled=False)


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
        self._deadlines = ReadDeadlines(settings.http.read_timeout_s)  # a whole body's (408)
        self._access_log = access_log_enabled(settings.log)
        self.nc: Client | None = None
        self._redis: RedisClient | None = None
        self._gateway: Gateway | None = None
        self._authz: ShimAuthorizer | None = None
        self._operations: OperationRoute | None = None
        self._jobs: JobRoutes | None = None
        self._cached: CachedReads | None = None
        self._streams: EventStreams | None = None
        self._probes: Probes | None = None
        self._registry: OpsRegistry | None = None
        self._tickets: TicketStore | None = None
        self._catalog = Catalog(self._groups)
        self._router = self._routes()
        self.startup_error: NexusError | None = None  # why the lifespan startup failed
        # Set by `serve`, which raises that error itself (the CLI prints it once): the server
        # is then not given its message to log as well.
        self.raises_startup_error = False

    @property
    def ops(self) -> list[str]:
        """The operations this shim knows (registered in Consul's service metadata)."""
        return [group.op for group in self._groups]

    @property
    def draining(self) -> bool:
        """Whether the shim was told to stop (readiness is false from then on)."""
        return self._draining

    def _reconnected(self) -> None:
        """NATS is back: the event streams replace their consumers (docs/http.md), and the
        cached reads look whether the data bucket was created again meanwhile."""
        if self._streams is not None:
            self._streams.resume_all()
        if self._cached is not None:
            self._cached.reconnected()

    async def startup(self) -> None:
        """Connect to NATS, create the Redis client and the routes.

        Raises:
            Unavailable: NATS cannot be reached.
            ConfigError: auth is enabled but `auth.keys_dir` holds no usable keys.
        """
        settings = self.settings
        nc = await connect_nats(
            settings.nats, name=f"{settings.service}-shim", reconnected=self._reconnected
        )
        self.nc = nc
        self._redis = create_redis(settings.redis)
        # Which names are operations at all: 404 instead of 503 when nobody declared one.
        self._registry = OpsRegistry(nc, settings, self._groups)
        try:
            await self._registry.start()
        except NexusError as exc:  # read later, on the first question (docs/registry.md)
            logger.warning("operation registry not readable yet: {}", exc)
        # The gateway's policy layer shares breakers through Redis and checks a caller's
        # token with the shim's authorizer before answering stale (docs/resilience.md).
        self._gateway = Gateway(
            nc, settings, registry=self._registry, redis=self._redis, authorize=self._authorize
        )
        if self._gateway.policies is not None:
            self._gateway.policies.start()  # follow the other replicas' breakers from now
        self._tickets = TicketStore(self._redis, settings.http.sse_ticket_ttl_s)
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
        # A job spends from its subject's rate limit when accepted (the job runner does not),
        # and so does a data.get the shim answers from the cache.
        admission = create_admission(settings, self._redis)
        self._jobs = JobRoutes(nc, settings, self._authz, admission)
        self._cached = await start_cached_reads(nc, self._redis, settings, self._authz, admission)
        self._operations = OperationRoute(
            self._gateway, settings, self._jobs, deadlines=self._deadlines,
            cached=self._cached,
        )
        probes = Probes(
            lambda: nc.is_connected,
            self._redis,
            self._groups,
            draining=lambda: self._draining,
            retry_after_s=self._retry_after,
        )
        self._probes = probes

    def _routes(self) -> Router:
        """Starlette's router over the shim's routes, the hot one (operations) first: its
        path leaves out the two templates it would otherwise shadow (`routes.py`)."""

        def read(what: str, handle: Handler) -> _Endpoint:
            return _Endpoint(handle, _READ, f"{what} answers GET")

        def route(template: str, endpoint: _Endpoint, path: str | None = None) -> Route:
            return Route(path or template, endpoint, name=template)

        return Router(
            [
                route(
                    OPERATION_ROUTE,
                    _Endpoint(self._operation, ("POST",), "operations are called with POST"),
                    path=OPERATION_PATH,
                ),
                route(JOB_ROUTE, _Endpoint(self._job, _READ, "job status is read with GET")),
                route(
                    EVENTS_ROUTE,
                    _Endpoint(self._events, ("GET",), "event streams are read with GET"),
                ),
                route(HTTP_OPS, read(HTTP_OPS, self._ops)),
                route(
                    TICKET_ROUTE,
                    _Endpoint(self._ticket, ("POST",), "stream tickets are issued with POST"),
                ),
                route(HTTP_HEALTHZ, read(HTTP_HEALTHZ, self._healthz)),
                route(HTTP_READYZ, read(HTTP_READYZ, self._readyz)),
                route(HTTP_METRICS, read(HTTP_METRICS, self._metrics)),
                route(HTTP_OPENAPI, read(HTTP_OPENAPI, self._openapi)),
                route(HTTP_ASYNCAPI, read(HTTP_ASYNCAPI, self._asyncapi)),
                route(HTTP_DOCS, read(HTTP_DOCS, self._docs)),
                route(ASSET_ROUTE, read("a docs asset", self._asset)),
            ],
            redirect_slashes=False,  # a wrong path is a 404 problem document, not a redirect
            default=_no_route,
        )

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
        self._deadlines.close()
        if self._gateway is not None:
            await self._gateway.close()  # its policy layer; the connections are ours
        if self._registry is not None:
            await self._registry.close()
        if self._cached is not None:
            await self._cached.close()
        if self._redis is not None:
            await self._redis.aclose()
        if self.nc is not None and not self.nc.is_closed:
            # Draining needs a live connection; while NATS is away just close.
            await (self.nc.drain() if self.nc.is_connected else self.nc.close())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            head = parse_head(scope["headers"])
            if TRACING.enabled:
                await serve_traced(
                    scope,
                    head,
                    self._serve(scope, head, receive, send),
                    lambda routed: matched_route(routed)[0],
                )
            else:
                await self._serve(scope, head, receive, send)
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
                    self.startup_error = exc
                    told = "" if self.raises_startup_error else str(exc)
                    await send({"type": "lifespan.startup.failed", "message": told})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _serve(self, scope: Scope, head: RequestHead, receive: Receive, send: Send) -> int:
        """Answer one request (and log it); the status sent, as `_respond`.

        Every line logged while it is served names its request id and trace (`HeadTrace`,
        worked out only if a line is written), as a worker's lines do.
        """
        # The request id first: every answer, problem documents included, carries it.
        request_id = clean_request_id(head.request_id)
        log_token = bind_request(trace_id=HeadTrace(head), correlation_id=request_id)
        try:
            if not self._access_log:
                return await self._respond(scope, head, request_id, receive, send)
            started = time.perf_counter()
            status = CLIENT_CLOSED  # unless an answer was sent
            try:
                status = await self._respond(scope, head, request_id, receive, send)
            finally:
                self._log_access(scope, head, request_id, status, time.perf_counter() - started)
            return status
        finally:
            release(log_token)

    def _log_access(
        self, scope: Scope, head: RequestHead, request_id: str, status: int, elapsed: float
    ) -> None:
        route, op, action = matched_route(scope)
        trace_id = HeadTrace(head).resolve()
        log_http_access(
            method=scope["method"],
            route=route,
            op=op,
            action=action,
            status=status,
            duration_s=elapsed,
            request_id=request_id,
            trace_id=trace_id,
            client=self._client_ip(scope, head),
        )

    async def _respond(
        self, scope: Scope, head: RequestHead, request_id: str, receive: Receive, send: Send
    ) -> int:
        """Answer one request; the status sent (`CLIENT_CLOSED` when the client left)."""
        try:
            head.check_size(self._max_header)
            answer = await self._route(scope, head, request_id, receive, send)
            if answer is None:
                return _STREAMED
        except ClientGone:
            return CLIENT_CLOSED
        except asyncio.CancelledError:
            # The grace period after SIGTERM ran out: say so, rather than a bare reset.
            if self._draining and not scope.get(STREAMING):
                closing = Unavailable("the server is shutting down; retry elsewhere")
                await self._send(send, self._problem(closing, request_id, head), request_id)
            raise
        except Exception as exc:  # the one handler: everything through the HTTP mapping
            error = map_http_error(exc)
            if isinstance(error, ClientGone):
                return CLIENT_CLOSED
            if isinstance(error, InternalError) and error is not exc:
                logger.opt(exception=True).error("unexpected error; request id {}", request_id)
                error = InternalError(f"internal error; request id {request_id}")
            answer = self._problem(error, request_id, head)
        await self._send(send, answer, request_id)
        return answer.status

    def _problem(self, error: NexusError, request_id: str, head: RequestHead) -> Answer:
        return problem_answer(
            error,
            request_id,
            token_sent=head.authorization is not None,
            default_retry_after=self._retry_after,
        )

    async def _send(self, send: Send, answer: Answer, request_id: str) -> None:
        body = answer.body
        headers = [
            (b"content-type", answer.content_type),
            (b"content-length", b"%d" % len(body)),
            (_REQUEST_ID, request_id.encode()),
            *answer.headers,
        ]
        if self._draining or answer.status in _CLOSING_STATUSES:
            headers.append(_CLOSE)  # while draining: stop clients reusing this replica
        await send({"type": "http.response.start", "status": answer.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _route(
        self, scope: Scope, head: RequestHead, request_id: str, receive: Receive, send: Send
    ) -> Answer | None:
        exchange = Exchange(scope, head, request_id, receive, send)
        scope[_EXCHANGE] = exchange
        try:
            await self._router(scope, receive, send)
        finally:
            # The exchange refers to the scope: left in it, the two would be a reference
            # cycle, and each request's objects garbage for the collector to find.
            del scope[_EXCHANGE]
        return exchange.answer

    async def _operation(self, exchange: Exchange) -> Answer:
        """`POST /v1/{op}/{action}`: the request, forwarded to the op's workers."""
        op, action = exchange.param("op"), exchange.param("action")
        try:
            client_subject(op, action)  # validated (and cached) before anything is read
        except InvalidRequest:
            raise NotFound(f"no operation {op[:64]!r}.{action[:64]!r}") from None
        assert self._operations is not None
        head = exchange.head
        client_ip = self._client_ip(exchange.scope, head)
        return await self._operations.handle(
            op, action, head, exchange.request_id, client_ip, exchange.receive
        )

    def _caller(self, exchange: Exchange) -> dict[str, str]:
        """The credentials of the request, for routes the shim authorizes itself."""
        head = exchange.head
        return credentials(head.authorization, self._client_ip(exchange.scope, head))

    async def _job(self, exchange: Exchange) -> Answer:
        """`GET /v1/jobs/{id}`: a job's status document."""
        assert self._jobs is not None
        return await self._jobs.status(exchange.param("id"), self._caller(exchange))

    async def _healthz(self, _: Exchange) -> Answer:
        assert self._probes is not None
        return self._probes.healthz()

    async def _readyz(self, exchange: Exchange) -> Answer:
        assert self._probes is not None
        return await self._probes.readyz(exchange.request_id)

    async def _metrics(self, exchange: Exchange) -> Answer:
        assert self._probes is not None
        return self._probes.metrics(exchange.head.accept)

    async def _openapi(self, _: Exchange) -> Answer:
        assert self._probes is not None
        return self._probes.openapi()

    async def _asyncapi(self, _: Exchange) -> Answer:
        return self._catalog.asyncapi()

    async def _docs(self, _: Exchange) -> Answer:
        return self._catalog.page()

    async def _asset(self, exchange: Exchange) -> Answer:
        return self._catalog.asset(exchange.param("name"))

    async def _ops(self, exchange: Exchange) -> Answer:
        """`GET /v1/ops`: any valid token may list the declared operations."""
        assert self._authz is not None and self._registry is not None
        caller = self._caller(exchange)
        await self._authz.authenticate(caller)
        return ops_answer(await self._registry.listing())

    async def _ticket(self, exchange: Exchange) -> Answer:
        """`POST /v1/events/{topic}/ticket`: a one-use, short-lived ticket for one stream."""
        assert self._authz is not None and self._tickets is not None
        topic = exchange.param("topic")
        head = exchange.head
        check_token(topic, "topic")
        caller = self._caller(exchange)
        await self._authz.authorize(caller, *_STREAM_OP)  # as the stream itself would
        return await self._tickets.issue(topic, head.authorization)

    def _client_ip(self, scope: Scope, head: RequestHead) -> str:
        client = scope.get("client")
        peer = client[0] if client else None
        if not self._proxies:
            return peer or ""
        return self._proxies.client_ip(peer, head.forwarded_for)

    async def _events(self, exchange: Exchange) -> None:
        """`GET /v1/events/{topic}`: a server-sent event stream (answers nothing itself)."""
        assert self._streams is not None and self._gateway is not None
        assert self._authz is not None
        topic = exchange.param("topic")
        scope, head = exchange.scope, exchange.head
        check_token(topic, "topic")
        query = scope.get("query_string", b"")
        after = last_event_id(head.last_event_id, query)
        if self._draining:
            raise Unavailable("this replica is draining; reconnect with Last-Event-ID")
        with self._streams.reserve():
            ticket = ticket_of(query)
            if ticket is not None:  # a browser's EventSource: the ticket stands for its token
                assert self._tickets is not None
                head.authorization = await self._tickets.redeem(ticket, topic)
            client_ip = self._client_ip(scope, head)
            # The shim holds the token for the stream's life (re-checked, ended when it is
            # gone); the workers must allow the same token `stream.read` on the topic too.
            lease = await self._authz.lease(
                credentials(head.authorization, client_ip), *_STREAM_OP
            )
            caller = f"sub:{lease.principal.subject}" if lease is not None else f"ip:{client_ip}"
            with self._streams.reserve_for(caller):
                await self._stream(exchange, topic, after, lease)

    async def _stream(
        self, exchange: Exchange, topic: str, after: int | None, lease: StreamLease | None
    ) -> None:
        """Open the stream's gate with a worker, then stream (`_events`' places held)."""
        assert self._streams is not None and self._gateway is not None
        scope, head, request_id = exchange.scope, exchange.head, exchange.request_id
        client_ip = self._client_ip(scope, head)
        timeout_s = self.settings.client.default_timeout_ms / 1000
        headers = bus_headers(self._gateway, head, request_id, client_ip, timeout_s)
        gate = await self._gateway.request_raw(
            *_STREAM_OP, encode_gate_request(topic, after), headers, timeout_s=timeout_s
        )
        if gate.status >= 400:
            raise error_of(gate.status, gate.body, gate.headers)
        if self._draining:  # drain began while we awaited: close_all() has passed us by
            raise Unavailable("this replica is draining; reconnect with Last-Event-ID")
        scope[STREAMING] = True
        await self._streams.stream(topic, after, request_id, exchange.receive, exchange.send, lease)
