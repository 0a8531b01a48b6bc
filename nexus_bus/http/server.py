"""Running the shim: uvicorn with httptools and uvloop, its supported limits, graceful drain.

On SIGTERM (or SIGINT) the shim first turns not-ready and keeps serving for `drain_delay_s`,
so load balancers and NGINX stop sending new work; answers in that window say
`Connection: close` so clients do not keep reusing this replica. Then the listener closes,
in-flight requests get `grace_s` to finish, connections close, NATS is drained, and the
process exits 0. A second SIGINT forces the exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import signal
import socket
import time
from collections.abc import Generator, Iterable
from types import FrameType

import uvicorn

from nexus_bus.config import Settings
from nexus_bus.discovery import ShimDiscovery
from nexus_bus.http.app import ShimApp
from nexus_bus.http.transport import ShimProtocol
from nexus_bus.observability import logger
from nexus_bus.operations import Operations


def create_config(app: ShimApp, settings: Settings) -> uvicorn.Config:
    """The uvicorn configuration of the shim (see docs/http.md for why each choice)."""
    http = settings.http
    return uvicorn.Config(
        app,
        host=http.host,
        port=http.port,
        backlog=http.backlog,
        loop="uvloop",
        # Only uvicorn's documented settings (docs/http.md, "Limits per deployment"): the app
        # answers heads over `max_header_bytes` with 431 and slow bodies with 408; heads that
        # never complete, or trickle in, are NGINX's to cut off in front of it. The protocol
        # is uvicorn's httptools one, writing each answer in one call (`transport.py`).
        http=ShimProtocol if http.join_writes else "httptools",
        limit_concurrency=http.max_connections,
        ws="none",
        lifespan="on",
        log_config=None,
        access_log=False,
        server_header=False,
        proxy_headers=False,  # X-Forwarded-For is read by the app, from trusted proxies only
        timeout_keep_alive=math.ceil(http.keep_alive_s),
        timeout_graceful_shutdown=http.grace_s,  # type: ignore[arg-type]  # used as a float
    )


class ShimServer(uvicorn.Server):
    """uvicorn's server with a readiness-first drain and a clean exit on SIGTERM."""

    def __init__(
        self,
        config: uvicorn.Config,
        app: ShimApp,
        *,
        drain_delay_s: float,
        handle_signals: bool = True,
    ) -> None:
        """Args: handle_signals: install SIGTERM/SIGINT handlers (off when embedded in tests)."""
        super().__init__(config)
        self._handle_signals = handle_signals
        self.app = app
        self._drain_delay_s = drain_delay_s
        self._drain_started: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Consul registration (docs/discovery.md), made here so a bad config fails at once.
        enabled = app.settings.consul.enabled
        self.discovery = ShimDiscovery(app.settings) if enabled else None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """Start listening (after the app's lifespan startup)."""
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)
        if self._handle_signals:  # we own the process (not embedded in a test or an app)
            # Everything loaded so far lives as long as the process: keep it out of the
            # garbage collector's full passes, which otherwise add pauses to the p99 tail.
            gc.collect()
            gc.freeze()
        if self.started:
            logger.info("shim listening on http://{}:{}", self.config.host, self.bound_port)
            if self.discovery is not None:  # registers in the background
                self.discovery.start(self.bound_port, self.app.ops)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """Deregister from Consul first, then uvicorn's shutdown (in-flight requests finish)."""
        if self.discovery is not None:
            await self.discovery.stop()
        await super().shutdown(sockets=sockets)

    @property
    def bound_port(self) -> int:
        """The port actually listened on (useful with port 0)."""
        for server in getattr(self, "servers", []):
            for sock in server.sockets:
                port: int = sock.getsockname()[1]
                return port
        return self.config.port

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        """uvicorn's signal capture, or nothing when the embedding program owns signals."""
        if not self._handle_signals:
            yield
            return
        with super().capture_signals():
            yield

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Signal handler: begin the drain; a second SIGINT forces the exit.

        uvicorn's own handler re-raises the signal after shutting down, which would end the
        process with -SIGTERM instead of 0; this one does not.
        """
        if self._drain_started is not None:
            if sig == signal.SIGINT:
                self.force_exit = True
            return
        self.begin_drain()

    def begin_drain(self) -> None:
        """Turn not-ready now; stop listening after `drain_delay_s`."""
        if self._drain_started is not None:
            return
        self._drain_started = time.monotonic()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.app.begin_drain)
        else:
            self.app.begin_drain()

    async def on_tick(self, counter: int) -> bool:
        """uvicorn's 100 ms tick: also ends the main loop once the drain delay has passed."""
        if await super().on_tick(counter):
            return True
        started = self._drain_started
        return started is not None and time.monotonic() - started >= self._drain_delay_s


def create_server(
    settings: Settings, app: ShimApp | None = None, *, handle_signals: bool = True
) -> ShimServer:
    """A ready-to-run shim server (call `await server.serve()` or `server.run()`)."""
    app = app or ShimApp(settings)
    return ShimServer(
        create_config(app, settings),
        app,
        drain_delay_s=settings.http.drain_delay_s,
        handle_signals=handle_signals,
    )


def serve(settings: Settings, groups: Iterable[Operations] | None = None) -> int:
    """Run the shim until SIGTERM/SIGINT; the process's exit code (0 after a clean drain).

    Args:
        settings: the whole settings object.
        groups: the operations the shim knows (default: the built-in ones); it lets their
            public actions through without a token and describes them in `/openapi.json`.

    Raises:
        NexusError: the startup failed (NATS unreachable, no usable keys...).
    """
    app = ShimApp(settings, groups) if groups is not None else ShimApp(settings)
    app.raises_startup_error = True
    server = create_server(settings, app)
    try:
        server.run()
    except SystemExit:
        # uvicorn ends a failed lifespan startup with sys.exit(3). Raised instead, the error
        # is the CLI's one line (`error: unavailable: ...`, exit 1), as a worker's is.
        if app.startup_error is not None:
            raise app.startup_error from app.startup_error.__cause__
        raise
    return 0 if server.started else 1
