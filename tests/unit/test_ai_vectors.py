"""Embedding vectors as float32 bytes: packing, the base64 wire form, `encoding_format`."""

from __future__ import annotations

import base64
import random
import re
import struct
import unicodedata

import msgspec
import pytest

from nexus_bus.ai.keys import normalize_text
from nexus_bus.ai.vectors import pack, unpack
from nexus_bus.bus import codec
from nexus_bus.errors import InvalidRequest
from nexus_bus.handlers import ai
from nexus_bus.schemas.ai import EmbedReply, EmbedRequest
from nexus_bus.testing import OperationsHarness


def as_float32(values: list[float]) -> list[float]:
    """Each value rounded to float32, by a path independent of `vectors.py`."""
    return list(struct.unpack(f"<{len(values)}f", struct.pack(f"<{len(values)}f", *values)))


def test_packing_is_little_endian_float32() -> None:
    assert pack([1.0, -2.0]) == b"\x00\x00\x80\x3f\x00\x00\x00\xc0"
    assert unpack(b"\x00\x00\x80\x3f\x00\x00\x00\xc0") == [1.0, -2.0]
    assert base64.b64encode(pack([1.0, -2.0])) == b"AACAPwAAAMA="  # as OpenAI writes it
    assert len(pack([0.5] * 384)) == 1536


def test_float32_base64_floats_round_trip_equals_the_float_form() -> None:
    rng = random.Random(17)
    vector = [rng.uniform(-1, 1) for _ in range(384)]
    packed = pack(vector)
    floats = EmbedReply(model="m", vectors=[unpack(packed)])
    based = EmbedReply(model="m", vectors=[packed])
    float_form = msgspec.json.decode(msgspec.json.encode(floats))["vectors"][0]
    wire = msgspec.json.decode(msgspec.json.encode(based))["vectors"][0]
    assert isinstance(wire, str)
    from_base64 = list(struct.unpack("<384f", base64.b64decode(wire)))
    assert from_base64 == float_form == as_float32(vector)  # exact: the same float32 values
    assert float_form == pytest.approx(vector, rel=1e-6, abs=1e-7)  # within float32
    assert len(msgspec.json.encode(based)) < len(msgspec.json.encode(floats)) / 3


def test_unpack_refuses_a_partial_component() -> None:
    with pytest.raises(ValueError, match="float32"):
        unpack(b"\x00\x00\x80")


def test_msgpack_replies_carry_the_bytes_as_binary() -> None:
    packed = pack([0.25, 4.0])
    reply = EmbedReply(model="m", vectors=[packed])
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(reply))["vectors"] == [packed]


def test_encoding_format_defaults_to_float_and_refuses_other_values() -> None:
    def decode(body: bytes) -> EmbedRequest:
        return codec.decode(body, EmbedRequest, max_bytes=10_000, max_depth=32)

    assert decode(b'{"input": "x"}').encoding_format == "float"
    assert decode(b'{"input": "x", "encoding_format": "base64"}').encoding_format == "base64"
    for bad in (b'"binary"', b'"BASE64"', b"null", b"1"):
        with pytest.raises(InvalidRequest) as caught:
            decode(b'{"input": "x", "encoding_format": %s}' % bad)
        assert caught.value.code == "invalid_request" and caught.value.http_status == 400
        assert "encoding_format" in str(caught.value)


async def test_both_formats_give_the_same_vectors_through_the_handler() -> None:
    async with OperationsHarness(ai.ops) as harness:
        token = harness.token("ai:embed")
        texts = ["the river bank", "a bank loan"]
        floats = await harness.request(
            "ai", "embed", {"input": texts, "model": "hash-256"}, token=token
        )
        based = await harness.request(
            "ai", "embed", {"input": texts, "model": "hash-256", "encoding_format": "base64"},
            token=token,
        )
        with pytest.raises(InvalidRequest, match="encoding_format"):
            await harness.request(
                "ai", "embed", {"input": "x", "model": "hash-256", "encoding_format": "f32"},
                token=token,
            )
    assert based["model"] == floats["model"] == "hash-256"
    assert [unpack(base64.b64decode(v)) for v in based["vectors"]] == floats["vectors"]
    assert all(len(v) == 256 for v in floats["vectors"])


@pytest.mark.parametrize(
    "text", ["  a\t\nb  c ", "non\u00a0breaking\u2003em\u3000ideographic", "x\u200by", "", "é"]
)
def test_normalizing_by_split_matches_the_regex_it_replaced(text: str) -> None:
    # Cache keys must not move: `str.split()` and `re`'s `\s` agree on every whitespace.
    regex = re.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).strip()
    assert normalize_text(text) == regex
