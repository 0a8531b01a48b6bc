"""A DOUBLE of an OpenAI-compatible model provider: a real aiohttp server on 127.0.0.1
speaking the `/v1/chat/completions` and `/v1/embeddings` wire format.

Programmable per test: a latency, and a queue of scripted failures (status, body,
`Retry-After`) answered before the normal replies. It records every request it received and
the most requests it had in flight at once (the bulkhead tests read that). Replies are
deterministic: a completion echoes the last message; an embedding is a small vector derived
from the text. It stands in for OpenAI, vLLM and Ollama, whose wire format it follows; it is
not a model.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

DIMS = 8


@dataclass
class Scripted:
    """One scripted failure reply."""

    status: int
    body: dict[str, Any] = field(default_factory=dict)
    retry_after: str | None = None


@dataclass
class ProviderDouble:
    """The double's programmable behaviour and what it observed."""

    base_url: str = ""
    latency_s: float = 0.0
    failures: list[Scripted] = field(default_factory=list)
    requests: list[tuple[str, dict[str, Any], dict[str, str]]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0

    def fail(self, status: int, times: int = 1, retry_after: str | None = None,
             message: str = "scripted failure") -> None:
        """Answer the next `times` requests with `status`."""
        body = {"error": {"message": message, "type": "scripted"}}
        self.failures.extend(Scripted(status, body, retry_after) for _ in range(times))

    def calls(self, path: str) -> list[dict[str, Any]]:
        """Bodies of the requests received on `path` (e.g. "chat/completions")."""
        return [body for p, body, _ in self.requests if p.endswith(path)]

    def reset(self) -> None:
        """Forget requests and scripts (keep the server)."""
        self.latency_s, self.failures, self.requests = 0.0, [], []
        self.in_flight = self.max_in_flight = 0


def double_vector(text: str) -> list[float]:
    """The double's embedding of `text` (unit length, deterministic)."""
    digest = hashlib.sha256(text.encode()).digest()
    raw = [b - 127.5 for b in digest[:DIMS]]
    norm = sum(v * v for v in raw) ** 0.5
    return [v / norm for v in raw]


async def _handle(state: ProviderDouble, request: web.Request) -> web.Response:
    body = await request.json()
    state.requests.append((request.path, body, dict(request.headers)))
    state.in_flight += 1
    state.max_in_flight = max(state.max_in_flight, state.in_flight)
    try:
        if state.latency_s:
            await asyncio.sleep(state.latency_s)
        if state.failures:
            scripted = state.failures.pop(0)
            headers = {"Retry-After": scripted.retry_after} if scripted.retry_after else {}
            return web.json_response(scripted.body, status=scripted.status, headers=headers)
        if request.path.endswith("/embeddings"):
            texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
            data = [{"object": "embedding", "index": i, "embedding": double_vector(t)}
                    for i, t in enumerate(texts)]
            return web.json_response({"object": "list", "data": data, "model": body["model"]})
        last = body["messages"][-1]["content"]
        text = f"echo: {last}"
        return web.json_response({
            "id": "chatcmpl-double", "object": "chat.completion", "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": len(json.dumps(body["messages"])) // 4,
                      "completion_tokens": len(text) // 4},
        })
    finally:
        state.in_flight -= 1


@asynccontextmanager
async def provider_double() -> AsyncIterator[ProviderDouble]:
    """Run the double on a free port; `base_url` ends in `/v1`."""
    state = ProviderDouble()
    app = web.Application()

    async def handle(request: web.Request) -> web.Response:
        return await _handle(state, request)

    app.router.add_post("/v1/chat/completions", handle)
    app.router.add_post("/v1/embeddings", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    state.base_url = f"http://127.0.0.1:{port}/v1"
    try:
        yield state
    finally:
        await runner.cleanup()
