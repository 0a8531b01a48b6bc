"""Shared pieces of the HTTP shim tests: a probe operation group and a real shim on a port.

`probe_ops` is served by a real worker next to the built-in ops; its actions report what
reached the worker (headers, trace, budget), sleep, or fail with a chosen error, so the tests
can see through the shim from both sides.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import msgspec

from nexus_bus import Operations, RequestContext, Settings, Worker
from nexus_bus.constants import H_AUTHORIZATION, H_CLIENT_IP, H_TIMEOUT_MS, H_TRACESTATE
from nexus_bus.embedded import free_port
from nexus_bus.errors import ERRORS_BY_CODE
from nexus_bus.http import ShimApp, ShimServer, create_server

PROBE_OP = "httpprobe"
probe_ops = Operations(PROBE_OP, description="Test probe for the HTTP shim.")


class EchoRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Anything; the probe answers with what it saw."""

    note: str = ""


class SleepRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Sleep this long before answering."""

    ms: int


class FailRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Fail with this stable code (and optional retry hint)."""

    code: str
    retry_after: float | None = None


@probe_ops.action("echo")
async def echo(req: EchoRequest, ctx: RequestContext) -> dict[str, Any]:
    """What the worker received besides the body."""
    return {
        "note": req.note,
        "request_id": ctx.request_id,
        "trace_id": ctx.trace.trace_id,
        "tracestate": ctx.headers.get(H_TRACESTATE),
        "timeout_ms": ctx.headers.get(H_TIMEOUT_MS),
        "idempotency_key": ctx.idempotency_key,
        "client_ip": ctx.headers.get(H_CLIENT_IP),
        "authorized": H_AUTHORIZATION in ctx.headers,
    }


@probe_ops.action("loose", allow_unknown_fields=True)
async def loose(req: EchoRequest, ctx: RequestContext) -> dict[str, str]:
    """Declared to accept fields its request does not name."""
    return {"note": req.note}


@probe_ops.action("sleep")
async def sleep(req: SleepRequest, ctx: RequestContext) -> dict[str, int]:
    """Answer after `ms` milliseconds."""
    await asyncio.sleep(req.ms / 1000)
    return {"slept_ms": req.ms}


@probe_ops.action("fail")
async def fail(req: FailRequest, ctx: RequestContext) -> dict[str, str]:
    """Raise the NexusError with this code."""
    raise ERRORS_BY_CODE[req.code]("probe failure", retry_after=req.retry_after)


def with_http(settings: Settings, **http: Any) -> Settings:
    """`settings` with a free port and drain settings fit for tests, plus `http` overrides."""
    values = {"port": free_port(), "drain_delay_s": 0.0, "grace_s": 5.0, **http}
    return settings.model_copy(update={"http": settings.http.model_copy(update=values)})


@dataclass
class RunningShim:
    """A shim serving on a port inside the test's event loop."""

    url: str
    server: ShimServer
    app: ShimApp


@contextlib.asynccontextmanager
async def running_shim(
    settings: Settings, *, groups: Iterable[Operations] | None = None, **http: Any
) -> AsyncIterator[RunningShim]:
    """Serve a real shim (uvicorn, our protocol) on a free port until the block ends.

    `groups` are the operations the shim knows (default: the built-in ones).
    """
    configured = with_http(settings, **http)
    app = ShimApp(configured, groups) if groups is not None else None
    server = create_server(configured, app, handle_signals=False)
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(15):
            while not server.started:
                if task.done():
                    task.result()
                    raise RuntimeError("shim exited before starting")
                await asyncio.sleep(0.02)
        yield RunningShim(f"http://127.0.0.1:{configured.http.port}", server, server.app)
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)


@contextlib.asynccontextmanager
async def probe_worker(settings: Settings) -> AsyncIterator[Worker]:
    """A worker serving `probe_ops` on the test's NATS."""
    worker = Worker(settings, [probe_ops])
    await worker.start()
    try:
        yield worker
    finally:
        await worker.drain(1)


async def poll_until(check: Callable[[], Awaitable[bool]], timeout_s: float) -> None:
    """Wait until `check()` is true, polling: for state in another process or server.

    Raises:
        TimeoutError: it did not become true within `timeout_s`.
    """
    async with asyncio.timeout(timeout_s):
        while not await check():  # noqa: ASYNC110 - remote state has no event to wait on
            await asyncio.sleep(0.05)


def bearer(token: str | None) -> dict[str, str]:
    """The Authorization header for `token` (none when auth is off)."""
    return {"Authorization": f"Bearer {token}"} if token else {}


async def raw_exchange(url: str, data: bytes, *, read_timeout_s: float = 10.0) -> bytes:
    """Send raw bytes to the shim and read until it closes the connection."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(read_timeout_s):
            return await reader.read(-1)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
