"""The baselines `bench_http` measures nexus-bus against, each served by a process of its own.

- `serve_responder`: a raw nats-py responder that only does `msg.respond(msg.data)`.
- `serve_aiohttp` / `serve_uvicorn` / `serve_granian`: a minimal HTTP→NATS bridge to it (or,
  without a NATS URL, an app answering without NATS at all).
- `serve_otlp_sink`: an OTLP/HTTP trace endpoint that accepts and drops every export.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import uvloop

RAW_PREFIX = "bench.raw"


async def serve_responder(url: str) -> None:
    """A raw nats-py responder: the floor any worker runtime is measured against."""
    import nats

    nc = await nats.connect(url)

    async def respond(msg: Any) -> None:
        await msg.respond(msg.data)

    await nc.subscribe(f"{RAW_PREFIX}.>", queue="bench", cb=respond)
    await asyncio.Event().wait()


def serve_aiohttp(url: str | None, port: int) -> None:
    """aiohttp: a minimal HTTP→NATS bridge when `url` is given, else a no-NATS echo."""
    import nats
    from aiohttp import web

    state: dict[str, Any] = {}

    async def bridge(request: web.Request) -> web.Response:
        body = await request.read()
        op, action = request.match_info["op"], request.match_info["action"]
        msg = await state["nc"].request(f"{RAW_PREFIX}.{op}.{action}", body, timeout=5)
        return web.Response(body=msg.data, content_type="application/json")

    async def plain(request: web.Request) -> web.Response:
        return web.Response(body=await request.read(), content_type="application/json")

    async def connect(app: web.Application) -> None:
        state["nc"] = await nats.connect(url)

    app = web.Application()
    app.router.add_post("/v1/{op}/{action}", bridge if url else plain)
    if url:
        app.on_startup.append(connect)
    web.run_app(app, host="127.0.0.1", port=port, print=None, loop=uvloop.new_event_loop())


def serve_otlp_sink(port: int) -> None:
    """An OTLP/HTTP trace endpoint that accepts every export and keeps nothing (the
    collector's cost is not ours; the exporter's, in the traced processes, is)."""
    from aiohttp import web

    async def traces(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/traces", traces)
    web.run_app(app, host="127.0.0.1", port=port, print=None)


def asgi_app(url: str | None) -> Any:
    """Bare ASGI: a minimal HTTP→NATS bridge when `url` is given, else a no-NATS echo."""
    import nats

    state: dict[str, Any] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    if url:
                        state["nc"] = await nats.connect(url)
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        if url:
            _, _, op, action = scope["path"].split("/")
            body = (await state["nc"].request(f"{RAW_PREFIX}.{op}.{action}", body, timeout=5)).data
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


def serve_uvicorn(url: str | None, port: int) -> None:
    """The bare ASGI app on uvicorn, configured like the shim (httptools, uvloop)."""
    import uvicorn

    uvicorn.run(
        asgi_app(url), host="127.0.0.1", port=port, loop="uvloop", http="httptools",
        ws="none", access_log=False, log_level="warning", server_header=False,
    )


def serve_granian(url: str | None, port: int) -> None:
    """The bare ASGI bridge on granian (only with --servers)."""
    from granian.constants import Interfaces, Loops
    from granian.server import Server

    os.environ["BENCH_NATS_URL"] = url or ""
    Server(
        "benchmarks.http_baselines:granian_target", address="127.0.0.1", port=port,
        interface=Interfaces.ASGI, loop=Loops.uvloop, websockets=False, log_enabled=False,
        factory=True,
    ).serve()


def granian_target() -> Any:
    """granian imports its target (a factory) by name; the URL comes through the environment."""
    return asgi_app(os.environ.get("BENCH_NATS_URL") or None)


# --- the harness ------------------------------------------------------------------------
