"""The shim's HTTP protocol after an early answer: lingering close and what it must not break.

A bare ASGI app on uvicorn with the shim's protocol class, over real sockets.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import uvicorn

from nexus_bus.embedded import free_port
from nexus_bus.http.protocol import limited_protocol

App = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


async def refuse(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answer 413 at once, without reading the body."""
    headers = [(b"content-length", b"2"), (b"connection", b"close")]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": b"no"})


class Streamer:
    """Streams heartbeats without reading the body, like the shim's event streams."""

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self.finished = asyncio.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        try:
            start = {"type": "http.response.start", "status": 200, "headers": []}
            await send(start)
            for _ in range(6):
                await send({"type": "http.response.body", "body": b": beat\n\n", "more_body": True})
                await asyncio.sleep(0.1)
            await send({"type": "http.response.body", "body": b""})
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            self.finished.set()


async def serve(app: App, read_timeout_s: float) -> AsyncIterator[tuple[int, uvicorn.Server]]:
    async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await app(scope, receive, send)

    port = free_port()
    config = uvicorn.Config(
        asgi, host="127.0.0.1", port=port, loop="none", ws="none", lifespan="off",
        log_config=None, http=limited_protocol(16 * 1024, read_timeout_s),
    )
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 - uvicorn sets a flag, not an event
        await asyncio.sleep(0.01)
    try:
        yield port, server
    finally:
        server.should_exit = True
        await task


@pytest.fixture
async def refusing() -> AsyncIterator[tuple[int, uvicorn.Server]]:
    async for running in serve(refuse, read_timeout_s=10):
        yield running


async def test_shutdown_does_not_wait_for_a_lingering_client(
    refusing: tuple[int, uvicorn.Server],
) -> None:
    port, server = refusing
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(4096), 5)
    assert answer.startswith(b"HTTP/1.1 413")

    async def keep_sending() -> None:
        while True:
            writer.write(b"x" * 1000)
            await writer.drain()
            await asyncio.sleep(0.05)

    sender = asyncio.create_task(keep_sending())
    await asyncio.sleep(0.2)  # lingering: the server reads and discards
    started = time.monotonic()
    server.should_exit = True
    while server.server_state.connections:
        assert time.monotonic() - started < 2, "shutdown waited for the lingering client"
        await asyncio.sleep(0.02)
    sender.cancel()
    await asyncio.gather(sender, return_exceptions=True)
    writer.close()


async def test_a_stream_cut_by_the_read_timeout_ends_quietly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A response streaming while its request body never arrives: the read timer closes the
    connection, and the app's later sends are no-ops, not errors."""
    app = Streamer()
    async for port, _ in serve(app, read_timeout_s=0.2):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /events HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
        with caplog.at_level(logging.ERROR):
            await asyncio.wait_for(app.finished.wait(), 5)
        assert app.error is None
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 200")
        writer.close()
