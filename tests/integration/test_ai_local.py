"""Local embeddings with the packaged all-MiniLM-L6-v2 (the `ai-local` extra), no network.

Marked slow: the model loads once per test session (a few seconds on the CPU), then every
test here reuses it through the worker's backend.
"""

from __future__ import annotations

import asyncio
import math

import pytest

from nexus_bus.ai.runtime import EXTRAS_KEY
from nexus_bus.ai.similarity import cosine
from tests.integration.ai_serving import ai_settings, ai_worker, serving_ai

pytestmark = pytest.mark.slow

LOCAL = {"backends": {"local": {"kind": "local", "models": ["all-MiniLM-L6-v2"]}},
         "default_embed_model": "all-MiniLM-L6-v2"}


async def test_local_embeddings_are_real_and_semantic(
    nats_url: str, redis_url: str, uid: str
) -> None:
    settings = ai_settings(nats_url, redis_url, LOCAL)
    texts = [
        f"A man is playing a guitar on stage. {uid}",
        f"Someone performs music with a guitar at a concert. {uid}",
        f"The central bank raised interest rates again. {uid}",
    ]
    async with serving_ai(settings, f"ai{uid}") as gw:
        reply = await gw.request(f"ai{uid}", "embed", {"input": texts}, timeout=60)
        again = await gw.request(f"ai{uid}", "embed", {"input": texts[0]}, timeout=60)
    guitar, concert, bank = reply["vectors"]
    assert reply["model"] == "all-MiniLM-L6-v2"
    assert len(guitar) == 384 and math.isclose(sum(v * v for v in guitar), 1.0, rel_tol=1e-4)
    assert cosine(guitar, concert) > cosine(guitar, bank) + 0.3
    assert again["vectors"][0] == pytest.approx(guitar, abs=1e-6)


async def test_local_backend_batches_concurrent_requests(
    nats_url: str, redis_url: str, uid: str
) -> None:
    settings = ai_settings(nats_url, redis_url, LOCAL)
    async with ai_worker(settings, f"ai{uid}") as (gw, worker):
        await gw.request(f"ai{uid}", "embed", {"input": f"warm {uid}"}, timeout=60)
        assert worker.services is not None
        runtime = worker.services.extras[EXTRAS_KEY]
        batcher = runtime.routes["all-MiniLM-L6-v2"].batcher("all-MiniLM-L6-v2")
        before = batcher.calls
        replies = await asyncio.gather(*(
            gw.request(f"ai{uid}", "embed", {"input": f"text {i} {uid}"}, timeout=60)
            for i in range(16)
        ))
        calls = batcher.calls - before
    assert all(len(r["vectors"][0]) == 384 for r in replies)
    # 16 concurrent requests, fewer model calls: texts that arrive while one runs share the next.
    assert 1 <= calls < 16, calls
