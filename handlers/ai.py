"""`ai.*`: embeddings, completions and similarity search over model backends (docs/ai.md).

Backends come from settings (`ai.backends`), chosen per model name: an OpenAI-compatible
server (OpenAI, vLLM, Ollama, llama.cpp...), the packaged local MiniLM model, and the
built-in lexical model `hash-256` (only when a request names it). A model that no backend
serves is `503 unavailable` naming the setting: nexus-bus never fakes a model's answer.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Final

import msgspec

from nexus_bus import Operations, RequestContext
from nexus_bus.ai.backend import ChatMessage, CompletionCall, hash_embed
from nexus_bus.ai.graphs import GraphBus, run_graph
from nexus_bus.ai.runtime import runtime_of
from nexus_bus.ai.settings import HASH_MODEL
from nexus_bus.ai.similarity import text_of, top_k
from nexus_bus.ai.vectors import unpack
from nexus_bus.errors import InvalidRequest, NexusError, NotFound
from nexus_bus.schemas.ai import (
    CompleteReply,
    CompleteRequest,
    EmbedReply,
    EmbedRequest,
    Match,
    RunError,
    RunReply,
    RunRequest,
    SimilarReply,
    SimilarRequest,
    Usage,
)

ops = Operations("ai", description="Embeddings, completions, similarity search and graph runs.")

__all__ = ["HASH_MODEL", "hash_embed", "ops"]

_decode: Final = msgspec.json.decode
_READS_AT_ONCE: Final = 32
_MAX_TEXT: Final = 32_768  # a stored value's text is embedded up to this many characters


@ops.action("embed")
async def embed(req: EmbedRequest, ctx: RequestContext) -> EmbedReply:
    """Embed one text or a batch; one vector per text (cached by model and text), as numbers
    or, with `encoding_format: "base64"`, as base64 of little-endian float32 bytes."""
    texts = [req.input] if isinstance(req.input, str) else req.input
    model, packed = await runtime_of(ctx).embed(ctx, texts, req.model)
    if req.encoding_format == "base64":  # the cached bytes as they are: encoded in C
        return EmbedReply(model=model, vectors=list(packed))
    return EmbedReply(model=model, vectors=[unpack(p) for p in packed])


def _call_of(req: CompleteRequest, model: str) -> CompletionCall:
    if (req.messages is None) == (req.prompt is None):
        raise InvalidRequest("give exactly one of `messages` and `prompt`")
    if req.messages is not None:
        messages = tuple(ChatMessage(role=m.role, content=m.content) for m in req.messages)
    else:
        messages = (ChatMessage(role="user", content=req.prompt or ""),)
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    return CompletionCall(
        model=model, messages=messages, max_tokens=req.max_tokens,
        temperature=req.temperature, stop=stop,
    )


@ops.action("complete")
async def complete(req: CompleteRequest, ctx: RequestContext) -> CompleteReply:
    """Complete a prompt or conversation with the model's backend (`Prefer: respond-async`
    runs it as a job, retried on upstream 429/5xx)."""
    runtime = runtime_of(ctx)
    model, _ = runtime.resolve(req.model, "complete")
    done = await runtime.complete(ctx, _call_of(req, model), use_cache=req.cache)
    return CompleteReply(
        model=done.model,
        text=done.text,
        usage=Usage(prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens),
        finish_reason=done.finish_reason,
    )


async def _stored_texts(keys: list[str], ctx: RequestContext) -> list[tuple[str, str]]:
    """(key, text) of the keys that still have a value with text (read through the cache)."""
    gate = asyncio.Semaphore(_READS_AT_ONCE)

    async def read(key: str) -> tuple[str, str] | None:
        async with gate:
            try:
                record = await ctx.services.records.get(key)
            except NotFound:  # deleted since it was listed
                return None
        text = text_of(_decode(record.value))
        return (key, text[:_MAX_TEXT]) if text is not None else None

    found = await asyncio.gather(*(read(k) for k in keys))
    return [item for item in found if item is not None]


@ops.action("similar")
async def similar(req: SimilarRequest, ctx: RequestContext) -> SimilarReply:
    """Rank the `data` values under `prefix` by cosine similarity to `text`.

    Scans at most `max_scan` keys (default and ceiling `ai.similar_max_scan`) in key order;
    each value's embedding (of its first 32 768 characters) comes from the embedding cache,
    computed on first use.
    """
    runtime = runtime_of(ctx)
    ceiling = runtime.settings.similar_max_scan
    scan = min(req.max_scan or ceiling, ceiling)
    keys = await ctx.services.records.keys(req.prefix, scan + 1)
    truncated = len(keys) > scan
    stored = await _stored_texts(keys[:scan], ctx)
    texts = [req.text] + [text for _, text in stored]
    model, packed = await runtime.embed(ctx, texts, req.model)
    vectors = [unpack(p) for p in packed]
    ranked = top_k(vectors[0], [(k, v) for (k, _), v in zip(stored, vectors[1:], strict=True)],
                   req.limit)
    return SimilarReply(
        model=model,
        matches=[Match(key=k, score=round(s, 6)) for k, s in ranked],
        scanned=len(keys[:scan]),
        truncated=truncated,
    )


@ops.action("run", idempotent=False)
async def run(req: RunRequest, ctx: RequestContext) -> RunReply:
    """Run a registered LangGraph graph (`ai.graphs`); its nodes call operations as the caller.

    A `NexusError` from an operation a node called (403 for a scope the token lacks) ends
    the run: the reply is `status: failed` with that error, the last state and the steps
    run. With `topic`, every node's update is published there as it happens (SSE), then an
    `__end__` event with the run's status (and error), so a follower learns it ended.
    """
    runtime = runtime_of(ctx)
    graph = runtime.graph(req.graph)
    bus = GraphBus(ctx, runtime.gateway(ctx))

    async def publish(node: str, update: object) -> None:
        event = {"run": ctx.request_id, "graph": req.graph, "node": node, "update": update}
        await bus.call("stream", "publish", {"topic": req.topic, "event": event})

    outcome = await run_graph(graph, bus, dict(req.input), publish if req.topic else None)
    error = outcome.error
    failure = RunError(
        code=error.code, status=error.http_status, detail=error.detail,
        call=outcome.failed_call,
    ) if error else None
    if req.topic and failure is None:
        await publish("__end__", {"status": "succeeded"})
    elif req.topic:
        # Best effort: the reply must carry the run's own error, and this publish often fails
        # for the same reason the run did (no `stream:publish` scope, no time left).
        with contextlib.suppress(NexusError):
            await publish("__end__", {"status": "failed", "error": msgspec.to_builtins(failure)})
    return RunReply(
        graph=req.graph,
        status="failed" if failure else "succeeded",
        output=outcome.output,
        steps=outcome.steps,
        error=failure,
    )
