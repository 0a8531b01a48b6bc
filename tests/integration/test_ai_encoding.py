"""`ai.embed`'s `encoding_format` end to end: HTTP shim, real NATS and Redis, a worker, and
the OpenAI-compatible provider DOUBLE as the model server."""

from __future__ import annotations

import base64
import struct
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec
import pytest

from nexus_bus.constants import CT_MSGPACK
from tests.conftest import issue_test_token
from tests.integration.ai_serving import ai_group, ai_settings, ai_worker, openai_backend
from tests.integration.http_shim import bearer, running_shim
from tests.model_provider_double import DIMS, ProviderDouble, double_vector, provider_double

EMBED = "embeddings"


@pytest.fixture
async def provider() -> AsyncIterator[ProviderDouble]:
    async with provider_double() as double:
        yield double


def floats_of(encoded: str) -> list[float]:
    """A base64 vector read as OpenAI's clients read it: little-endian float32."""
    raw = base64.b64decode(encoded, validate=True)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


async def test_float_and_base64_give_the_same_vector_over_http(
    provider: ProviderDouble, nats_url: str, redis_url: str, uid: str
) -> None:
    op = f"ai{uid}"
    section = {"backends": {"double": openai_backend(provider.base_url, ["emb-1"])}}
    settings = ai_settings(nats_url, redis_url, section)
    token = issue_test_token(subject=f"admin-{op}")
    one, two = f"alpha {uid}", f"beta {uid}"
    async with (
        ai_worker(settings, op),
        running_shim(settings, groups=[ai_group(op)]) as shim,
        httpx.AsyncClient(base_url=shim.url, headers=bearer(token)) as client,
    ):
        url = f"/v1/{op}/embed"

        async def embed(body: dict[str, object]) -> Any:
            resp = await client.post(url, json={"model": "emb-1", **body})
            assert resp.status_code == 200, resp.text
            return resp.json()

        floats = await embed({"input": one})  # a miss: the float form
        based = await embed({"input": one, "encoding_format": "base64"})  # a hit
        batch = await embed({"input": [two, one], "encoding_format": "base64"})  # miss + hit
        again = await embed({"input": [two], "encoding_format": "float"})  # a hit
        packed = await client.post(
            url, content=msgspec.msgpack.encode(
                {"input": one, "model": "emb-1", "encoding_format": "base64"}
            ), headers={"Content-Type": CT_MSGPACK},
        )
        bad = await client.post(url, json={"input": one, "encoding_format": "binary"})
        absent = await client.post(url, json={"input": one, "encoding_format": None})
        spec = (await client.get("/openapi.json")).json()

    vector = floats["vectors"][0]
    assert len(vector) == DIMS and vector == pytest.approx(double_vector(one), rel=1e-6)
    assert [floats_of(v) for v in based["vectors"]] == [vector]
    assert floats_of(batch["vectors"][1]) == vector
    assert floats_of(batch["vectors"][0]) == again["vectors"][0]
    assert again["vectors"][0] == pytest.approx(double_vector(two), rel=1e-6)
    # MessagePack replies carry the same float32 bytes as binary, not as base64 text.
    assert packed.status_code == 200
    assert msgspec.msgpack.decode(packed.content)["vectors"] == [struct.pack(f"<{DIMS}f", *vector)]
    # The double saw each text once: every other answer came from the cache.
    assert sorted(t for call in provider.calls(EMBED) for t in call["input"]) == [one, two]
    for refused in (bad, absent):
        assert refused.status_code == 400
        assert refused.headers["content-type"] == "application/problem+json"
        problem = refused.json()
        assert problem["code"] == "invalid_request" and "encoding_format" in problem["detail"]
    # The shim's own OpenAPI document describes the field.
    field = spec["components"]["schemas"]["EmbedRequest"]["properties"]["encoding_format"]
    assert sorted(field["enum"]) == ["base64", "float"] and field["default"] == "float"
